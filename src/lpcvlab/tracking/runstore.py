"""Reading runs back from the MLflow store: by ID, by experiment, by sweep parent.

Used by ``lpcvlab compare``, ``lpcvlab reproduce`` and the sweep summary. Lookups that cannot
succeed raise :class:`RunLookupError` naming the store and what to pass instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lpcvlab.errors import LpcvlabError

# The same default as conf/tracking/mlflow.yaml (tracking.uri).
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
_PAGE = 1000
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow makes (uuid4().hex), in every store


class RunLookupError(LpcvlabError):
    """A run, experiment or store that is not where the user said it is."""


@dataclass(frozen=True)
class RunInfo:
    """The parts of an MLflow run that the read-side tools use, detached from MLflow types."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def from_run(cls, run: Run) -> RunInfo:
        return cls(
            run_id=run.info.run_id,
            name=run.info.run_name or "",
            status=run.info.status,
            experiment_id=run.info.experiment_id,
            start_time=int(run.info.start_time or 0),
            params=dict(run.data.params),
            metrics={k: float(v) for k, v in run.data.metrics.items()},
            tags=dict(run.data.tags),
        )

    @property
    def short_id(self) -> str:
        return self.run_id[:8]


def check_run_id(text: str) -> str:
    """``text`` when it is an MLflow run ID, else a :class:`RunLookupError` saying what one looks
    like: an ID goes into MLflow's search filters, where a quote in it would break the query."""
    if _RUN_ID.fullmatch(text) is None:
        raise RunLookupError(
            f"{text!r} is not a run ID: expected 32 hexadecimal digits (0-9, a-f), the ID that "
            "run.py prints at the end and the MLflow UI shows as Run ID (the 8-digit short IDs "
            "of the tables are not enough)"
        )
    return text


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``MLFLOW_TRACKING_URI``, else the project's default local store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def open_store(uri: str) -> MlflowClient:
    """A client for an existing store; a missing local SQLite file is an error, not a new store."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise RunLookupError(
                f"no MLflow store at {path} (tracking URI {uri}); run from the directory you ran "
                "run.py in, or pass --tracking-uri / set MLFLOW_TRACKING_URI"
            )
    return MlflowClient(tracking_uri=uri)


def get_run(client: MlflowClient, run_id: str) -> RunInfo:
    check_run_id(run_id)
    try:
        return RunInfo.from_run(client.get_run(run_id))
    except MlflowException as exc:
        raise RunLookupError(
            f"run {run_id!r} is not in the MLflow store {client.tracking_uri}: "
            f"{_first_line(exc)}. Check the ID (MLflow UI or `lpcvlab compare --experiment ...`) "
            "and the store (--tracking-uri)."
        ) from exc


def experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def search(client: MlflowClient, exp_ids: list[str], filter_string: str = "") -> list[RunInfo]:
    """Every matching run (all pages), oldest first."""
    out: list[RunInfo] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            exp_ids,
            filter_string=filter_string,
            max_results=_PAGE,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        out.extend(RunInfo.from_run(r) for r in page)
        token = page.token
        if not token:
            return out


def child_runs(client: MlflowClient, parent_id: str) -> list[RunInfo]:
    """Runs nested under ``parent_id`` (tag ``mlflow.parentRunId``), in any experiment."""
    check_run_id(parent_id)
    return search(client, experiment_ids(client), f"tags.`mlflow.parentRunId` = '{parent_id}'")


def experiment_runs(
    client: MlflowClient, name: str, include_parents: bool = False
) -> list[RunInfo]:
    """The runs of an experiment; sweep parent runs are left out unless asked for."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise RunLookupError(
            f"no experiment named {name!r} in {client.tracking_uri}; experiments there: {known}"
        )
    runs = search(client, [exp.experiment_id])
    return runs if include_parents else [r for r in runs if r.tags.get("sweep") != "true"]


def download_artifact(client: MlflowClient, run_id: str, artifact: str, dst: Path) -> Path | None:
    """Download one artifact of a run into ``dst``; None when the run has no such artifact."""
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, artifact, str(dst)))
    except (MlflowException, OSError):
        return None


def _first_line(exc: Any) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
