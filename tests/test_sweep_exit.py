"""Sweeps that fail loudly: a multirun exits 1 when its jobs failed (``sweep.fail_on``), after
its parent run is summarised; a job its own config stops gets a FAILED child run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lpcvlab_runs import REPO, TINY, all_runs, explain, run_py, store_overrides

from lpcvlab.tracking.recorder import PARENT_RUN_ENV
from lpcvlab.tracking.sweep import SweepSummary, failure_verdict


def _summary(jobs: int, failed: int) -> SweepSummary:
    return SweepSummary(
        jobs=jobs,
        finished=jobs - failed,
        failed=failed,
        child_runs=jobs,
        missing_runs=0,
        best_run_id=None,
        best_objective=None,
        objective_name="recall_at_10",
    )


@pytest.mark.parametrize(
    ("fail_on", "jobs", "failed", "fails"),
    [
        ("any", 4, 0, False),
        ("any", 4, 1, True),
        ("any", 4, 4, True),
        ("all", 4, 1, False),
        ("all", 4, 4, True),
        ("never", 4, 4, False),
        ("any", 0, 0, False),
    ],
)
def test_fail_on_decides_from_the_jobs(fail_on, jobs, failed, fails):
    verdict = failure_verdict(fail_on, _summary(jobs, failed), "abc")
    assert (verdict is not None) is fails
    if fails:
        assert f"{failed} of {jobs} sweep job(s) failed (sweep.fail_on={fail_on})" in verdict
        assert "parent run abc" in verdict and "sweep.fail_on=never" in verdict


def _sweep(tmp: Path):
    runs = all_runs(tmp)
    (parent,) = [r for r in runs if r.tags.get("sweep") == "true"]
    children = [r for r in runs if r.tags.get("mlflow.parentRunId") == parent.run_id]
    return parent, children


@pytest.mark.slow  # a `python run.py -m` sweep with its MLflow parent and child runs
def test_jobs_stopped_by_their_own_config_are_failed_runs_and_the_sweep_exits_1(tmp_path):
    proc = run_py("-m", *TINY, "seed=-1,-2", *store_overrides(tmp_path))
    assert proc.returncode == 1, explain(proc)
    # The parent was summarised before the exit.
    assert "2 job(s), 0 finished, 2 failed" in proc.stdout
    assert "error: 2 of 2 sweep job(s) failed (sweep.fail_on=any)" in proc.stderr
    parent, children = _sweep(tmp_path)
    assert parent.status == "FAILED" and parent.metrics["sweep/failed"] == 2
    assert parent.metrics["sweep/missing_runs"] == 0
    by_job = {c.tags["sweep_job"]: c for c in children}
    assert set(by_job) == {"0", "1"}
    for job, seed in (("0", -1), ("1", -2)):
        child = by_job[job]
        assert child.status == "FAILED"
        assert f"seed={seed} must be >= 0" in child.tags["error"]
        assert child.params["seed"] == str(seed)
        assert f"seed={seed}" in child.tags["command"]


@pytest.mark.slow  # as above
@pytest.mark.parametrize(("fail_on", "code"), [("never", 0), ("all", 1)])
def test_fail_on_never_and_all(tmp_path, fail_on, code):
    proc = run_py("-m", *TINY, "seed=-1,-2", f"sweep.fail_on={fail_on}", *store_overrides(tmp_path))
    assert proc.returncode == code, explain(proc)
    assert "2 job(s), 0 finished, 2 failed" in proc.stdout
    assert ("sweep job(s) failed" in proc.stderr) is bool(code)


def test_fail_on_is_checked_when_the_config_loads(tmp_path):
    proc = run_py("-m", *TINY, "seed=0,1", "sweep.fail_on=some", *store_overrides(tmp_path))
    assert proc.returncode == 1
    assert "sweep.fail_on" in proc.stderr and "any" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or not all_runs(tmp_path)


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_ends_killed_saying_what_finished(tmp_path):
    """Ctrl-C (SIGINT) while the basic launcher runs the second of three jobs: exit 130, one
    paragraph and no traceback; the job that was running KILLED, the parent KILLED with a
    summary: one finished, which one was stopped, one never started, how to resume."""
    args = ["-m", *TINY, "seed=0,1,2", "hydra/launcher=basic", *store_overrides(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV)}
    proc = subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_reaches_it,
    )
    deadline = time.monotonic() + 400
    while not _running_job(tmp_path, "1"):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "job 1 never started"
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    paragraph = err.strip().splitlines()[-1]
    assert paragraph.startswith("Stopped by SIGINT. Sweep parent run"), err[-2000:]
    assert "1 of 3 job(s) finished, 0 failed" in paragraph
    assert "stopped, KILLED with what they had logged: #1 (" in paragraph and "seed=1" in paragraph
    assert "1 never started" in paragraph and "python run.py -m" in paragraph
    runs = all_runs(tmp_path)
    (parent,) = [r for r in runs if r.tags.get("sweep") == "true"]
    assert parent.status == "KILLED" and parent.tags["error"] == "interrupted (SIGINT)"
    assert "1 never started" in parent.tags["mlflow.note.content"]
    jobs = {r.tags["sweep_job"]: r for r in runs if r.tags.get("sweep") != "true"}
    assert sorted(jobs) == ["0", "1"]
    assert jobs["0"].status == "FINISHED" and jobs["1"].status == "KILLED"
    assert jobs["1"].run_id in paragraph


def _ctrl_c_reaches_it() -> None:
    """In the child: SIGINT's default disposition, as a terminal's foreground job has. A suite
    started in the background by a non-interactive shell (``cmd &``) ignores SIGINT, its
    children inherit that, and Python then leaves Ctrl-C ignored: the sweep would never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _running_job(tmp: Path, job: str) -> bool:
    """Whether sweep job ``job`` has a RUNNING MLflow run (the store may be busy: not yet)."""
    try:
        runs = all_runs(tmp)
    except Exception:  # noqa: BLE001 - the sweep is writing; look again
        return False
    return any(r.tags.get("sweep_job") == job and r.status == "RUNNING" for r in runs)
