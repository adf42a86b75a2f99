"""``lpcvlab reproduce``: the code-version check, the metric diff, and a real round trip."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from lpcvlab_runs import TINY, all_runs, explain, run_py, seeded_store, store_overrides
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lpcvlab.tracking.recorder import PARENT_RUN_ENV
from lpcvlab.tracking.reproduce import (
    CodeVersion,
    MetricDiff,
    ReproduceError,
    Reproduction,
    code_problems,
    diff_metrics,
    prepare_config,
    reproduce,
)
from lpcvlab.tracking.runstore import RunInfo

HEAD = "a" * 40


def _never_runs(*args, **kwargs):
    """The runner of a reproduction that must be refused before anything runs."""
    raise AssertionError("the refused reproduction ran the pipeline")


def _run(tags: dict, params: dict | None = None, metrics: dict | None = None) -> RunInfo:
    return RunInfo("r" * 32, "name", "FINISHED", "1", 0, params or {}, metrics or {}, tags)


def test_same_clean_commit_has_no_problems():
    assert code_problems(_run({"git_commit": HEAD, "git_dirty": "false"}), CodeVersion(HEAD)) == []


def test_each_code_version_problem_is_named():
    other = "b" * 40
    (moved,) = code_problems(_run({"git_commit": other, "git_dirty": "false"}), CodeVersion(HEAD))
    assert other[:12] in moved and HEAD[:12] in moved and "worktree" in moved
    (dirty_run,) = code_problems(_run({"git_commit": HEAD, "git_dirty": "true"}), CodeVersion(HEAD))
    assert "uncommitted" in dirty_run and "git_dirty=true" in dirty_run
    (dirty_here,) = code_problems(
        _run({"git_commit": HEAD, "git_dirty": "false"}), CodeVersion(HEAD, (" M src/x.py",))
    )
    assert "M src/x.py" in dirty_here and "stash" in dirty_here
    (unknown,) = code_problems(_run({"git_commit": "unknown"}), CodeVersion(HEAD))
    assert "no git commit" in unknown


def test_accuracy_must_match_exactly_and_measurements_need_not():
    old = _run({}, {"budget.latency_ms": "None"}, {"recall_at_10": 0.5, "latency_ms/a": 3.0})
    new = _run({}, {}, {"recall_at_10": 0.5, "latency_ms/a": 4.0, "stage_seconds/total": 1.0})
    rep = Reproduction("old", "new", diff_metrics(old, new))
    assert rep.reproduced
    by_name = {d.name: d for d in rep.diffs}
    assert by_name["latency_ms/a"].measured and not by_name["recall_at_10"].measured
    assert "measured" in rep.render() and "recall_at_10" in rep.render()
    worse = _run({}, {}, {"recall_at_10": 0.5000001, "latency_ms/a": 3.0})
    assert [d.name for d in Reproduction("o", "n", diff_metrics(old, worse)).mismatches] == [
        "recall_at_10"
    ]
    assert not MetricDiff("top1", 0.5, None, False).matches  # lost in the re-run
    assert MetricDiff("top1", None, 0.5, False).matches  # new metric: the original predates it


def test_objective_is_a_measurement_when_a_budget_applies():
    budgeted = _run({}, {"budget.latency_ms": "30.0"}, {"objective": 0.1})
    rerun = _run({}, {}, {"objective": -0.2})
    assert Reproduction("o", "n", diff_metrics(budgeted, rerun)).reproduced


def test_the_rerun_writes_here_without_the_stage_cache():
    cfg = OmegaConf.create({"tracking": {"uri": "sqlite:///old.db"}, "cache": {"enabled": True}})
    out = prepare_config(cfg, "sqlite:///new.db", use_cache=False)
    assert out.tracking.uri == "sqlite:///new.db" and out.cache.enabled is False
    assert cfg.cache.enabled is True  # the original is left alone
    assert prepare_config(cfg, "u", use_cache=True).cache.enabled is True


@pytest.mark.slow
def test_reproduce_round_trip_and_refusal_on_another_commit(tmp_path):
    # One torch thread for the original; the reproduction starts with the machine's default and
    # must set it back from the run's threads.* params.
    proc = run_py(*TINY, *store_overrides(tmp_path), env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, explain(proc)
    (original,) = all_runs(tmp_path)
    assert original.params["threads.torch_intra_op"] == "1"
    assert original.params["threads.omp_num_threads"] == "1"
    assert original.params["threads.torch_inter_op"].isdigit()
    uri = seeded_store(tmp_path)

    # --force: this shared checkout may be dirty or have moved on; the check is tested below.
    drop = ("MLFLOW_TRACKING_URI", PARENT_RUN_ENV, "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    cli = subprocess.run(
        [sys.executable, "-m", "lpcvlab.cli", "reproduce", original.run_id, "--force"]
        + ["--tracking-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert cli.returncode == 0, explain(cli)
    assert "REPRODUCED" in cli.stdout and "NOT REPRODUCED" not in cli.stdout
    if (os.cpu_count() or 1) > 1:
        assert "OMP_NUM_THREADS=1" in cli.stdout + cli.stderr
    new = next(r for r in all_runs(tmp_path) if r.run_id != original.run_id)
    assert new.tags["reproduced_from"] == original.run_id
    assert new.params["cache.enabled"] == "False"
    assert not any(k.endswith("_from") and k.startswith("cache/") for k in new.tags)
    exact = [m for m in original.metrics if m.startswith(("recall_at", "hit_at", "parity"))]
    assert len(exact) >= 6
    assert {m: new.metrics[m] for m in exact} == {m: original.metrics[m] for m in exact}
    data = {k: v for k, v in original.params.items() if k.startswith("data/")}  # counts: params
    assert len(data) >= 2 and {k: new.params[k] for k in data} == data
    assert new.params == original.params | {"cache.enabled": "False"}

    # The logged commit is not HEAD: refuse and say which commit, without running anything.
    MlflowClient(tracking_uri=uri).set_tag(original.run_id, "git_commit", "0" * 40)
    with pytest.raises(ReproduceError, match="000000000000") as exc:
        reproduce(original.run_id, uri, _never_runs, current=CodeVersion(HEAD))
    assert HEAD[:12] in str(exc.value) and "--force" in str(exc.value)
    hydra = run_py(f"+reproduce={original.run_id}", *store_overrides(tmp_path))
    assert hydra.returncode == 1, explain(hydra)
    assert "refusing to reproduce" in hydra.stderr and "0000000000" in hydra.stderr
    assert len(all_runs(tmp_path)) == 2  # the refusals made no run


def test_a_run_that_did_not_finish_is_refused_unless_forced(monkeypatch):
    from lpcvlab.tracking import reproduce as rp

    failed = RunInfo(
        "f" * 32,
        "name",
        "FAILED",
        "1",
        0,
        {},
        {},
        {"git_commit": HEAD, "error": "ParityError: cosine 0.2 < 0.999\nmore"},
    )
    monkeypatch.setattr(rp, "open_store", lambda uri: object())
    monkeypatch.setattr(rp, "get_run", lambda client, run_id: failed)

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(rp, "load_run_config", reached)
    with pytest.raises(ReproduceError) as exc:
        reproduce(failed.run_id, "sqlite:///nowhere.db", _never_runs, current=CodeVersion(HEAD))
    message = str(exc.value)
    assert f"run {failed.run_id}: it ended FAILED (ParityError: cosine 0.2 < 0.999)" in message
    assert "--force" in message and "\n" not in message
    with pytest.raises(Reached):  # --force goes on to re-run it
        reproduce(
            failed.run_id,
            "sqlite:///nowhere.db",
            _never_runs,
            force=True,
            current=CodeVersion(HEAD),
        )


def test_thread_settings_are_restored(monkeypatch):
    import torch

    from lpcvlab.util.seeding import restore_threads, thread_params

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2  # a count unlike this process's (the tests run with 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        recorded = thread_params() | {"threads.torch_intra_op": str(other)}
        recorded["threads.omp_num_threads"] = "unset"
        changed = restore_threads(recorded)
        assert torch.get_num_threads() == other and "OMP_NUM_THREADS" not in os.environ
        assert "OMP_NUM_THREADS=unset" in changed and f"torch intra-op threads={other}" in changed
        assert restore_threads(thread_params()) == []  # nothing to change
        assert restore_threads({}) == []  # a run from before threads were recorded
    finally:
        torch.set_num_threads(before)
