"""The runs table the README links to opens on the objective, latency, precision, backbone and
weights."""

from __future__ import annotations

import json

from lpcvlab_runs import seeded_store
from mlflow.tracking import MlflowClient

from lpcvlab.tracking.views import VIEW_TAG, ensure_table_view, table_view, ui_link


def _columns(value: str) -> list[str]:
    envelope = json.loads(value)  # MLflow 3.17's saved-view envelope
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return json.loads(envelope["state"])["selectedColumns"]


def test_the_view_shows_the_objective_latency_precision_backbone_and_weights():
    columns = _columns(table_view("recall_at_10"))
    assert columns == [
        "metrics.`recall_at_10`",
        "metrics.`latency_ms/total`",
        "tags.`precision`",
        "tags.`backbone`",
        "tags.`weights`",
        "attributes.`Dataset`",
        "attributes.`Models`",
    ]
    same = table_view("recall_at_10")
    assert table_view("recall_at_10", same) is None  # nothing to change
    both = _columns(table_view("top1", same))  # an experiment holding both tracks' runs
    assert both[:2] == ["metrics.`top1`", "metrics.`recall_at_10`"] and len(both) == 8
    assert _columns(table_view("top1", "not json"))[0] == "metrics.`top1`"


def test_the_experiment_link_opens_the_saved_view(tmp_path):
    client = MlflowClient(tracking_uri=seeded_store(tmp_path))
    exp = client.create_experiment("view", artifact_location=(tmp_path / "a").as_uri())
    ensure_table_view(client, exp, "top1")
    tag = client.get_experiment(exp).tags[VIEW_TAG]
    assert _columns(tag)[0] == "metrics.`top1`"
    key = VIEW_TAG.removeprefix("mlflow.sharedViewState.")
    assert ui_link(exp).endswith(f"?workflowType=machine_learning&viewStateShareKey={key}")
    assert ui_link(exp, "abc") == f"#/experiments/{exp}/runs/abc?workflowType=machine_learning"
