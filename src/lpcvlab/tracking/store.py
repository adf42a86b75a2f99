"""The MLflow store: where runs go, whether it can take one, and the runs left behind.

A store that cannot be used is found before any work (:func:`check_store`), with a message
naming its URI. A run whose process died without a word (SIGKILL, out of memory, power loss) is
found later by its ``host`` and ``pid`` tags and marked FAILED (:func:`prune_vanished`).
Parallel sweep jobs share one SQLite file: :class:`RetryingClient` retries what SQLite refuses
while another writer holds it.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from lpcvlab.errors import TrackingStoreError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


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
# Two jobs logging the same dataset (or saving the same experiment tag: the runs table's view) at
# once: both find it absent, one insert wins and the other's transaction is rolled back; on the
# retry the store finds the row and links (updates) it.
_RACED = ("unique constraint failed: datasets.", "unique constraint failed: experiment_tags.")


class RetryingClient:
    """An MlflowClient whose calls are retried while a SQLite store is locked.

    Parallel sweep jobs (``hydra/launcher=joblib``) write to one SQLite file; MLflow waits on a
    busy database, but SQLite refuses a writer outright in some lock upgrades ("database is
    locked"), and two jobs logging one dataset at the same moment race on its insert. The
    failed transaction is rolled back, so retrying it is safe.
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
                    locked = any(m in str(exc).lower() for m in _LOCKED + _RACED)
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


def prune_store(uri: str) -> None:
    """Mark this host's runs whose process vanished as FAILED, and say which (a run killed with
    SIGKILL, or by the out-of-memory killer, would otherwise stay RUNNING forever)."""
    from mlflow.tracking import MlflowClient

    for gone in prune_vanished(MlflowClient(tracking_uri=uri)):
        log.warning(
            "MLflow run %s (%s) was still RUNNING but its process %s is gone: marked FAILED "
            "(failure=process-vanished)",
            gone.run_id,
            gone.name,
            gone.pid,
        )
