"""Track 1 fine-tuning end to end (clip_tiny on a small generated training split), checked in
the MLflow store: the loss falls, validation runs every epoch, the exported model is the best
checkpoint, WiSE-FT alpha = 0 scores exactly as no training, hard negatives are counted, and a
checkpoint of the first run teaches the next one (embeddings cached, reused by the one after)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import build_track_for, compose_config
from lpcvlab_runs import seeded_store
from mlflow.tracking import MlflowClient

from lpcvlab import pipeline
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.models.clip import CHECKPOINT_PREFIX

pytestmark = pytest.mark.slow

EPOCHS = 3


def _overrides(tmp: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "backbone=clip_tiny",
        "data.demo.num_images=12",
        "data.demo.num_train_images=48",
        f"tracking.uri={seeded_store(tmp)}",
        f"tracking.artifact_root={tmp}/artifacts",
        f"paths.cache_dir={cache}",
        "hub.profile_iterations=2",
        "hub.warmup_iterations=1",
        "export.parity_samples=2",
        "tracking.log_models=false",
        *extra,
    ]


def _finetune(*extra: str) -> list[str]:
    return [
        "train=finetune",
        "train.batch_size=16",
        "train.trainer.enable_progress_bar=false",
        *extra,
    ]


class Runs:
    """Four runs sharing a store and a cache, made once for the module."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cache = tmp / "cache"
        self.client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        self.cfg = {}
        self.ids = {}

    def run(self, name: str, *overrides: str) -> str:
        cfg = compose_config(*_overrides(self.tmp, self.cache, *overrides))
        res = pipeline.run(cfg, work_dir=self.tmp / name)
        self.cfg[name], self.ids[name] = cfg, res.run_id
        return res.run_id

    def metrics(self, name: str) -> dict[str, float]:
        return self.client.get_run(self.ids[name]).data.metrics

    def tags(self, name: str) -> dict[str, str]:
        return self.client.get_run(self.ids[name]).data.tags

    def history(self, name: str, key: str) -> list[float]:
        points = self.client.get_metric_history(self.ids[name], key)
        return [p.value for p in sorted(points, key=lambda p: p.step)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    r = Runs(tmp_path_factory.mktemp("track1_finetune"))
    r.run("untrained")
    r.run("trained", *_finetune(f"train.trainer.max_epochs={EPOCHS}"))
    best = sorted((r.tmp / "trained" / "checkpoints").glob("best-*.ckpt"))[-1]
    student = _finetune(
        "train.trainer.max_epochs=2",
        "train.wise_alpha=0",
        "train.average=last",
        "train.average_k=2",
        "train.hard_negatives.enabled=true",
        f"train.distill.teacher={best}",
        "train.distill.weight=0.5",
    )
    r.run("alpha0", *student)
    r.run("again", *student)
    return r


def test_training_logs_falling_loss_and_validates_every_epoch(runs):
    run = runs.client.get_run(runs.ids["trained"])
    assert run.info.status == "FINISHED" and run.data.tags["train"] == "finetune"
    assert run.data.tags["weights"] == "finetuned:random"  # the tag and the header agree
    assert "weights=finetuned:random" in run.data.tags["mlflow.note.content"]
    loss = runs.history("trained", "train/loss")
    assert len(loss) == EPOCHS and loss[-1] < loss[0], loss
    for k in (1, 5, 10):
        assert len(runs.history("trained", f"val/recall_at_{k}")) == EPOCHS
    # Validation is charted per epoch (its step is the epoch); the loss per optimizer step.
    val = runs.client.get_metric_history(runs.ids["trained"], "val/recall_at_10")
    assert sorted(point.step for point in val) == list(range(EPOCHS))
    m = runs.metrics("trained")
    assert m["train/best_val_recall_at_10"] == max(runs.history("trained", "val/recall_at_10"))
    p = run.data.params
    assert p["data/train_images"] == "48" and p["data/train_captions"] == "144"
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert {"demo_retrieval", "demo_retrieval/train"} <= set(inputs)
    ckpts = {a.path for a in runs.client.list_artifacts(runs.ids["trained"], "checkpoints")}
    assert any(p.startswith("checkpoints/best-") for p in ckpts)


def test_the_exported_model_is_the_best_checkpoint(runs):
    """The ONNX encoders' outputs (the run's embeddings.h5) are the best checkpoint's."""
    tags = runs.tags("trained")
    best = runs.tmp / "trained" / "checkpoints" / tags["best_checkpoint"]
    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    track = build_track_for(runs.cfg["trained"])
    bundle = track.build_model()
    model = bundle.model
    model.load_state_dict({k[len(CHECKPOINT_PREFIX) :]: v for k, v in state.items()})
    data = track.load_data(runs.tmp / "check")
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(data.inputs["image_encoder"])).numpy()
        txt = model.encode_text(torch.from_numpy(data.inputs["text_encoder"])).numpy()
    with h5py.File(runs.tmp / "trained" / "embeddings.h5") as f:
        exported_img, exported_txt = f["image_embeddings"][()], f["text_embeddings"][()]
    assert cosine_per_sample(exported_img, img).min() > 0.9999
    assert cosine_per_sample(exported_txt, txt).min() > 0.9999
    # ... and not the untrained weights'
    untrained = track.build_model().model
    with torch.no_grad():
        start = untrained.encode_image(torch.from_numpy(data.inputs["image_encoder"])).numpy()
    assert cosine_per_sample(exported_img, start).min() < 0.99


def test_wise_alpha_zero_scores_exactly_as_no_training(runs):
    before, after = runs.metrics("untrained"), runs.metrics("alpha0")
    for key in ("recall_at_1", "recall_at_5", "recall_at_10", "hit_at_10"):
        assert after[key] == before[key], key
    for comp in ("image_encoder", "text_encoder"):
        assert (
            runs.tags("alpha0")[f"onnx_sha256/{comp}"]
            == runs.tags("untrained")[f"onnx_sha256/{comp}"]
        )
    # It did train: two validations, two checkpoints averaged, then alpha 0 took the start.
    assert len(runs.history("alpha0", "val/recall_at_10")) == 2
    assert runs.tags("alpha0")["averaging/checkpoints"] == "epoch=0,epoch=1"
    assert after["train/wise_alpha"] == 0.0 and after["train/averaged_checkpoints"] == 2


def test_hard_negatives_are_made_and_counted(runs):
    # Every demo caption names a colour: each one can be perturbed, each pair got a negative.
    assert runs.tags("alpha0")["train/hard_negative_captions"] == "144"  # a count: a tag
    made = runs.history("alpha0", "train/hard_negatives")
    assert made == [48.0, 48.0]  # 3 batches of 16 per epoch


def test_a_checkpoint_teaches_and_its_embeddings_are_cached(runs):
    first, second = runs.tags("alpha0"), runs.tags("again")
    assert first["distill/teacher_cache"] == "computed"
    assert second["distill/teacher_cache"] == "reused"
    assert first["distill/teacher_cache_key"] == second["distill/teacher_cache_key"]
    assert "best-" in first["distill/teacher"]
    assert runs.metrics("again")["distill/teacher_cache_reused"] == 1.0
    assert np.isfinite(runs.history("alpha0", "train/loss_distill")).all()
    distill = runs.history("alpha0", "train/loss_distill")
    assert len(distill) == 2 and all(v > 0 for v in distill)
    # The same seed, data and teacher: the second run trains exactly as the first.
    assert runs.history("again", "train/loss") == runs.history("alpha0", "train/loss")


def test_a_training_checkpoint_loads_as_weights_with_what_it_was_trained_with(runs):
    from lpcvlab.config.weights import inspect_checkpoint

    best = sorted((runs.tmp / "trained" / "checkpoints").glob("best-*.ckpt"))[-1]
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    record = ckpt["lpcvlab"]
    assert record["quick_gelu"] is False
    assert record["normalization"] == {"mean": None, "std": None}  # lpcvc_sample, random clip_tiny
    assert inspect_checkpoint(best).kind == "lpcvlab_checkpoint"
    track = build_track_for(
        compose_config(*_overrides(runs.tmp, runs.cache, f"backbone.pretrained={best}"))
    )
    bundle = track.build_model()
    state = {
        k[len(CHECKPOINT_PREFIX) :]: v
        for k, v in ckpt["state_dict"].items()
        if k.startswith(CHECKPOINT_PREFIX)
    }
    mine = bundle.model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in state.items())
    assert bundle.facts["normalization"] == "none"
    assert bundle.facts["weights/activation_from"] == "the checkpoint's record"
    rng = np.random.default_rng(0)
    tokens = track.backbone.tokenizer()(["a red circle", "a blue square"]).numpy()
    from lpcvlab.tracks import TrackData

    inputs = {
        "image_encoder": rng.random((2, 3, 224, 224), dtype=np.float32),
        "text_encoder": tokens,
    }
    parity = track.reference_parity(bundle, TrackData(inputs=inputs))
    assert parity.failure() is None and min(parity.cosine_min.values()) >= 0.9999
