"""MLflow run ownership: one Hydra job = one run; params, tags, metrics and artifacts.

The store defaults to ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``;
``tracking.uri=`` or ``MLFLOW_TRACKING_URI`` points at a shared server instead. Secrets never
reach params, tags or artifacts: keys that name a token, secret, password or key are dropped.

Runs always end: FINISHED, FAILED (``error`` tag, ``error.txt``) or KILLED (Ctrl-C or SIGTERM,
``error`` tag naming the signal). A run whose process died without a word (SIGKILL, out of
memory, power loss) is found later by its ``host`` and ``pid`` tags and marked FAILED
(:func:`prune_vanished`). A store that cannot be used is found before any work
(:func:`check_store`), with a message naming its URI.

Beyond params, metrics and tags a run uses MLflow's own records, so that its page reads well:
the data it read as dataset inputs (:meth:`RunRecorder.log_datasets`), each exported component
as a logged model in the ONNX flavour (:func:`log_onnx_model`; a file already logged, by sha256,
is linked rather than stored again), metrics linked to those models and datasets, AI Hub job
IDs as model tags as the jobs appear (:meth:`RunRecorder.on_job`), the results table as the run's
description (:meth:`RunRecorder.set_note`), source tags with the command line, and MLflow's
system metrics while it runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import psutil
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    RunTag,
)
from mlflow.tracking import MlflowClient

from lpcvlab.config.schema import TrackingConfig
from lpcvlab.errors import Interrupted, TrackingStoreError
from lpcvlab.types import DatasetRecord, JobEvent
from lpcvlab.util.secrets import is_secret_key, mask_secrets

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "LPCVLAB_PARENT_RUN_ID"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI (markdown)
COMMAND_TAG = "command"
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


# ----------------------------------------------------------------------------- run names

# Overrides that say where a run writes or how long it measures, not what it is: never in a name.
_PLUMBING = ("tracking.", "paths.", "hydra.", "cache.", "sweep.", "reproduce")
_PLUMBING_KEYS = frozenset(
    {
        "hub.profile_iterations",
        "hub.warmup_iterations",
        "hub.poll_interval_s",
        "hub.connect_timeout_s",
        "hub.ledger_path",
        "hub.chunk_bytes",
        "export.parity_samples",
        "data.workers",
    }
)
NAME_MAX = 100  # characters: what the runs table shows without widening the column
_VALUE_MAX = 32


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def shown_overrides(overrides: Sequence[str], swept: Collection[str] | None = None) -> list[str]:
    """The overrides a run's name shows: in a sweep (``swept`` = the swept keys, when known) the
    swept ones, else every one; never where the run writes, how long it measures, or a secret."""
    out = []
    for text in overrides:
        key = override_key(text)
        if "=" not in text or text.startswith("~") or is_secret_key(key):
            continue
        if key.startswith(_PLUMBING) or key in _PLUMBING_KEYS:
            continue
        if swept is not None and key not in swept:
            continue
        value = text.split("=", 1)[1]
        if len(value) > _VALUE_MAX:
            value = value[: _VALUE_MAX - 3] + "..."
        out.append(f"{key}={value}")
    return out


def compose_run_name(backbone: str, shown: Sequence[str], implied: Sequence[str] = ()) -> str:
    """``clip_tiny train=finetune seed=1``: the backbone, then what distinguishes the run (the
    ``shown`` overrides, then the ``implied`` ``key=value`` facts whose key no override named),
    cut to :data:`NAME_MAX` characters. ``backbone=`` itself is the first word."""
    parts = [o for o in shown if override_key(o) != "backbone"]
    keys = {override_key(o) for o in parts}
    parts += [f for f in implied if override_key(f) not in keys]
    name = " ".join([backbone, *parts])
    return name if len(name) <= NAME_MAX else name[: NAME_MAX - 3] + "..."


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


# The runs table's view: MLflow 3.17's UI keeps saved views as experiment tags
# ``mlflow.sharedViewState.<key>`` (an envelope: name, createdAt, updatedAt, and the view's state
# as JSON: its columns among others) and opens one from ``?viewStateShareKey=<key>``.
VIEW_KEY = "lpcvlab"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_NAME = "lpcvlab: objective, latency, precision, backbone, weights"


def _column(kind: str, name: str) -> str:
    """A runs-table column as the UI names it (``metrics.`recall_at_10```)."""
    return f"{kind}.`{name}`"


def view_columns(objective: str) -> list[str]:
    """The columns the linked runs table opens with: the track's objective, total latency,
    precision, backbone, weights (a random-weights run cannot pass for a real one), then
    MLflow's own Dataset and Models."""
    return [
        _column("metrics", objective),
        _column("metrics", "latency_ms/total"),
        _column("tags", "precision"),
        _column("tags", "backbone"),
        _column("tags", "weights"),
        _column("attributes", "Dataset"),
        _column("attributes", "Models"),
    ]


def table_view(objective: str, existing: str | None = None) -> str | None:
    """The view's tag value for an experiment whose runs score ``objective``, the columns of an
    ``existing`` view kept (an experiment shared by both tracks shows both objectives); None when
    ``existing`` already shows them."""
    columns: list[str] = []
    created = int(time.time() * 1000)
    if existing:
        try:
            envelope = json.loads(existing)
            columns = list(json.loads(envelope["state"]).get("selectedColumns", []))
            created = int(envelope.get("createdAt", created))
        except (ValueError, KeyError, TypeError, AttributeError):
            columns = []
    wanted = view_columns(objective)
    if columns and all(c in columns for c in wanted):
        return None
    merged = list(dict.fromkeys([wanted[0], *columns, *wanted]))  # this objective first
    state = json.dumps({"selectedColumns": merged})
    now = int(time.time() * 1000)
    return json.dumps({"name": VIEW_NAME, "createdAt": created, "updatedAt": now, "state": state})


def ensure_table_view(client: Any, experiment_id: str, objective: str) -> None:
    """Save the runs-table view :func:`ui_link` opens on the experiment (once per objective)."""
    exp = client.get_experiment(experiment_id)
    value = table_view(objective, (exp.tags or {}).get(VIEW_TAG))
    if value is not None:
        client.set_experiment_tag(experiment_id, VIEW_TAG, value)


def ui_link(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's address (after the server's ``/``) of an experiment's runs, or of one run,
    in its machine-learning view: without ``workflowType`` MLflow 3.17 opens its GenAI pages.
    The experiment's runs open in the view of :func:`ensure_table_view`."""
    if run_id:
        return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return (
        f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={VIEW_KEY}"
    )


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process (``python run.py ...``, ``lpcvlab reproduce ...``),
    with the value of any ``key=value`` whose key names a secret masked."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        argv = ["python", *argv]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(mask_secrets(argv))[:5000]


def source_tags(command: str | None = None) -> dict[str, str]:
    """MLflow's source tags for a run created without ``mlflow.start_run`` (entry point, type,
    user, git commit), plus the command line: what the run page shows as its source."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags().items()}
    return tags | {COMMAND_TAG: command or command_line()}


# ----------------------------------------------------------------------------- logged models

ONNX_SHA_TAG = "onnx_sha256"
COMPONENT_TAG = "component"


def onnx_signature(model: Any) -> Any:
    """The deployed tensors (names, shapes, dtypes) of an ONNX graph as an MLflow signature."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx.helper import tensor_dtype_to_np_dtype

    weights = {t.name for t in model.graph.initializer}

    def specs(values: Any) -> Any:
        out = []
        for v in values:
            if v.name in weights:
                continue
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(TensorSpec(np.dtype(tensor_dtype_to_np_dtype(t.elem_type)), shape, v.name))
        return Schema(out)

    return ModelSignature(inputs=specs(model.graph.input), outputs=specs(model.graph.output))


@dataclass(frozen=True)
class ModelFacts:
    """What a logged model records besides its file: tags, params, and the AI Hub deployment
    (device, runtime) it is tagged with once compiled; a model tagged with another deployment is
    not reused for this one."""

    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    deployment: dict[str, str] = field(default_factory=dict)


def find_onnx_model(
    client: Any, experiment_id: str, sha256: str, deployment: dict[str, str] | None = None
) -> Any | None:
    """A READY logged model of the experiment holding this ONNX file (by content hash) whose
    deployment tags (e.g. ``aihub.device``) do not contradict ``deployment``; None if none."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.{ONNX_SHA_TAG} = '{sha256}'", max_results=50
    )
    for model in found:
        status = getattr(model.status, "name", str(model.status))
        tags = model.tags or {}
        if status.endswith("READY") and all(
            tags.get(k) in (None, v) for k, v in (deployment or {}).items()
        ):
            return model
    return None


def log_onnx_model(
    client: Any,
    run_id: str,
    experiment_id: str,
    component: str,
    path: Path,
    sha256: str,
    facts: ModelFacts | None = None,
) -> tuple[str, bool]:
    """Log ``path`` as an MLflow model (ONNX flavour) output by ``run_id``: (model ID, reused).

    A model already logged with the same sha256 (:func:`find_onnx_model`) is linked to the run
    instead: no second copy of the file. A new model holds the exported bytes unchanged (its
    ``onnx_sha256`` tag is the file's), a signature of its graph's inputs and outputs and fixed
    pip requirements (MLflow would otherwise spend seconds inferring them).
    """
    facts = facts or ModelFacts()
    existing = find_onnx_model(client, experiment_id, sha256, facts.deployment)
    if existing is not None:
        client.log_outputs(run_id, [LoggedModelOutput(existing.model_id, step=0)])
        return existing.model_id, True
    model = client.create_logged_model(
        experiment_id,
        name=component,
        source_run_id=run_id,
        tags=facts.tags | {COMPONENT_TAG: component, ONNX_SHA_TAG: sha256},
        params=facts.params or None,
        model_type="onnx",
    )
    try:
        with tempfile.TemporaryDirectory(prefix="lpcvlab-model-") as tmp:
            local = Path(tmp) / "model"
            _save_onnx_flavour(Path(path), local, model, run_id)
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id, False


def _save_onnx_flavour(path: Path, dst: Path, logged: Any, run_id: str) -> None:
    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import Model

    model = onnx.load(str(path), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    meta = Model(
        artifact_path=logged.artifact_location,
        model_uuid=logged.model_id,
        model_id=logged.model_id,
        run_id=run_id,
    )
    mlflow.onnx.save_model(
        model,
        str(dst),
        mlflow_model=meta,
        signature=onnx_signature(model),
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
        save_as_external_data=external,
    )
    if not external:  # the exported bytes themselves, not a re-serialisation
        shutil.copyfile(path, dst / "model.onnx")


class RunRecorder:
    """Writes into one MLflow run; handed to tracks as their :class:`RunLog`."""

    def __init__(
        self, client: MlflowClient, run_id: str, tracking_uri: str, experiment_id: str = ""
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.models: dict[str, str] = {}  # component -> MLflow logged model ID
        self.datasets: dict[str, DatasetRecord] = {}  # context -> dataset
        self._deployment: dict[str, str] = {}  # AI Hub device and runtime, for model tags
        self._qairt: dict[str, str] = {}  # component -> QAIRT version its compiled model reports

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

    def log_metrics(
        self,
        metrics: dict[str, float],
        step: int | None = None,
        *,
        models: Sequence[str] = (),
        dataset: str | None = None,
    ) -> None:
        """Log ``metrics``; with ``models`` (component names) they are also linked to those
        components' logged models, and with ``dataset`` (a context such as ``evaluation``) to
        the dataset they were measured on, as the model's page shows them."""
        now = int(time.time() * 1000)
        ids = [self.models[c] for c in models if c in self.models] or [None]
        data = self.datasets.get(dataset or "")
        name, digest = (data.name, data.digest) if data and ids != [None] else (None, None)
        items = [
            Metric(k, float(v), now, step or 0, m, dataset_name=name, dataset_digest=digest)
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
            for m in ids
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        """The data the run read, as MLflow dataset inputs (name, source, digest, context)."""
        inputs = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.digest,
                    source_type="local",
                    source=json.dumps({"uri": d.source}),
                    profile=json.dumps(d.profile | {"sha256": d.sha256}),
                ),
                tags=[InputTag("mlflow.data.context", d.context)],
            )
            for d in datasets
        ]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)
        self.datasets |= {d.context: d for d in datasets}

    def log_model(
        self, component: str, path: Path, sha256: str, facts: ModelFacts | None = None
    ) -> str:
        """Log an exported component as this run's MLflow model (see :func:`log_onnx_model`);
        the AI Hub deployment (device and runtime) is set on the model with its compile job."""
        facts = facts or ModelFacts()
        model_id, reused = log_onnx_model(
            self.client, self.run_id, self.experiment_id, component, path, sha256, facts
        )
        self.models[component] = model_id
        self._deployment = dict(facts.deployment)
        how = "linked the logged model" if reused else "logged as model"
        log.info("MLflow: %s %s %s", component, how, model_id)
        return model_id

    def set_note(self, markdown: str) -> None:
        """The run's description in the MLflow UI."""
        self.set_tags({NOTE_TAG: markdown})

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
        if event.kind == "target_model":  # a model, not a job
            tags = {f"aihub/{event.component}/target_model": event.job_id}
        if event.kind == "qairt_version":  # what the compiled model reports it was built with
            self._qairt[event.component] = str(event.status)
            tags = {
                f"aihub/{event.component}/qairt_version": str(event.status),
                "aihub/qairt_version": ", ".join(sorted(set(self._qairt.values()))),
            }
        self.set_tags(tags)
        self._tag_model(event)

    def _tag_model(self, event: JobEvent) -> None:
        """The AI Hub facts of a component's logged model, as they become known."""
        model_id = self.models.get(event.component)
        if model_id is None:
            return
        tags: dict[str, str] = {}
        if event.kind == "compile":
            tags = self._deployment | {"aihub.compile_job": event.job_id}
            if event.url:
                tags["aihub.compile_job_url"] = event.url
            if event.status and event.status.startswith("SHARED with "):
                tags["aihub.shared_with"] = event.status.removeprefix("SHARED with ")
        elif event.kind == "target_model":
            tags = {"aihub.target_model": event.job_id}
        elif event.kind == "qairt_version":
            tags = {"aihub.qairt_version": str(event.status)}
        if tags:
            self.client.set_logged_model_tags(model_id, tags)


@contextmanager
def start_run(
    tracking: TrackingConfig,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[RunRecorder]:
    """Open a run (with MLflow's source and git tags, as ``mlflow.start_run`` gives them, nested
    under ``parent_run_id`` or the sweep's parent); it ends FINISHED, FAILED (with
    ``error.txt``) or KILLED (Ctrl-C or SIGTERM). ``system_metrics`` starts MLflow's own
    sampler (``system/*`` metrics every ``tracking.system_metrics_interval_s``) for the run's
    lifetime. The command line is a tag unless ``tags`` names it already.

    The run is made and ended through the client, never as MLflow's process-wide "active run":
    a sweep on AI Hub keeps one run per config open while their jobs are waited on together,
    and ending one must not end another."""
    from mlflow.tracking.context.registry import resolve_tags

    uri = resolve_uri(str(tracking.uri))
    client: Any = RetryingClient(MlflowClient(tracking_uri=uri))
    exp_id = get_experiment_id(client, experiment, tracking.artifact_root)
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    mlflow.set_tracking_uri(uri)  # for what logs through MLflow's module-level functions
    all_tags = {COMMAND_TAG: command_line()} | dict(tags) | process_tags()
    all_tags = {k: str(v) for k, v in resolve_tags(all_tags).items()}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    created = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    rec = RunRecorder(client, created.info.run_id, uri, exp_id)
    monitor = None
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = getattr(tracking, "system_metrics_interval_s", None) or 10.0
        monitor = SystemMetricsMonitor(
            rec.run_id, sampling_interval=float(interval), tracking_uri=uri
        )
        monitor.start()
    status = "FAILED"
    try:
        yield rec
        status = "FINISHED"
    except KeyboardInterrupt as exc:
        how = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        rec.set_tags({"error": f"interrupted ({how})"})
        status = "KILLED"
        raise
    except BaseException as exc:
        rec.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "error.txt"
            p.write_text("".join(traceback.format_exception(exc)))
            rec.log_artifact(p)
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        client.set_terminated(rec.run_id, status=status)
