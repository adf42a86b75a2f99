"""The runs table a run links to: MLflow 3.17's saved view (columns: the objective, total
latency, precision, backbone, weights) and the UI's addresses of an experiment and a run."""

from __future__ import annotations

import json
import time
from typing import Any

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
