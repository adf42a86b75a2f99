"""A Hydra multirun as one MLflow parent run with every job as a child run.

:class:`MlflowSweepCallback` is registered under ``hydra.callbacks`` in ``conf/config.yaml``:

- ``on_multirun_start`` (the launching process) creates the parent run and writes its ID to
  ``<sweep dir>/.lpcvlab/parent_run.json`` and to ``$LPCVLAB_PARENT_RUN_ID``;
- ``on_job_start`` (in whichever process runs the job: the same one for the basic launcher, a
  worker for joblib, a cluster node for submitit) reads that file and sets the variable, which
  :func:`lpcvlab.tracking.recorder.start_run` turns into the ``mlflow.parentRunId`` tag; the file
  works where environment variables do not travel, as long as the sweep dir is on a shared disk;
- ``on_job_start`` also leaves ``<sweep dir>/.lpcvlab/jobs/<num>.started``, and ``on_job_end``
  writes ``<sweep dir>/.lpcvlab/jobs/<num>.json``: status, objective, error;
- ``on_multirun_end`` logs the summary on the parent (jobs, finished, failed, runs missing, the
  best run -- the highest ``objective``, a tie going to the lower ``latency_ms/total``, then to
  the earlier job, :func:`lpcvlab.tracking.compare.best_run` --, ``sweep_runs.csv``,
  ``pareto.png``), writes it with the runs' table (as much of it as fits MLflow's 8,000
  characters; the CSV has every run) and a link to the best child as the parent's description,
  registers the best child's models when ``sweep.register_best``
  (:mod:`lpcvlab.tracking.registry`), and ends it.

A sweep stopped by Ctrl-C or SIGTERM, whatever its launcher, ends through :func:`stop_sweep`
(called by ``lpcvlab.app.hydra_entry``): the parent is summarised and marked KILLED, every child
still RUNNING (a joblib worker the launcher killed) KILLED too, and one paragraph says how many
jobs finished, which were stopped, how many never started and how to resume.

A job that fails with a user error returns no objective (``lpcvlab.app.run_job``) and leaves its
reason in ``<job output dir>/.lpcvlab/job_error.txt`` for ``on_job_end``: its run is FAILED (or
never started, for a config that cannot run), the sweep goes on and the parent counts it. If the
sweep itself dies (an unexpected exception re-raised by Hydra's sweeper, Ctrl-C), an exit hook
still summarises what finished and ends the parent FAILED. Single runs are left alone (Hydra
builds the callback for them too, so this module imports MLflow and the recorder only inside the
methods that a multirun calls: a single run's config is checked before anything heavy is loaded).

A job that failed before its run existed (a config value of its own, ``seed=-1``) gets a FAILED
child run from ``on_job_end`` carrying the message, so every job is one row in the UI. After the
parent is summarised, ``sweep.fail_on`` decides whether the sweep fails as a whole
(:func:`sweep_failure`, read by ``lpcvlab.app.hydra_entry``, which then exits 1): ``any`` (the
default) when a job failed, ``all`` when every job did, ``never``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lpcvlab.errors import ConfigError, Interrupted, LpcvlabError
from lpcvlab.util.io import atomic_write_text

log = logging.getLogger(__name__)

STATE_DIR = ".lpcvlab"
PARENT_FILE = "parent_run.json"
JOBS_DIR = "jobs"
JOB_ERROR_FILE = "job_error.txt"
STARTED = ".started"  # <num>.started: the job began (in whichever process ran it)
# MLflow's limit on a tag's value, the description (mlflow.note.content) included.
NOTE_LIMIT = 8000


_verdict: list[str] = []  # why the last sweep of this process fails (see sweep_failure)


def sweep_failure() -> str | None:
    """Why the multirun this process launched fails under ``sweep.fail_on``, or None."""
    return _verdict[-1] if _verdict else None


def failure_verdict(fail_on: str, summary: SweepSummary, parent_id: str) -> str | None:
    """The one line a failing sweep ends with, or None when ``fail_on`` lets it pass."""
    failed = summary.failed
    if summary.jobs == 0 or failed == 0 or fail_on == "never":
        return None
    if fail_on == "all" and failed < summary.jobs:
        return None
    return (
        f"{failed} of {summary.jobs} sweep job(s) failed (sweep.fail_on={fail_on}); parent run "
        f"{parent_id} has each job's error (lpcvlab compare {parent_id}); "
        + (
            "sweep.fail_on=never exits 0 anyway"
            if fail_on == "all"
            else "sweep.fail_on=all fails only when every job fails, sweep.fail_on=never never"
        )
    )


def _job_error_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STATE_DIR / JOB_ERROR_FILE


def note_job_failure(output_dir: Path | None, message: str) -> None:
    """Record why a job failed, beside its output (it returns None rather than raising: see
    ``lpcvlab.app.run_job``); ``on_job_end`` reads it, in whichever process ran the job."""
    if output_dir is not None:
        atomic_write_text(_job_error_path(output_dir), message)


@dataclass(frozen=True)
class SweepParent:
    run_id: str
    tracking_uri: str
    experiment_id: str


@dataclass
class JobStatus:
    """One job's outcome, written by the process that ran it."""

    num: int
    overrides: list[str]
    status: str  # "COMPLETED" | "FAILED"
    objective: float | None
    error: str | None
    output_dir: str

    @property
    def failed(self) -> bool:
        return self.status != "COMPLETED"


@dataclass
class SweepSummary:
    jobs: int
    finished: int
    failed: int
    child_runs: int
    missing_runs: int
    best_run_id: str | None
    best_objective: float | None
    objective_name: str
    table: str = ""  # the runs side by side, as `lpcvlab compare` prints them
    best_run_name: str = ""
    stopped: str = ""  # how the sweep was stopped, when it was (see stop_sweep)

    def metrics(self) -> dict[str, float]:
        out = {
            "sweep/jobs": float(self.jobs),
            "sweep/finished": float(self.finished),
            "sweep/failed": float(self.failed),
            "sweep/child_runs": float(self.child_runs),
            "sweep/missing_runs": float(self.missing_runs),
        }
        if self.best_objective is not None:
            out["best/objective"] = self.best_objective
        return out


def is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def sweep_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir))


def read_parent(sweep: Path) -> SweepParent | None:
    path = sweep / STATE_DIR / PARENT_FILE
    if not path.is_file():
        return None
    return SweepParent(**json.loads(path.read_text()))


def read_job_statuses(sweep: Path) -> list[JobStatus]:
    jobs = []
    for path in sorted((sweep / STATE_DIR / JOBS_DIR).glob("*.json")):
        jobs.append(JobStatus(**json.loads(path.read_text())))
    return sorted(jobs, key=lambda j: j.num)


def sweep_overrides(config: DictConfig, swept_only: bool = False) -> list[str]:
    """The sweep's command-line overrides plus ``hydra.sweeper.params``; with ``swept_only``
    just those that vary (``a=1,2``, ``range(...)``, ``choice(...)``)."""
    overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task") or []]
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    overrides += [f"{k}={v}" for k, v in params.items()]
    if not swept_only:
        return overrides
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a sweeper-specific syntax Hydra's grammar does not know: keep them all
        return overrides
    return [text for text, o in zip(overrides, parsed, strict=True) if o.is_sweep_override()]


def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep would run: every combination of the basic sweeper's overrides,
    or the ``n_trials`` of a search (Optuna); None when the sweeper does not say."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
    if sweeper.endswith(".BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            parsed = OverridesParser.create().parse_overrides(sweep_overrides(config))
            return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
        except Exception:  # a syntax the grammar does not know: not counted
            return None
    trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
    return int(trials) if isinstance(trials, int) else None


def refuse_a_sweep_no_job_can_run(config: DictConfig) -> None:
    """Raise the one-line ConfigError of a config mistake that every job of the sweep shares.

    The sweep's base config (every override but the swept ones) is loaded as a run would load
    it. When that fails on a key or group that no swept override names, no job can run, so the
    sweep stops here: before any MLflow run or compute. When a swept value could change the
    outcome (the message names a swept key), the jobs are left to find out one by one.
    """
    from lpcvlab.config import load_settings

    body = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    try:
        load_settings(body)
    except ConfigError as exc:
        message = str(exc)
        swept = [o.split("=", 1)[0].lstrip("+~") for o in sweep_overrides(config, swept_only=True)]
        named = [k for k in swept if re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", message)]
        if not named:
            raise ConfigError(
                f"{message} (every job of this sweep has it: none was started)"
            ) from None


def _stop_the_sweep(exc: LpcvlabError) -> NoReturn:
    """Hydra turns a callback's exception into a warning and launches the jobs anyway: a mistake
    that every job shares stops the sweep here, in one line."""
    print(f"error: {exc}", file=sys.stderr)
    raise SystemExit(1) from None


_active: list[MlflowSweepCallback] = []  # the sweep this process launched (stop_sweep)


class MlflowSweepCallback(Callback):
    """Parent run for a multirun; see the module docstring."""

    def __init__(self) -> None:
        self._config: DictConfig | None = None
        self._parent: SweepParent | None = None
        self._done = False
        self._register_best = False
        self._registry_name: str | None = None
        self._fail_on = "any"
        self._expected: int | None = None

    # -- the launching process ---------------------------------------------------------

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            # Before the store is opened or a run exists, and before MLflow is imported.
            refuse_a_sweep_no_job_can_run(config)
        except LpcvlabError as exc:
            _stop_the_sweep(exc)
        from mlflow.tracking import MlflowClient

        from lpcvlab.tracking.naming import git_info, source_tags
        from lpcvlab.tracking.recorder import PARENT_RUN_ENV
        from lpcvlab.tracking.store import (
            RetryingClient,
            check_store,
            get_experiment_id,
            process_tags,
            resolve_uri,
        )

        try:
            uri = resolve_uri(str(config.tracking.uri))
            check_store(uri)
        except LpcvlabError as exc:
            _stop_the_sweep(exc)
        sweep = sweep_dir(config)
        client = RetryingClient(MlflowClient(tracking_uri=uri))
        exp_id = get_experiment_id(
            client, str(config.tracking.experiment), config.tracking.get("artifact_root")
        )
        overrides = sweep_overrides(config)
        tags = (
            {
                "sweep": "true",
                "sweep_dir": str(sweep.resolve()),
                "sweep_overrides": " ".join(overrides)[:5000],
                "sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")),
                "launcher": str(OmegaConf.select(config, "hydra.launcher._target_")),
                "track": str(config.track.name),
            }
            | git_info()
            | process_tags()
            | source_tags()  # entry point and the sweep's own command line
        )
        self._register_best = bool(OmegaConf.select(config, "sweep.register_best", default=False))
        self._fail_on = str(OmegaConf.select(config, "sweep.fail_on", default="any"))
        _verdict.clear()
        self._registry_name = OmegaConf.select(config, "tracking.registry_name", default=None)
        outer = os.environ.get(PARENT_RUN_ENV)  # a sweep may itself nest under a run
        if outer:
            tags["mlflow.parentRunId"] = outer
        base = config.tracking.get("run_name")
        swept = " ".join(sweep_overrides(config, swept_only=True))
        name = f"{base} (sweep)" if base else f"sweep {swept}".strip()
        run = client.create_run(exp_id, run_name=name[:250], tags=tags)
        self._parent = SweepParent(run.info.run_id, uri, exp_id)
        self._config = config
        client.log_text(run.info.run_id, _base_config_yaml(config), "config.yaml")

        state = sweep / STATE_DIR
        (state / JOBS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (state / JOBS_DIR).glob("*"):  # a re-used sweep dir
            stale.unlink()
        self._expected = expected_jobs(config)
        _active[:] = [self]
        _write_json(state / PARENT_FILE, asdict(self._parent))
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        atexit.register(self._finish_at_exit)
        log.info(
            "sweep parent run %s in experiment %s", run.info.run_id, config.tracking.experiment
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(config, status=None)

    # -- the process that runs a job -----------------------------------------------------

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        from lpcvlab.tracking.recorder import PARENT_RUN_ENV

        _job_error_path(config.hydra.runtime.output_dir).unlink(missing_ok=True)
        num = int(config.hydra.job.num)
        overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task") or []]
        _write_json(sweep_dir(config) / STATE_DIR / JOBS_DIR / f"{num:05d}{STARTED}", overrides)
        _plain_start_method()
        parent = read_parent(sweep_dir(config))
        if parent is not None:
            os.environ[PARENT_RUN_ENV] = parent.run_id

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not is_multirun(config):
            return
        noted = _job_error_path(config.hydra.runtime.output_dir)
        error = noted.read_text() if noted.is_file() else None
        objective: float | None = None
        try:
            value = job_return.return_value
        except Exception as exc:  # the job raised: Hydra re-raises it on access
            error = f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(value, int | float) and not math.isnan(float(value)):
                objective = float(value)
            elif error is None:
                error = f"the job returned no objective ({value!r}); see its log"
        status = JobStatus(
            num=int(config.hydra.job.num),
            overrides=[str(o) for o in job_return.overrides or []],
            status="COMPLETED" if error is None else "FAILED",
            objective=objective,
            error=error,
            output_dir=str(config.hydra.runtime.output_dir),
        )
        _write_json(
            sweep_dir(config) / STATE_DIR / JOBS_DIR / f"{status.num:05d}.json", asdict(status)
        )
        if status.failed:
            record_failed_job(config, status)

    # -- summary -------------------------------------------------------------------------

    def _finish_at_exit(self) -> None:
        if not self._done and self._config is not None:
            self._finish(self._config, status="FAILED")

    def _finish(
        self, config: DictConfig, status: str | None, stop: Interrupted | None = None
    ) -> str:
        """Summarise and end the parent; ``status`` None = decide from the jobs. ``stop``: the
        sweep was interrupted; returns the paragraph that says so (else the summary)."""
        if self._done or self._parent is None:
            return ""
        self._done = True
        from mlflow.tracking import MlflowClient

        from lpcvlab.tracking.recorder import NOTE_TAG, PARENT_RUN_ENV
        from lpcvlab.tracking.store import RetryingClient

        client = RetryingClient(MlflowClient(tracking_uri=self._parent.tracking_uri))
        run_id = self._parent.run_id
        paragraph = ""
        try:
            if stop is not None:
                status = "KILLED"
                stopped = _kill_orphans(client, run_id, stop)
            summary = summarise_sweep(client, run_id, sweep_dir(config))
            if stop is not None:
                paragraph = stop_paragraph(
                    client, stop, summary, run_id, config, self._expected, stopped
                )
                summary.stopped = paragraph
                client.set_tag(run_id, "error", f"interrupted ({stop.signal_name})")
            elif status is None:
                all_failed = summary.jobs > 0 and summary.failed == summary.jobs
                status = "FAILED" if all_failed else "FINISHED"
            else:
                client.set_tag(
                    run_id,
                    "error",
                    "the sweep ended before Hydra's on_multirun_end (a job raised an unexpected "
                    "exception); see the console and job logs",
                )
            registered = []
            if self._register_best and status == "FINISHED" and summary.best_run_id:
                registered = self._register(client, summary.best_run_id)
            text = summary_text(summary, run_id, registered)
            client.set_tag(run_id, NOTE_TAG, _note(text, summary, self._parent.experiment_id))
            if stop is None:
                print("\n" + text)
            verdict = failure_verdict(self._fail_on, summary, run_id)
            if verdict is not None and stop is None:
                _verdict.append(verdict)
        finally:
            client.set_terminated(run_id, status=status or "FAILED")
            os.environ.pop(PARENT_RUN_ENV, None)
            _active.clear()
        return paragraph

    def _register(self, client: Any, best_run_id: str) -> list[str]:
        """Register the best child's models (``sweep.register_best``); a failure is reported
        and tagged on the parent, and the sweep still ends as its jobs decided."""
        from lpcvlab.errors import LpcvlabError
        from lpcvlab.tracking.registry import register_run

        assert self._parent is not None
        try:
            versions = register_run(client, best_run_id, self._registry_name)
        except LpcvlabError as exc:
            log.error("sweep.register_best: %s", exc)
            client.set_tag(self._parent.run_id, "register_error", str(exc)[:5000])
            return [f"not registered: {exc}"]
        lines = [v.line() for v in versions]
        client.set_tag(self._parent.run_id, "registered", "; ".join(lines)[:5000])
        return lines


def stop_sweep(stop: Interrupted) -> str | None:
    """End the sweep this process launched, stopped by ``stop`` (Ctrl-C, SIGTERM): its parent
    summarised and KILLED, every child still RUNNING KILLED; returns the paragraph to print
    (None when no sweep is running here: a single run says its own)."""
    if not _active:
        return None
    callback = _active[0]
    if callback._config is None:
        return None
    return callback._finish(callback._config, status="KILLED", stop=stop) or None


def _kill_orphans(client: Any, parent_id: str, stop: Interrupted) -> list[str]:
    """Children of the stopped sweep still RUNNING whose process is gone (a joblib worker its
    launcher killed before the run could end itself) or that this process ran: KILLED. A child
    whose process is still alive and ending by itself is given a few seconds. Returns the IDs of
    every KILLED child."""
    from lpcvlab.tracking.runstore import child_runs
    from lpcvlab.tracking.store import PID_TAG, STARTED_TAG, process_alive

    deadline = time.monotonic() + 10.0
    while True:
        children = child_runs(client, parent_id)
        running = [c for c in children if c.status == "RUNNING"]
        alive = [
            c
            for c in running
            if c.tags.get(PID_TAG) != str(os.getpid())
            and process_alive(c.tags.get(PID_TAG), c.tags.get(STARTED_TAG))
        ]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for c in running:
        if c in alive:
            continue
        client.set_tag(c.run_id, "error", f"interrupted ({stop.signal_name}): the sweep stopped")
        client.set_terminated(c.run_id, status="KILLED")
    killed = {c.run_id for c in children if c.status == "KILLED"}
    return sorted(killed | {c.run_id for c in running if c not in alive})


def stop_paragraph(
    client: Any,
    stop: Interrupted,
    summary: SweepSummary,
    parent_id: str,
    config: DictConfig,
    expected: int | None,
    stopped_runs: Sequence[str],
) -> str:
    """What a stopped sweep prints and its parent's description says: the jobs finished, which
    were stopped (with their KILLED runs), how many never started, and how to resume."""
    from lpcvlab.tracking.naming import command_line

    sweep = sweep_dir(config)
    statuses = {j.num for j in read_job_statuses(sweep)}
    started = read_started(sweep)
    halted = {n: o for n, o in started.items() if n not in statuses}
    never = max(0, expected - len(started)) if expected is not None else None
    runs = _runs_by_job(client, stopped_runs)
    parts = [
        f"Stopped by {stop.signal_name}. Sweep parent run {parent_id} is marked KILLED: "
        f"{summary.finished} of {expected if expected is not None else summary.jobs} job(s) "
        f"finished, {summary.failed} failed"
    ]
    if halted:
        from lpcvlab.tracking.naming import override_key

        swept = {override_key(o) for o in sweep_overrides(config, swept_only=True)}
        shown = {n: [x for x in o if override_key(x) in swept] or o for n, o in halted.items()}
        jobs = "; ".join(
            f"#{n} ({' '.join(o) or 'no overrides'}"
            + (f", MLflow run {runs[n]}" if n in runs else "")
            + ")"
            for n, o in sorted(shown.items())
        )
        parts.append(f"stopped, KILLED with what they had logged: {jobs}")
    if never is not None:
        parts.append(f"{never} never started")
    cache = OmegaConf.select(config, "cache.dir", default=None)
    aihub = OmegaConf.select(config, "hub.name", default="") == "aihub"
    kept = (
        f"Finished exports and hub results stay in the stage cache ({cache})"
        + (" and the AI Hub job ledger (jobs still running on AI Hub are picked up, not paid again)"
           if aihub else "")
        + ", so running the same command again picks up from there: "
        + command_line()
        + f". What finished: lpcvlab compare {parent_id}."
    )  # fmt: skip
    return "; ".join(parts) + ". " + kept


def read_started(sweep: Path) -> dict[int, list[str]]:
    """Jobs that began (``on_job_start``), by number, with their overrides."""
    out = {}
    for path in sorted((sweep / STATE_DIR / JOBS_DIR).glob(f"*{STARTED}")):
        try:
            out[int(path.name.removesuffix(STARTED))] = list(json.loads(path.read_text()))
        except (ValueError, OSError):
            continue
    return out


def _runs_by_job(client: Any, run_ids: Sequence[str]) -> dict[int, str]:
    """The stopped children's sweep job numbers (tag ``sweep_job``) and run IDs."""
    out = {}
    for run_id in run_ids:
        job = client.get_run(run_id).data.tags.get("sweep_job", "")
        if job.isdigit():
            out[int(job)] = run_id
    return out


def record_failed_job(config: DictConfig, status: JobStatus) -> str | None:
    """Give a failed job that has no MLflow run (its config stopped it before the run began) a
    FAILED child run under the sweep's parent carrying the message; returns its ID, or None when
    the job has a run already or there is no parent to nest under."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from lpcvlab.tracking.naming import COMMAND_TAG, git_info
    from lpcvlab.tracking.store import RetryingClient, process_tags, resolve_uri
    from lpcvlab.util.secrets import mask_secrets

    parent = read_parent(sweep_dir(config))
    if parent is None:
        return None
    client = RetryingClient(MlflowClient(tracking_uri=resolve_uri(parent.tracking_uri)))
    existing = client.search_runs(
        [parent.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent.run_id}' and tags.sweep_job = '{status.num}'"
        ),
        max_results=1,
    )
    if existing:
        return None
    overrides = [str(o) for o in OmegaConf.select(config, "hydra.overrides.task") or []]
    message = (status.error or "the job failed; see its log")[:5000]
    tags = (
        {
            "mlflow.parentRunId": parent.run_id,
            "sweep_job": str(status.num),
            "sweep_overrides": " ".join(overrides)[:5000],
            COMMAND_TAG: " ".join(["python", "run.py", *mask_secrets(overrides)])[:5000],
            "error": message,
            "mlflow.source.name": "run.py",
            "failure": "before-run",
        }
        | git_info()
        | process_tags()
    )
    run = client.create_run(parent.experiment_id, run_name=f"job {status.num} (failed)", tags=tags)
    run_id = run.info.run_id
    params = {}
    for text in mask_secrets(overrides):
        key, _, value = text.lstrip("+~").partition("=")
        if key and not key.startswith("hydra"):
            params[key] = value[:6000]
    if params:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_text(run_id, message + "\n", "error.txt")
    client.set_terminated(run_id, status="FAILED")
    return run_id


def _plain_start_method() -> None:
    """In a joblib (loky) worker the default start method is "loky"; a process this job starts
    with the standard library (the local runtime profiles in a fresh one) would be told to use
    it, fail to find it in a plain interpreter, and die at start, over and over. Use "spawn"."""
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) == "loky":
        multiprocessing.set_start_method("spawn", force=True)


def summarise_sweep(client: Any, parent_id: str, sweep: Path) -> SweepSummary:
    """Log the sweep's outcome on its parent run and return it."""
    from mlflow.entities import Metric, RunTag

    from lpcvlab.tracking.compare import (
        best_run,
        build_comparison,
        objective_name,
        plot_pareto,
    )
    from lpcvlab.tracking.runstore import child_runs

    children = child_runs(client, parent_id)
    jobs = read_job_statuses(sweep)
    n_jobs = len(jobs) if jobs else len(children)
    failed = sum(j.failed for j in jobs) if jobs else sum(c.status == "FAILED" for c in children)
    finished = [c for c in children if c.status == "FINISHED"]
    best = best_run(finished)
    obj_name = objective_name(children[0]) if children else "objective"
    summary = SweepSummary(
        jobs=n_jobs,
        finished=len(finished),
        failed=failed,
        child_runs=len(children),
        missing_runs=max(0, n_jobs - len(children)),
        best_run_id=best.run_id if best else None,
        best_objective=best.metrics["objective"] if best else None,
        objective_name=obj_name,
        best_run_name=best.name if best else "",
    )
    metrics = summary.metrics()
    tags: dict[str, str] = {}
    if best is not None:
        metrics[f"best/{obj_name}"] = best.metrics.get(obj_name, math.nan)
        tags |= {"best_run_id": best.run_id, "best_run_name": best.name}
        if best.tags.get("sweep_overrides"):
            tags["best_overrides"] = best.tags["sweep_overrides"]
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if math.isfinite(v)],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "jobs.json").write_text(json.dumps([asdict(j) for j in jobs], indent=1))
        client.log_artifact(parent_id, str(tmpdir / "jobs.json"))
        if children:
            comparison = build_comparison(children)
            summary.table = fitting_table(comparison, NOTE_LIMIT // 2)
            client.log_artifact(parent_id, str(comparison.to_csv(tmpdir / "sweep_runs.csv")))
            plot = plot_pareto(comparison, tmpdir / "pareto.png", title=f"sweep {parent_id[:8]}")
            if plot is not None:
                client.log_artifact(parent_id, str(plot))
        multirun_yaml = sweep / "multirun.yaml"
        if multirun_yaml.is_file():
            client.log_artifact(parent_id, str(multirun_yaml))
    return summary


def summary_text(summary: SweepSummary, parent_id: str, registered: Sequence[str] = ()) -> str:
    """What the sweep prints when it ends, and the start of its parent's description."""
    lines = [
        f"Sweep {parent_id}: {summary.jobs} job(s), {summary.finished} finished, "
        f"{summary.failed} failed"
        + (f", {summary.missing_runs} without an MLflow run" if summary.missing_runs else ""),
    ]
    if summary.stopped:
        lines.append(summary.stopped)
    if summary.best_run_id:
        lines.append(
            f"best by objective ({summary.objective_name}, budget applied; a tie goes to the "
            f"lower latency_ms/total, then the earlier job): run {summary.best_run_id} = "
            f"{summary.best_objective:.4f}"
        )
    lines += [f"best run registered: {line}" for line in registered]
    lines.append(f"compare: lpcvlab compare {parent_id}")
    return "\n".join(lines)


def _note(text: str, summary: SweepSummary, experiment_id: str) -> str:
    """The parent's description (markdown): a link to the best child first (the UI shows a
    description's first lines), then the summary and the runs' table, under MLflow's limit on a
    tag (the table cut to the best runs where needed; ``sweep_runs.csv`` has them all)."""
    from lpcvlab.tracking.views import ui_link

    note = ""
    if summary.best_run_id:
        link = ui_link(experiment_id, summary.best_run_id)
        note = (
            f"Best run: [{summary.best_run_name or summary.best_run_id}]({link}), "
            f"objective {summary.best_objective:.4f} ({summary.objective_name}, budget "
            "applied)\n\n"
        )
    room = NOTE_LIMIT - len(note) - len(text) - 20
    if room < 200:  # a long stop paragraph and summary: the table is the artifact alone
        text = text[: max(0, NOTE_LIMIT - len(note) - 100)]
        table = "the runs: the sweep_runs.csv artifact"
    else:
        table = summary.table if len(summary.table) <= room else _cut(summary.table, room)
    return note + f"```text\n{text}\n\n{table}\n```\n"


def _cut(table: str, room: int) -> str:
    """A table cut to its first lines within ``room`` characters, saying where the rest is."""
    tail = "... (more runs: the sweep_runs.csv artifact)"
    kept = []
    used = len(tail) + 1
    for line in table.splitlines():
        if used + len(line) + 1 > room:
            break
        kept.append(line)
        used += len(line) + 1
    return "\n".join([*kept, tail])


def fitting_table(comparison: Any, room: int) -> str:
    """The runs' table in at most ``room`` characters: every run when it fits, else the best
    runs first (:func:`lpcvlab.tracking.compare.ranking`) and a line saying how many more the
    ``sweep_runs.csv`` artifact holds."""
    import dataclasses

    from lpcvlab.tracking.compare import ranking

    full = comparison.render()
    if len(full) <= room:
        return full
    n = len(comparison.runs)
    order = sorted(range(n), key=lambda i: ranking(comparison.runs[i]))

    def first(k: int) -> str:
        part = dataclasses.replace(
            comparison,
            runs=[comparison.runs[i] for i in order[:k]],
            rows=[comparison.rows[i] for i in order[:k]],
        )
        return (
            part.render()
            + f"\n({n - k} more run(s), all in the sweep_runs.csv artifact; best first)"
        )

    lo, hi = 0, n  # the most rows that fit: binary search (a render per try)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(first(mid)) <= room:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return f"{n} run(s): the table is the sweep_runs.csv artifact"
    return first(lo)


def _base_config_yaml(config: DictConfig) -> str:
    """The sweep's base config without the hydra node, resolved where it can be."""
    body = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    try:
        return OmegaConf.to_yaml(body, resolve=True)
    except Exception:  # an interpolation that only resolves inside a job (hydra:job.num, ...)
        return OmegaConf.to_yaml(body)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))
