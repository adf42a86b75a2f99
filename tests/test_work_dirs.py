"""Nothing shared by accident: every run's work folder is its own, even for two runs started in
the same second."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from lpcvlab_runs import REPO

from lpcvlab import pipeline


def test_two_runs_started_together_get_two_folders(tmp_path: Path):
    """Two `python run.py` started at once (each stops at its config check, after Hydra made
    its folder) write into different outputs/<date>/<time>_<uid>/ folders."""
    cmd = [sys.executable, str(REPO / "run.py"), "seed=-1", f"tracking.uri=sqlite:///{tmp_path}/db"]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1 and b"seed=-1 must be >= 0" in err, err[-2000:]
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if (p / ".hydra").is_dir())
    assert len(runs) == 2, runs
    stamps = [p.name.rsplit("_", 1) for p in runs]
    assert all(len(uid) == 6 for _, uid in stamps)
    assert stamps[0][1] != stamps[1][1]


def test_runs_outside_hydra_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "2026-01-01_00-00-00_")
    first, second = pipeline._work_dir(None), pipeline._work_dir(None)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == second.parent == Path("outputs") / "adhoc"
