"""MLflow run ownership: one Hydra job = one run; params, tags, metrics and artifacts.

The store defaults to ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``;
``tracking.uri=`` or ``MLFLOW_TRACKING_URI`` points at a shared server instead. Secrets never
reach params, tags or artifacts: keys that name a token, secret, password or key are dropped.

Runs always end: FINISHED, FAILED (``error`` tag, ``error.txt``) or KILLED (Ctrl-C or SIGTERM,
``error`` tag naming the signal). A run whose process died without a word (SIGKILL, out of
memory, power loss) is found later by its ``host`` and ``pid`` tags and marked FAILED
(:func:`prune_vanished`). A store that cannot be used is found before any work
(:func:`check_store`), with a message naming its URI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import psutil
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lpcvlab.config.schema import TrackingConfig
from lpcvlab.errors import Interrupted, TrackingStoreError
from lpcvlab.secrets import is_secret_key
from lpcvlab.types import JobEvent

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "LPCVLAB_PARENT_RUN_ID"
_MAX_PARAM = 6000
_BATCH = 100


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay one value; secret keys are dropped."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if is_secret_key(str(k)):
                continue
            out.update(flatten(v, key))
    else:
        out[prefix] = json.dumps(tree) if isinstance(tree, list | tuple) else str(tree)
    return out


def git_info(cwd: Path | None = None) -> dict[str, str]:
    """Commit and dirtiness of the lpcvlab checkout that ran (``git_dirty`` ignores untracked
    files). MLflow records the entry point's commit itself (``mlflow.source.git.commit``) but
    not whether the tree was dirty, which ``lpcvlab reproduce`` needs."""
    if cwd is None:
        cwd = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite store's folder exist (MLflow will not create it); a folder that
    cannot be made is reported by :func:`check_store`."""
    if uri.startswith("sqlite:"):
        database, _ = _sqlite_path(uri)
        if database and database != ":memory:":
            path = Path(database.removeprefix("file:").split("?")[0])
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass
    return uri


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (SQLite, file), as opposed to a tracking server."""
    return "://" not in uri or uri.startswith(("sqlite:", "file:"))


def _sqlite_path(uri: str) -> tuple[str, bool]:
    """(database path or SQLite URI filename, whether it is a URI filename) of a sqlite URI."""
    from sqlalchemy.engine import make_url

    url = make_url(uri)
    database = url.database or ""
    if url.query.get("uri") in ("true", "1") and database.startswith("file:"):
        query = "&".join(f"{k}={v}" for k, v in url.query.items() if k != "uri")
        return f"{database}?{query}" if query else database, True
    return database, False


def check_store(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming ``uri``, when the store cannot take a run: a folder that cannot
    be created or written, a read-only or locked database, a server that does not answer.
    (MLflow itself would retry for minutes, then print a database traceback.)"""
    if uri.startswith("sqlite:"):
        database, is_uri = _sqlite_path(uri)
        if not database or database == ":memory:":
            return
        path = Path(database.removeprefix("file:").split("?")[0])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingStoreError(
                f"MLflow store {uri}: cannot create the folder {path.parent} "
                f"({exc.strerror or exc}); set tracking.uri (or MLFLOW_TRACKING_URI) to a "
                "writable place"
            ) from None
        if not path.exists() and not is_uri:
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise TrackingStoreError(
                    f"MLflow store {uri}: the folder {path.parent} is not writable; set "
                    "tracking.uri (or MLFLOW_TRACKING_URI) to a writable place"
                )
            return
        try:
            con = sqlite3.connect(database, uri=is_uri, timeout=timeout_s, isolation_level=None)
            try:  # a write that is rolled back: read-only files and mounts fail here
                con.execute("BEGIN IMMEDIATE")
                con.execute("CREATE TABLE _lpcvlab_write_probe (x)")
                con.execute("ROLLBACK")
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise TrackingStoreError(
                f"MLflow store {uri} cannot be written ({exc}); check the file's permissions and "
                "that no other program holds it, or set tracking.uri (or MLFLOW_TRACKING_URI) to "
                "another store"
            ) from None
    elif uri.startswith(("http://", "https://")):
        import requests

        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            if isinstance(exc, requests.ConnectionError):
                reason = "connection refused or host unreachable"
            elif isinstance(exc, requests.Timeout):
                reason = f"no answer within {timeout_s:g} s"
            raise TrackingStoreError(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it (`mlflow "
                "server ...`, docs/scaling.md) or set tracking.uri (or MLFLOW_TRACKING_URI)"
            ) from None
        if answer.status_code >= 500:
            raise TrackingStoreError(
                f"MLflow tracking server {uri} answers HTTP {answer.status_code} on /health; "
                "check the server's log"
            )
    elif uri.startswith("file:") or "://" not in uri:
        folder = Path(uri.removeprefix("file://").removeprefix("file:"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingStoreError(
                f"MLflow store {uri}: cannot create {folder} ({exc.strerror or exc}); set "
                "tracking.uri to a writable place"
            ) from None


# ----------------------------------------------------------------------------- processes

HOST_TAG, PID_TAG, STARTED_TAG = "host", "pid", "process_started"
FAILURE_TAG = "failure"
VANISHED = "process-vanished"


def process_tags() -> dict[str, str]:
    """This process, as tags: a RUNNING run whose process is gone can then be recognised."""
    proc = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(proc.pid),
        STARTED_TAG: f"{proc.create_time():.2f}",
    }


def process_alive(pid: str | None, started: str | None) -> bool:
    """Whether the process a run recorded still runs (the same process, not a reused PID)."""
    try:
        proc = psutil.Process(int(pid or ""))
        if started and abs(proc.create_time() - float(started)) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass(frozen=True)
class VanishedRun:
    run_id: str
    name: str
    experiment_id: str
    pid: str


def prune_vanished(client: Any) -> list[VanishedRun]:
    """Mark this host's RUNNING runs whose process is gone as FAILED
    (``failure=process-vanished``); returns them. Runs of other hosts are left alone."""
    host = socket.gethostname().replace("'", "")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    runs = client.search_runs(
        exp_ids,
        filter_string=f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'",
        max_results=1000,
    )
    gone = []
    for run in runs:
        tags = run.data.tags
        if process_alive(tags.get(PID_TAG), tags.get(STARTED_TAG)):
            continue
        client.set_tag(run.info.run_id, FAILURE_TAG, VANISHED)
        client.set_tag(
            run.info.run_id,
            "error",
            f"process {tags.get(PID_TAG)} on {host} ended without closing the run (killed, out "
            "of memory, or the machine went down)",
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        gone.append(
            VanishedRun(
                run.info.run_id,
                run.info.run_name or "",
                run.info.experiment_id,
                tags.get(PID_TAG, "?"),
            )
        )
    return gone


_LOCKED = ("database is locked", "database table is locked")


class RetryingClient:
    """An MlflowClient whose calls are retried while a SQLite store is locked.

    Parallel sweep jobs (``hydra/launcher=joblib``) write to one SQLite file; MLflow waits on a
    busy database, but SQLite refuses a writer outright in some lock upgrades ("database is
    locked"). The failed transaction is rolled back, so retrying it is safe.
    """

    def __init__(self, client: MlflowClient, attempts: int = 8, delay_s: float = 0.2) -> None:
        self._client = client
        self._attempts = attempts
        self._delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(self._attempts):
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    locked = any(m in str(exc).lower() for m in _LOCKED)
                    if not locked or attempt == self._attempts - 1:
                        raise
                    log.debug("MLflow store locked (%s); retrying %s", exc, name)
                    time.sleep(min(5.0, self._delay_s * 2**attempt))
            raise AssertionError("unreachable")

        return call


def get_experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The experiment's ID, creating it if needed. ``artifact_root`` applies to a local store
    only: a tracking server keeps artifacts where it is told to (``--artifacts-destination``)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root and is_local_store(str(client.tracking_uri)):
        root = Path(artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first (parallel sweep jobs)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunRecorder:
    """Writes into one MLflow run; handed to tracks as their :class:`RunLog`."""

    def __init__(self, client: MlflowClient, run_id: str, tracking_uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri

    def log_params(self, params: dict[str, str]) -> None:
        items = [
            Param(k, v if len(v) <= _MAX_PARAM else v[: _MAX_PARAM - 3] + "...")
            for k, v in params.items()
            if not is_secret_key(k)
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def on_job(self, event: JobEvent) -> None:
        """Record a remote job the moment it exists, so a later failure cannot lose it."""
        base = f"aihub/{event.component}/{event.kind}_job"
        tags = {base: event.job_id}
        if event.url:
            tags[f"{base}_url"] = event.url
        if event.status and event.status.startswith("SHARED with "):
            # Sharing is the LPCVC submission step: kept apart from the job's state.
            tags[f"{base}_shared_with"] = event.status.removeprefix("SHARED with ")
        elif event.status:
            tags[f"{base}_status"] = event.status
        self.set_tags(tags)


@contextmanager
def start_run(
    tracking: TrackingConfig,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> Iterator[RunRecorder]:
    """Open a run (MLflow's ``start_run``: it adds the source and git tags, and nests the run
    under ``parent_run_id`` or the sweep's parent); it ends FINISHED, FAILED (with
    ``error.txt``) or KILLED (Ctrl-C or SIGTERM)."""
    uri = resolve_uri(str(tracking.uri))
    client: Any = RetryingClient(MlflowClient(tracking_uri=uri))
    exp_id = get_experiment_id(client, experiment, tracking.artifact_root)
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    mlflow.set_tracking_uri(uri)
    if mlflow.active_run() is not None:  # a run another caller left open in this process
        mlflow.end_run()
    all_tags = dict(tags) | process_tags()
    active = mlflow.start_run(
        experiment_id=exp_id, run_name=run_name, tags=all_tags, parent_run_id=parent
    )
    rec = RunRecorder(client, active.info.run_id, uri)
    try:
        yield rec
    except KeyboardInterrupt as exc:
        how = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        rec.set_tags({"error": f"interrupted ({how})"})
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as exc:
        rec.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "error.txt"
            p.write_text("".join(traceback.format_exception(exc)))
            rec.log_artifact(p)
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
