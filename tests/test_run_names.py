"""Run names that say what differs, and demo data that does not change with ``seed``."""

from __future__ import annotations

import pytest
from conftest import compose_config
from lpcvlab_runs import TINY, all_runs, explain, run_py, seeded_store, store_overrides

from lpcvlab.config import load_settings
from lpcvlab.tracking.naming import NAME_MAX, run_name, shown_overrides


def _name(*overrides: str, shown: list[str] | None = None) -> str:
    settings = load_settings(compose_config(*overrides))
    return run_name(settings, shown_overrides(list(overrides)) if shown is None else shown)


def test_a_name_is_the_backbone_and_the_overrides_that_say_what_the_run_is(tmp_path):
    plumbing = [
        f"tracking.uri={seeded_store(tmp_path)}",
        f"paths.cache_dir={tmp_path}/cache",
        "hub.profile_iterations=2",
        "export.parity_samples=2",
        "+hub.api_token=qaihub-secret",
    ]
    assert shown_overrides(plumbing) == []
    assert _name("backbone=clip_tiny", "train=finetune", "seed=1") == (
        "clip_tiny train=finetune seed=1"
    )
    assert _name("backbone=clip_tiny", *plumbing[:4]) == "clip_tiny"
    assert _name("backbone=clip_tiny", "precision=w8a8") == "clip_tiny precision=w8a8"
    # What the config implies without an override naming it still shows (a track's training).
    assert _name("track=video", shown=[]) == "video_tiny train=finetune"
    assert _name("backbone=clip_tiny", "tracking.run_name=mine") == "mine"


def test_a_sweep_child_shows_its_swept_values_only():
    overrides = ["backbone=clip_tiny", "data.demo.num_images=8", "seed=1", "precision=fp16"]
    shown = shown_overrides(overrides, swept={"seed"})
    assert shown == ["seed=1"]
    # precision is not swept, but not the default either: it stays in the name.
    name = run_name(load_settings(compose_config(*overrides)), shown)
    assert name == "clip_tiny seed=1 precision=fp16"


def test_long_values_and_names_are_cut():
    shown = shown_overrides([f"data.root=/{'x' * 200}", *(f"+k{i}=v{i}" for i in range(40))])
    assert shown[0].endswith("...") and len(shown[0]) < 45
    name = run_name(load_settings(compose_config("backbone=clip_tiny")), shown)
    assert len(name) == NAME_MAX and name.endswith("...")


@pytest.mark.slow
def test_a_seed_sweep_names_its_children_apart_and_scores_them_on_the_same_data(tmp_path):
    proc = run_py("-m", *TINY, "seed=0,1", *store_overrides(tmp_path))
    assert proc.returncode == 0, explain(proc)
    runs = all_runs(tmp_path)
    (parent,) = [r for r in runs if r.tags.get("sweep") == "true"]
    children = [r for r in runs if r is not parent]
    assert sorted(c.name for c in children) == ["clip_tiny seed=0", "clip_tiny seed=1"]
    assert parent.tags["best_run_name"] in {c.name for c in children}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    digests = set()
    for child in children:
        (data,) = client.get_run(child.run_id).inputs.dataset_inputs
        digests.add(data.dataset.digest)
    assert len(digests) == 1, digests  # the seed seeds the model, not the evaluation set
    # ... and the model it seeds differs: different embeddings, different ONNX files.
    assert len({c.tags["onnx_sha256/image_encoder"] for c in children}) == 2
