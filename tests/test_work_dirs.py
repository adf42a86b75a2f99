"""Nothing shared by accident: every run's work folder is its own, even for two runs started in
the same second; an output folder that cannot be written stops the run in one line naming it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF
from lpcvlab_runs import REPO
from omegaconf import OmegaConf

from lpcvlab import app, pipeline

RUN_PY = str(REPO / "run.py")


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path: Path):
    """Two `python run.py` whose clock part of hydra.run.dir is the same, as for two runs
    started in the same second, write into different <time>_<uid>/ folders: the uid alone tells
    them apart, however the two processes are scheduled. (Each stops once Hydra made its folder:
    it reproduces a run of a store that does not exist.)"""
    default = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").hydra.run)["dir"]
    assert default == "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}_${lpcvlab_uid:}"
    same_second = "hydra.run.dir=outputs/2026-01-01/00-00-00_${lpcvlab_uid:}"
    nowhere = f"tracking.uri=sqlite:///{tmp_path}/none/mlflow.db"
    cmd = [sys.executable, RUN_PY, f"+reproduce={'0' * 32}", nowhere, same_second]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1 and b"error: no MLflow store at" in err, err[-2000:]
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if (p / ".hydra").is_dir())
    assert len(runs) == 2, runs
    stamps = [p.name.rsplit("_", 1) for p in runs]
    assert stamps[0][0] == stamps[1][0] == "00-00-00"
    assert all(len(uid) == 6 for _, uid in stamps)
    assert stamps[0][1] != stamps[1][1]


def test_runs_outside_hydra_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "2026-01-01_00-00-00_")
    first, second = pipeline._work_dir(None), pipeline._work_dir(None)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == second.parent == Path("outputs") / "adhoc"


# --------------------------------------------------------------------------- unwritable output


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The run's only stderr line (no traceback, no second report)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_in_the_output_folder_stops_in_one_line_naming_it(tmp_path: Path):
    """Hydra writes .hydra/config.yaml into the run's folder; here that file is /dev/full, on
    which every write fails with ENOSPC from the kernel, as on a full disk."""
    out = tmp_path / "out"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").symlink_to("/dev/full")
    proc = subprocess.run(
        [sys.executable, RUN_PY, f"hydra.run.dir={out}", f"tracking.uri=sqlite:///{tmp_path}/db"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = _one_line_error(proc)
    assert line.startswith(f"error: no space left on the device writing {out}: ")
    assert "hydra.run.dir" in line
    assert not (tmp_path / "db").exists()  # stopped before the store was opened


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys (Linux)")
@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_an_unwritable_output_folder_stops_in_one_line_naming_it(tmp_path: Path, mode: str):
    """/sys refuses new folders to everyone (root included): EPERM or EACCES from the kernel.
    A sweep stops before its MLflow parent run."""
    out = "/sys/lpcvlab-test-output"
    key = "hydra.run.dir" if mode == "run" else "hydra.sweep.dir"
    args = [f"{key}={out}", f"tracking.uri=sqlite:///{tmp_path}/db", "backbone=clip_tiny"]
    if mode == "sweep":
        args = ["-m", *args, "seed=0,1"]
    proc = subprocess.run(
        [sys.executable, RUN_PY, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    line = _one_line_error(proc)
    assert line.startswith(f"error: cannot write {out} (") and f"({key})" in line
    assert not (tmp_path / "db").exists()


def test_only_writes_refused_in_the_output_folder_are_reported_as_such(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    monkeypatch.setattr(app, "_output_folder", [(folder, "hydra.run.dir")])
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write: the OS names no file
    assert app.output_folder_error(full) == (
        f"no space left on the device writing {folder}: free some space there, or point "
        "hydra.run.dir at a disk with room"
    )
    log = folder / "run.log"
    try:  # logging wraps its file handler's error in a ValueError
        try:
            raise PermissionError(errno.EACCES, "Permission denied", str(log))
        except OSError as exc:
            raise ValueError("Unable to configure handler 'file'") from exc
    except ValueError as wrapped:
        assert f"cannot write {log} (Permission denied)" in app.output_folder_error(wrapped)
    elsewhere = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data.csv"))
    assert app.output_folder_error(elsewhere) is None  # not the output folder: its traceback
    missing = FileNotFoundError(errno.ENOENT, "No such file", str(folder / "x"))
    assert app.output_folder_error(missing) is None  # not a refused write: a bug to show
    monkeypatch.setattr(app, "_output_folder", [])
    assert app.output_folder_error(full) is None  # Hydra never got to a folder
