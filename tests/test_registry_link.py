"""A registered version and its logged model link each other (the UI's "Registered" column)."""

from __future__ import annotations

import json

from lpcvlab_runs import seeded_store
from mlflow.tracking import MlflowClient

from lpcvlab.tracking.registry import link_version


def test_link_version_adds_each_version_once(tmp_path):
    client = MlflowClient(tracking_uri=seeded_store(tmp_path))
    exp = client.create_experiment("links", artifact_location=(tmp_path / "a").as_uri())
    model = client.create_logged_model(exp, name="text_encoder")
    link_version(client, model.model_id, "lpcvc-track1-text_encoder", "1")
    link_version(client, model.model_id, "lpcvc-track1-text_encoder", "2")
    link_version(client, model.model_id, "lpcvc-track1-text_encoder", "1")  # again: no change
    tags = client.get_logged_model(model.model_id).tags
    assert json.loads(tags["mlflow.modelVersions"]) == [
        {"name": "lpcvc-track1-text_encoder", "version": "1"},
        {"name": "lpcvc-track1-text_encoder", "version": "2"},
    ]
