"""Track 2 end to end: export parity, fine-tuning video_tiny on demo videos, official results
file, Ctrl-C leaving a KILLED run with a checkpoint, and resuming from that run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import build_track_for, compose_config
from lpcvlab_runs import seeded_store
from mlflow.tracking import MlflowClient

from lpcvlab import pipeline
from lpcvlab.config.schema import LocalHubConfig
from lpcvlab.data.formats import manifest_labels, read_manifest, read_results_h5
from lpcvlab.data.qevd import load_class_map
from lpcvlab.deploy.export import export_component
from lpcvlab.errors import Interrupted
from lpcvlab.hubs.local import LocalHub
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.training.module import VideoClassifierModule


def _video_cfg(tmp, *extra):
    return compose_config(
        "track=video",
        "backbone=video_tiny",
        f"tracking.uri={seeded_store(tmp)}",
        f"tracking.artifact_root={tmp}/artifacts",
        f"paths.cache_dir={tmp}/cache",
        "hub.profile_iterations=2",
        "hub.warmup_iterations=1",
        "export.parity_samples=2",
        "data.workers=0",
        # video_tiny has nothing pretrained to keep, so everything trains.
        "train.trainable=[]",
        "train.optimizer.lr=0.01",
        *extra,
    )


@pytest.mark.parametrize("channel_last", [False, True])
def test_video_export_parity_and_layout(tmp_path, channel_last):
    cfg = _video_cfg(tmp_path, f"track.channel_last={str(channel_last).lower()}")
    track = build_track_for(cfg)
    bundle = track.build_model()
    (comp,) = bundle.components
    shape = (1, 16, 112, 112, 3) if channel_last else (1, 3, 16, 112, 112)
    assert comp.input.shape == shape and comp.input.channel_last is channel_last
    x = np.random.default_rng(0).random((2, *shape[1:]), dtype=np.float32)
    exp = export_component(comp, x, tmp_path / "onnx")
    model = onnx.load(str(exp.path))
    assert model.graph.input[0].name == "video"
    assert model.graph.output[0].name == "class_probs"
    out_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == [1, 92]
    assert exp.parity_cosine_min >= 0.999
    # Mean/std are in the graph: the ONNX model on [0,1] input == torch model on normalised input.
    rt = LocalHub(LocalHubConfig(profile_iterations=1, warmup_iterations=0))
    onnx_out = rt.infer(rt.compile(exp), x).outputs
    cf = torch.from_numpy(x).permute(0, 4, 1, 2, 3) if channel_last else torch.from_numpy(x)
    # video_tiny has no weights of its own: Kinetics-400's (R(2+1)D's) mean/std
    assert track.backbone.mean == (0.43216, 0.394666, 0.37645)
    mean = torch.tensor(track.backbone.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(track.backbone.std).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        ref = bundle.model.eval()((cf - mean) / std).numpy()
    assert cosine_per_sample(onnx_out, ref).min() > 0.9999


@pytest.mark.slow
def test_finetune_video_tiny_learns_and_writes_official_results(tmp_path):
    cfg = _video_cfg(tmp_path, "train.trainer.max_epochs=20")
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    # 4 demo classes: chance is 0.25 on the validation videos.
    assert m["top1"] >= 0.5, m
    assert m["top5"] >= m["top1"] and m["clip_top1"] == pytest.approx(m["top1"])
    history = client.get_metric_history(res.run_id, "val/top1")
    assert len(history) == 20
    assert sorted(point.step for point in history) == list(range(20))  # charted per epoch
    assert len(client.get_metric_history(res.run_id, "train/loss")) == 20
    # the demo's 2.5 s video at 4 fps (a count: a param)
    assert run.data.params["data/train_skipped/too-short"] == "1"
    assert m["parity_cosine_min/video_classifier"] >= 0.999
    assert m["latency_ms/video_classifier"] > 0
    # Trained from random weights: the tag and the description's header say so alike.
    assert run.data.tags["weights"] == "finetuned:random" and run.data.tags["track"] == "video"
    assert "weights=finetuned:random" in run.data.tags["mlflow.note.content"]
    arts = {a.path for a in client.list_artifacts(res.run_id, "results")}
    assert {
        "results/results.h5",
        "results/manifest.jsonl",
        "results/per_video_predictions.csv",
        "results/confusion_matrix.png",
    } <= arts
    ckpts = {a.path for a in client.list_artifacts(res.run_id, "checkpoints")}
    assert any(p.startswith("checkpoints/best") for p in ckpts) and "checkpoints/last.ckpt" in ckpts
    # The official evaluate.py reading: softmax of data/0/batch_i, manifest order.
    logits = read_results_h5(tmp_path / "work" / "results.h5")
    records = read_manifest(tmp_path / "work" / "manifest.jsonl")
    labels = manifest_labels(records, load_class_map())
    assert logits.shape == (16, 92)
    top1 = float(np.mean(np.argmax(logits, axis=1) == np.array(labels)))
    assert top1 == pytest.approx(m["top1"])


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_leaves_killed_run_with_checkpoint_and_resume_continues(
    tmp_path, monkeypatch, signal_name
):
    cfg = _video_cfg(tmp_path, "train.trainer.max_epochs=4")
    original = VideoClassifierModule.on_validation_epoch_end

    def interrupt_after_second_epoch(self):
        original(self)
        if self.current_epoch == 1:
            # What Python's Ctrl-C handler raises, or what run.py's SIGTERM handler raises.
            raise KeyboardInterrupt if signal_name == "SIGINT" else Interrupted("SIGTERM")

    monkeypatch.setattr(
        VideoClassifierModule, "on_validation_epoch_end", interrupt_after_second_epoch
    )
    with pytest.raises(KeyboardInterrupt) as stop:
        pipeline.run(cfg, work_dir=tmp_path / "first")
    monkeypatch.undo()
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("lpcvc-video")
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "KILLED"
    assert killed.data.tags["error"] == f"interrupted ({signal_name})"
    # What run.py prints instead of a traceback: what was kept and how to resume.
    assert isinstance(stop.value, Interrupted) and stop.value.signal_name == signal_name
    paragraph = stop.value.paragraph()
    assert killed.info.run_id in paragraph and "interrupted.ckpt" in paragraph
    assert f"train.resume_from={killed.info.run_id}" in paragraph
    ckpts = {a.path for a in client.list_artifacts(killed.info.run_id, "checkpoints")}
    assert "checkpoints/interrupted.ckpt" in ckpts
    # Epoch 0 was validated and logged; epoch 1 stopped inside its validation.
    assert len(client.get_metric_history(killed.info.run_id, "val/top1")) == 1

    resumed_cfg = _video_cfg(
        tmp_path, "train.trainer.max_epochs=4", f"train.resume_from={killed.info.run_id}"
    )
    res = pipeline.run(resumed_cfg, work_dir=tmp_path / "second")
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == killed.info.run_id
    # It continued: fewer than the 4 epochs a fresh start would validate.
    assert 1 <= len(client.get_metric_history(res.run_id, "val/top1")) <= 3
