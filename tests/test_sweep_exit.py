"""Sweeps that fail loudly: a multirun exits 1 when its jobs failed (``sweep.fail_on``), after
its parent run is summarised; a job its own config stops gets a FAILED child run."""

from __future__ import annotations

from pathlib import Path

import pytest
from lpcvlab_runs import TINY, all_runs, explain, run_py, store_overrides

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
