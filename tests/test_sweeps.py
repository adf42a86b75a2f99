"""Multiruns as one MLflow parent with child runs; failures; latency budget; an MLflow server."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import compose_config
from lpcvlab_runs import TINY, all_runs, explain, run_py, store_overrides
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lpcvlab import app
from lpcvlab.config import load_settings
from lpcvlab.config.schema import BudgetConfig
from lpcvlab.errors import ConfigError, RuntimeStageError
from lpcvlab.objective import score
from lpcvlab.tracking.recorder import PARENT_RUN_ENV, start_run
from lpcvlab.tracking.store import RetryingClient
from lpcvlab.tracking.sweep import read_job_statuses, read_parent, sweep_overrides

# ----------------------------------------------------------------------------- fast


def _budget(budget=None, penalty=1.0):
    return BudgetConfig(latency_ms=budget, penalty=penalty)


METRICS = {"recall_at_10": 0.6, "latency_ms/image_encoder": 30.0, "latency_ms/text_encoder": 10.0}


def test_objective_without_budget_is_the_metric():
    obj = score("recall_at_10", _budget(), METRICS)
    assert obj.value == obj.raw == 0.6 and not obj.over_budget
    assert obj.total_latency_ms == 40.0 and obj.tags() == {}


def test_objective_over_budget_is_penalised_below_any_run_within_it():
    within = score("recall_at_10", _budget(50.0), METRICS)
    over = score("recall_at_10", _budget(20.0), METRICS)
    assert within.value == 0.6 and within.tags()["over_budget"] == "false"
    assert over.over_budget and over.tags()["over_budget"] == "true"
    assert over.value == pytest.approx(0.6 - 1.0 * 40.0 / 20.0)
    assert over.value < 0.0  # below every in-budget accuracy in [0, 1]
    slower = score("recall_at_10", _budget(20.0), METRICS | {"latency_ms/text_encoder": 30.0})
    assert slower.value < over.value  # among over-budget runs, faster ranks higher


def test_objective_errors_name_the_fix():
    with pytest.raises(ConfigError, match="recall_at_10"):
        score("top1", _budget(), METRICS)
    with pytest.raises(ConfigError, match="budget.latency_ms"):  # found when the config loads
        load_settings(compose_config("budget.latency_ms=0"))
    with pytest.raises(ConfigError, match="track.objective"):
        load_settings(compose_config("track.objective=top1"))


def test_sweep_overrides_keeps_only_what_varies():
    cfg = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": ["backbone=clip_tiny", "seed=0,1", "data.demo.num_images=8"]},
                "sweeper": {"params": {"preprocess": "lpcvc_sample,clip_mean_std"}},
            }
        }
    )
    assert sweep_overrides(cfg, swept_only=True) == [
        "seed=0,1",
        "preprocess=lpcvc_sample,clip_mean_std",
    ]
    assert len(sweep_overrides(cfg)) == 4


LOCKED = "(sqlite3.OperationalError) database is locked"
RACED = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
    "datasets.digest"
)


class _LockedOnce:
    def __init__(self, failures: int, message: str = LOCKED):
        self.calls = 0
        self.failures = failures
        self.message = message

    def log_batch(self, run_id: str) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(self.message)
        return run_id


def test_retrying_client_retries_locked_sqlite_and_nothing_else():
    flaky = _LockedOnce(failures=2)
    assert RetryingClient(flaky, delay_s=0.001).log_batch("r") == "r"
    assert flaky.calls == 3
    broken = _LockedOnce(failures=1, message="no such table: runs")
    with pytest.raises(RuntimeError, match="no such table"):
        RetryingClient(broken, delay_s=0.001).log_batch("r")
    assert broken.calls == 1


def test_retrying_client_retries_a_raced_dataset_insert():
    """Two joblib children logging one dataset at once: the loser's insert is retried (and then
    finds the row); other integrity errors are not."""
    raced = _LockedOnce(failures=1, message=RACED)
    assert RetryingClient(raced, delay_s=0.001).log_batch("r") == "r"
    assert raced.calls == 2
    other = _LockedOnce(failures=1, message=RACED.replace("datasets.", "runs."))
    with pytest.raises(RuntimeError, match="UNIQUE"):
        RetryingClient(other, delay_s=0.001).log_batch("r")
    # two jobs saving the runs table's view (an experiment tag) at once
    view = _LockedOnce(
        failures=1,
        message="UNIQUE constraint failed: experiment_tags.key, experiment_tags.experiment_id",
    )
    assert RetryingClient(view, delay_s=0.001).log_batch("r") == "r"


def test_run_job_exits_1_alone_but_lets_a_sweep_go_on(monkeypatch, capsys, tmp_path):
    from lpcvlab import pipeline
    from lpcvlab.tracking import sweep

    def fail(*args, **kwargs):
        raise ConfigError("backbone.pretrained=/nope: no such checkpoint file")

    monkeypatch.setattr(pipeline, "run_steps", fail)
    cfg = compose_config("backbone=clip_tiny")
    monkeypatch.setattr(app, "sweep_job", lambda: (False, {}))
    with pytest.raises(SystemExit) as exc:
        app.run_job(cfg)
    assert exc.value.code == 1
    assert "no such checkpoint file" in capsys.readouterr().err
    # In a sweep the job returns None, and its reason reaches the sweep callback through the
    # job's own output folder (any process may run the job), not through module state.
    monkeypatch.setattr(app, "sweep_job", lambda: (True, {"sweep_job": "3"}))
    monkeypatch.setattr(app, "hydra_dirs", lambda: (tmp_path, None))
    assert app.run_job(cfg) is None
    noted = sweep._job_error_path(tmp_path)
    assert noted.is_file() and "ConfigError" in noted.read_text()
    assert "no such checkpoint file" in noted.read_text()


class _Objective:
    value = 0.5


class _Result:
    objective = _Objective()


class _InFlight:
    """A hub's jobs in flight: done after ``polls`` looks; ``failure`` raised by the last."""

    interval_s = 0.0

    def __init__(self, polls: int, failure: Exception | None = None) -> None:
        self.left = polls
        self.failure = failure

    def poll(self) -> bool:
        self.left -= 1
        if self.left == 0 and self.failure is not None:
            raise self.failure
        return self.left <= 0


def _steps(inflight: _InFlight, seen: list[str]):
    def run_steps(*args, **kwargs):
        seen.append("local work")
        try:
            yield inflight
        except RuntimeStageError as exc:
            seen.append(f"thrown in: {exc}")
            raise
        seen.append("finished")
        return _Result()

    return run_steps


def test_run_job_waits_at_the_device_wait_or_defers_it_to_the_sweep(monkeypatch, tmp_path):
    """Alone (or under the basic / joblib launchers) a job waits at its device wait itself; under
    the aihub launcher (deferring_waits) a sweep job returns there, to be resumed; a job that
    fails while waiting has the failure thrown in at its wait."""
    from lpcvlab import pipeline

    cfg = compose_config("backbone=clip_tiny")
    seen: list[str] = []
    monkeypatch.setattr(pipeline, "run_steps", _steps(_InFlight(3), seen))
    monkeypatch.setattr(app, "sweep_job", lambda: (True, {"sweep_job": "0"}))
    monkeypatch.setattr(app, "hydra_dirs", lambda: (tmp_path, None))
    assert app.run_job(cfg) == 0.5  # waited here: no deferral asked for
    assert seen == ["local work", "finished"]

    seen.clear()
    inflight = _InFlight(2)
    monkeypatch.setattr(pipeline, "run_steps", _steps(inflight, seen))
    with app.deferring_waits():
        deferred = app.run_job(cfg)
    assert isinstance(deferred, app.DeferredJob) and seen == ["local work"]
    assert not deferred.poll() and deferred.poll()
    assert deferred.resume() == 0.5 and seen == ["local work", "finished"]

    seen.clear()
    failing = _InFlight(2, RuntimeStageError("image_encoder: AI Hub compile job j1 failed"))
    monkeypatch.setattr(pipeline, "run_steps", _steps(failing, seen))
    assert app.run_job(cfg) is None  # a sweep job's failure is noted, and the sweep goes on
    assert seen == ["local work", "thrown in: image_encoder: AI Hub compile job j1 failed"]
    from lpcvlab.tracking import sweep

    assert "compile job j1 failed" in sweep._job_error_path(tmp_path).read_text()


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One stage cache for the sweeps of this module: later sweeps reuse earlier exports."""
    return tmp_path_factory.mktemp("cache")


def _sweep_runs(tmp: Path):
    runs = all_runs(tmp)
    parents = [r for r in runs if r.tags.get("sweep") == "true"]
    assert len(parents) == 1, [r.name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.tags.get("mlflow.parentRunId") == parent.run_id]
    return parent, children, runs


@pytest.mark.slow
def test_two_by_two_joblib_sweep_is_one_parent_with_four_children(tmp_path, shared_cache):
    proc = run_py(
        "-m",
        *TINY,
        "preprocess=lpcvc_sample,clip_mean_std",
        "seed=0,1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *store_overrides(tmp_path, shared_cache),
    )
    assert proc.returncode == 0, explain(proc)
    parent, children, runs = _sweep_runs(tmp_path)
    assert len(runs) == 5 and len(children) == 4  # no lost runs in parallel
    assert parent.status == "FINISHED"
    assert parent.name == "sweep preprocess=lpcvc_sample,clip_mean_std seed=0,1"
    assert "JoblibLauncher" in parent.tags["launcher"]
    assert all(c.status == "FINISHED" for c in children)
    combos = {(c.params["preprocess.name"], c.params["seed"]) for c in children}
    assert combos == {(p, s) for p in ("lpcvc_sample", "clip_mean_std") for s in ("0", "1")}
    assert {c.tags["sweep_job"] for c in children} == {"0", "1", "2", "3"}

    m = parent.metrics
    assert (m["sweep/jobs"], m["sweep/finished"], m["sweep/failed"]) == (4, 4, 0)
    assert m["sweep/missing_runs"] == 0
    # the best objective; a tie goes to the lower total latency, then to the earlier job
    top = max(c.metrics["objective"] for c in children)
    tied = [c for c in children if c.metrics["objective"] == top]
    best = min(tied, key=lambda c: (c.metrics["latency_ms/total"], int(c.tags["sweep_job"])))
    assert parent.tags["best_run_id"] == best.run_id
    assert m["best/recall_at_10"] == best.metrics["recall_at_10"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    arts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"sweep_runs.csv", "pareto.png", "jobs.json", "config.yaml", "multirun.yaml"} <= arts
    table = client.download_artifacts(parent.run_id, "sweep_runs.csv", str(tmp_path))
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} == {c.run_id for c in children}
    assert {"preprocess", "seed", "recall_at_10", "latency_ms/total"} <= set(rows[0])
    png = client.download_artifacts(parent.run_id, "pareto.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sweep = tmp_path / "multirun"
    assert read_parent(sweep).run_id == parent.run_id
    assert [j.status for j in read_job_statuses(sweep)] == ["COMPLETED"] * 4
    assert f"Sweep {parent.run_id}: 4 job(s), 4 finished, 0 failed" in proc.stdout


@pytest.mark.slow
def test_a_failing_job_is_failed_and_counted_while_the_sweep_goes_on(tmp_path, shared_cache):
    # A threshold above 1 is unreachable: the second job raises a ParityError (a user error).
    proc = run_py(
        "-m",
        *TINY,
        "export.parity_threshold=0.999,1.5",
        *store_overrides(tmp_path, shared_cache),
    )
    # sweep.fail_on=any (the default): summarised first, then exit 1 so that scripts notice.
    assert proc.returncode == 1, explain(proc)
    assert "error: 1 of 2 sweep job(s) failed (sweep.fail_on=any)" in proc.stderr
    parent, children, _ = _sweep_runs(tmp_path)
    assert parent.status == "FINISHED"
    assert parent.metrics["sweep/jobs"] == 2 and parent.metrics["sweep/failed"] == 1
    by_threshold = {c.params["export.parity_threshold"]: c for c in children}
    assert by_threshold["0.999"].status == "FINISHED"
    failed = by_threshold["1.5"]
    assert failed.status == "FAILED" and failed.tags["error"].startswith("ParityError")
    assert parent.tags["best_run_id"] == by_threshold["0.999"].run_id
    jobs = read_job_statuses(tmp_path / "multirun")
    assert [j.failed for j in jobs] == [False, True]
    assert "ParityError" in jobs[1].error and jobs[1].objective is None
    assert "2 job(s), 1 finished, 1 failed" in proc.stdout


@pytest.mark.slow
def test_a_bug_in_a_job_still_leaves_a_summarised_failed_parent(tmp_path, shared_cache):
    # Job 1 hits a plain RuntimeError (tests/inject/sitecustomize.py): not a user error, so
    # Hydra's sweeper re-raises it after the batch and skips on_multirun_end.
    inject = str(Path(__file__).resolve().parent / "inject")
    inject = os.pathsep.join(filter(None, [inject, os.environ.get("PYTHONPATH")]))
    proc = run_py(
        "-m",
        *TINY,
        "hub.profile_iterations=2,3",
        *store_overrides(tmp_path, shared_cache),
        env_extra={"PYTHONPATH": inject, "LPCVLAB_TEST_BUG_IN_JOB": "1"},
    )
    assert proc.returncode == 1 and "injected bug in job 1" in proc.stderr
    parent, children, _ = _sweep_runs(tmp_path)
    assert parent.status == "FAILED" and "on_multirun_end" in parent.tags["error"]
    assert parent.metrics["sweep/jobs"] == 2 and parent.metrics["sweep/failed"] == 1
    assert sorted(c.status for c in children) == ["FAILED", "FINISHED"]


@pytest.mark.slow
def test_optuna_search_penalises_runs_over_the_latency_budget(tmp_path, shared_cache):
    proc = run_py(
        "hparams_search=retrieval_optuna",
        "hydra.sweeper.params.backbone='choice(clip_tiny)'",
        "hydra.sweeper.n_trials=2",
        "budget.latency_ms=0.001",  # nothing is this fast
        *TINY,
        *store_overrides(tmp_path, shared_cache),
    )
    assert proc.returncode == 0, explain(proc)
    parent, children, _ = _sweep_runs(tmp_path)
    assert "OptunaSweeper" in parent.tags["sweeper"] and len(children) == 2
    for c in children:
        assert c.tags["over_budget"] == "true"
        expected = c.metrics["recall_at_10"] - c.metrics["latency_ms/total"] / 0.001
        assert c.metrics["objective"] == pytest.approx(expected)
    assert parent.metrics["best/objective"] == max(c.metrics["objective"] for c in children)
    assert "Best value" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- a server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not ready after {timeout_s} s")


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to a server's process group, SIGKILL after ``grace_s``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with its uvicorn worker
    )  # fmt: skip
    try:
        _wait_ready(url, proc, timeout_s=120)
        yield url
    finally:
        _stop(proc, grace_s=20)
        log.close()


@pytest.mark.slow
def test_runs_nest_and_keep_artifacts_on_a_shared_mlflow_server(mlflow_server, tmp_path):
    local_root = tmp_path / "local-artifacts"
    tracking = OmegaConf.create({"uri": mlflow_server, "artifact_root": str(local_root)})
    with start_run(tracking, "team", "sweep parent", {"sweep": "true"}) as parent:
        os.environ[PARENT_RUN_ENV] = parent.run_id
        try:
            with start_run(tracking, "team", "job 0", {"track": "retrieval"}) as child:
                child.log_metrics({"recall_at_10": 0.5, "latency_ms/total": 12.0})
                child.log_params({"backbone.name": "clip_tiny"})
                child.log_text("backbone: clip_tiny\n", "config.yaml")
        finally:
            del os.environ[PARENT_RUN_ENV]
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.metrics["recall_at_10"] == 0.5
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server
    assert [a.path for a in client.list_artifacts(child.run_id)] == ["config.yaml"]
    assert list((tmp_path / "server-artifacts").rglob("config.yaml"))
    assert not local_root.exists()  # artifact_root applies to local stores only
