"""MLflow run ownership: one Hydra job = one run; params, tags, metrics and artifacts.

The store defaults to ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``;
``tracking.uri=`` or ``MLFLOW_TRACKING_URI`` points at a shared server instead. Secrets never
reach params, tags or artifacts: keys that name a token, secret, password or key are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lpcvlab.types import JobEvent

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "LPCVLAB_PARENT_RUN_ID"
_SECRET = re.compile(r"(token|secret|password|passwd|api_key|apikey|credential)", re.IGNORECASE)
_MAX_PARAM = 6000
_BATCH = 100


def is_secret_key(key: str) -> bool:
    return bool(_SECRET.search(key))


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
    """Commit and dirtiness of the code that ran (``git_dirty`` ignores untracked files)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit,
    }


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite store's folder exist (MLflow will not create it)."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def is_local_store(uri: str) -> bool:
    """A store on this machine's disk (SQLite, file), as opposed to a tracking server."""
    return "://" not in uri or uri.startswith(("sqlite:", "file:"))


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
    tracking: Any,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> Iterator[RunRecorder]:
    """Open a run; it ends FINISHED, FAILED (with ``error.txt``) or KILLED (Ctrl-C)."""
    uri = resolve_uri(str(tracking.uri))
    client: Any = RetryingClient(MlflowClient(tracking_uri=uri))
    exp_id = get_experiment_id(client, experiment, tracking.get("artifact_root"))
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
    all_tags = dict(tags)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    rec = RunRecorder(client, run.info.run_id, uri)
    try:
        yield rec
    except KeyboardInterrupt:
        rec.set_tags({"error": "interrupted (KeyboardInterrupt)"})
        client.set_terminated(rec.run_id, status="KILLED")
        raise
    except BaseException as exc:
        rec.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "error.txt"
            p.write_text("".join(traceback.format_exception(exc)))
            rec.log_artifact(p)
        client.set_terminated(rec.run_id, status="FAILED")
        raise
    else:
        client.set_terminated(rec.run_id, status="FINISHED")
