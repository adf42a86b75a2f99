"""Track 2 at real scale: random-clip training from a uint8 frame cache, streaming evaluation,
distillation with cached teacher logits, the trainer's precision, several processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, build_track_for, compose_config
from lpcvlab_runs import seeded_store
from test_aihub import fake, models  # noqa: F401  (fixtures of the faked AI Hub)
from test_video_data import make_video

from lpcvlab.config import load_settings
from lpcvlab.config.schema import LocalHubConfig, TinyVideoBackboneConfig
from lpcvlab.config.teacher import CHECKPOINT_KEY
from lpcvlab.data import batch as batch_mod
from lpcvlab.data.batch import FRAMES, decode_videos
from lpcvlab.data.clips import CachedClips
from lpcvlab.data.decode import decode_frame_sequence, decode_video, read_video_frames
from lpcvlab.data.formats import read_manifest, read_results_h5
from lpcvlab.data.frames import (
    VideoPreprocess,
    centre_offsets,
    frame_indices,
    frame_sequence_indices,
    window_starts,
)
from lpcvlab.errors import ConfigError
from lpcvlab.hubs.cache import inference_key
from lpcvlab.training.fit import resolve_trainer
from lpcvlab.training.losses import distillation_loss
from lpcvlab.training.module import (
    ClipDataModule,
    EpochSampler,
    FrameWindowDataset,
    VideoClassifierModule,
)
from lpcvlab.util.hashing import array_sha256

LPCVC = VideoPreprocess("lpcvc_sample")


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scale")
    return {
        "v30": make_video(d / "v30.mp4", fps=30, frames=240, seed=5),  # 8 s: 32 frames at 4 fps
        "v24": make_video(d / "v24.mp4", fps=24, frames=120, seed=6),  # 5 s: 20 frames
    }


# --------------------------------------------------------------------------- random clips


def test_sequence_windows_are_the_clips_frame_selection_gives() -> None:
    for sel, n, fps in (
        ("lpcvc_sample", 240, 30),
        ("dynamic_fps", 60, 24),
        ("lpcvc_sample", 149, 29.97),
    ):
        seq = frame_sequence_indices(sel, n, fps)
        starts = window_starts(len(seq), 16)
        assert starts[0] == 0 and starts[-1] == len(seq) - 16
        # every evaluation clip of the same selection is one of the training windows
        for clip in frame_indices(sel, n, fps, clips=3):
            assert clip in [seq[s : s + 16] for s in starts]
        assert seq[:16] == frame_indices(sel, n, fps)[0]  # window 0 = the official clip
    assert window_starts(40, 16, step=8) == [0, 8, 16, 24]
    assert window_starts(16, 16) == [0]
    assert (
        frame_sequence_indices("uniform_span", 300, 30) == frame_indices("uniform_span", 300, 30)[0]
    )


def test_first_window_is_exactly_the_official_clip(
    clips_dir: dict[str, Path], tmp_path: Path
) -> None:
    for name in ("v30", "v24"):
        path = clips_dir[name]
        seq = decode_frame_sequence(path, LPCVC)
        official = decode_video(path, LPCVC)[0]  # (3, 16, 112, 112) float32, the official recipe
        assert seq.dtype == torch.uint8 and seq.shape[0] == 3 and seq.shape[2:] == (128, 171)
        # the same source frames...
        (indices,), _, _ = read_video_frames(path, LPCVC, sequence=True)
        assert indices[:16] == read_video_frames(path, LPCVC)[0][0]
        # ...and the same pixels: window 0, centre crop, is round(255 * official clip) exactly
        top, left = centre_offsets(LPCVC.resize, LPCVC.crop)
        window = seq[:, :16, top : top + 112, left : left + 112]
        assert torch.equal(window, torch.round(official * 255).to(torch.uint8))
        # and what training reads back as floats is within half a uint8 step of it
        np.save(tmp_path / f"{name}.npy", seq.numpy())
        ds = FrameWindowDataset([tmp_path / f"{name}.npy"], [0], num_frames=16, crop=112)
        assert (ds.clip(0, 0, top, left) - official).abs().max() <= 0.5 / 255 + 1e-7


def test_random_windows_change_across_epochs_and_stay_inside(tmp_path: Path) -> None:
    lengths = [20, 32, 16]
    files = []
    for v, length in enumerate(lengths):
        # frame t of video v holds the value t everywhere (and v in channel 1), so a crop tells
        # which window it came from
        arr = np.zeros((3, length, 128, 171), np.uint8)
        arr[0] = np.arange(length, dtype=np.uint8)[:, None, None]
        arr[1] = v
        arr[2] = np.arange(171, dtype=np.uint8)[None, None, :]  # column index: where the crop is
        np.save(tmp_path / f"{v}.npy", arr)
        files.append(tmp_path / f"{v}.npy")
    ds = FrameWindowDataset(files, [0, 1, 2], num_frames=16, crop=112, clips_per_video=2)
    assert len(ds) == 6
    seen: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    lefts: set[int] = set()
    for epoch in range(12):
        in_epoch: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for j in range(len(ds)):
            x, label = ds[(j, epoch)]
            assert x.shape == (3, 16, 112, 112) and label == j // 2
            frames = (x[0, :, 0, 0] * 255).round().int().tolist()
            start = frames[0]
            assert frames == list(range(start, start + 16))  # consecutive frames of the video
            assert 0 <= start <= lengths[j // 2] - 16  # inside the video
            left = int(round(float(x[2, 0, 0, 0]) * 255))
            assert 0 <= left <= 171 - 112
            lefts.add(left)
            seen[j // 2].add(start)
            in_epoch[j // 2].append(start)
        for v in (0, 1):  # two clips of one video in one epoch: two different windows
            assert in_epoch[v][0] != in_epoch[v][1]
        # the same (seed, epoch, item) gives the same clip
        assert torch.equal(ds[(3, epoch)][0], ds[(3, epoch)][0])
    assert len(seen[0]) > 3 and len(seen[1]) > 6 and seen[2] == {0}
    assert len(lefts) > 5


def test_epoch_sampler_reshuffles_and_workers_draw_the_same_clips(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, (3, 24, 128, 171), dtype=np.uint8)
    files = []
    for v in range(6):
        np.save(tmp_path / f"{v}.npy", arr)
        files.append(tmp_path / f"{v}.npy")
    ds = FrameWindowDataset(files, list(range(6)), num_frames=16, crop=112)

    def epochs(workers: int) -> list[torch.Tensor]:
        dm = ClipDataModule(ds, ds, batch_size=3, num_workers=workers, seed=1)
        loader = dm.train_dataloader()
        out = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    serial = epochs(0)
    assert not torch.equal(serial[0], serial[1])  # a new order and new windows each epoch
    pooled = epochs(2)
    for a, b in zip(serial, pooled, strict=True):
        assert torch.equal(a, b)
    sampler = EpochSampler(6, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == [(i, 0) for i in range(6)] and list(sampler) != first


def test_frame_cache_is_reused(
    clips_dir: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [clips_dir["v30"], clips_dir["v24"]]
    first = decode_videos(paths, LPCVC, tmp_path, progress=False, return_tensors=False, kind=FRAMES)
    assert first.cache_hits == 0 and all(r.cache_path.is_file() for r in first.results)
    clips = decode_videos(paths, LPCVC, tmp_path, progress=False, return_tensors=False)
    assert {r.cache_path for r in clips.results}.isdisjoint(r.cache_path for r in first.results)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the frame cache holds the video")

    monkeypatch.setattr(batch_mod, "decode_frame_sequence", no_decoding)
    again = decode_videos(paths, LPCVC, tmp_path, progress=False, kind=FRAMES)
    assert again.cache_hits == 2
    assert again.results[0].clips.dtype == torch.uint8
    assert again.results[0].clips.shape == (3, 32, 128, 171)


# --------------------------------------------------------------------------- streaming


def _clip_files(folder: Path, n: int, clips: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        path = folder / f"{i}.npy"
        np.save(path, rng.random((clips, 3, 16, 112, 112), dtype=np.float32))
        out.append(path)
    return out


def test_cached_clips_index_like_the_stacked_array(tmp_path: Path) -> None:
    files = _clip_files(tmp_path, 3, clips=2)
    stacked = np.concatenate([np.load(f) for f in files])
    for channel_last in (False, True):
        lazy = CachedClips(files, 2, (3, 16, 112, 112), channel_last=channel_last)
        want = stacked.transpose(0, 2, 3, 4, 1) if channel_last else stacked
        assert lazy.shape == want.shape and len(lazy) == 6 and lazy.ndim == 5
        assert np.array_equal(lazy[4], want[4]) and np.array_equal(lazy[-1], want[-1])
        assert np.array_equal(lazy[1:5], want[1:5]) and np.array_equal(lazy[:2], want[:2])
        assert np.array_equal(lazy[np.array([5, 0, 3])], want[[5, 0, 3]])
        assert lazy.content_sha256() == array_sha256(want)
        assert lazy.materialised == 0
        assert np.array_equal(np.asarray(lazy), want) and lazy.materialised == 1
    with pytest.raises(IndexError):
        lazy[6]


def test_streaming_evaluation_scores_like_memory_and_holds_one_batch(tmp_path: Path) -> None:
    """Inference, the stage cache's key and the official results file from clips read off disk
    equal the in-memory path's, and what is held at once does not grow with the videos."""
    from lpcvlab.deploy.export import export_component
    from lpcvlab.hubs.local import READ_BATCH, LocalHub
    from lpcvlab.tracks.video import VideoPayload

    track = build_track_for(compose_config("track=video", "backbone=video_tiny", "train=none"))
    (comp,) = track.build_model().components
    clip = np.random.default_rng(0).random((2, 3, 16, 112, 112), dtype=np.float32)
    exported = export_component(comp, clip, tmp_path / "onnx")
    hub = LocalHub(LocalHubConfig(profile_iterations=1, warmup_iterations=0))
    compiled = hub.compile(exported)
    peaks = {}
    for n in (READ_BATCH + 4, 4 * (READ_BATCH + 4)):
        files = _clip_files(tmp_path / f"n{n}", n)
        lazy = CachedClips(files, 1, (3, 16, 112, 112))
        stacked = np.concatenate([np.load(f) for f in files])
        streamed = hub.infer(compiled, lazy).outputs
        in_memory = hub.infer(compiled, stacked).outputs
        assert np.array_equal(streamed, in_memory)
        assert inference_key("k", lazy) == inference_key("k", stacked)
        assert lazy.materialised == 0
        peaks[n] = lazy.loaded_bytes_peak
        # the track's scores and official results file, from either
        samples = [dataclasses.replace(_sample(i), label=i % 4) for i in range(n)]
        payload = VideoPayload(samples, files, 1, [f"c{k}" for k in range(92)], [], [])
        from lpcvlab.tracks.base import TrackData

        results = []
        for inputs, outputs in ((lazy, streamed), (stacked, in_memory)):
            work = tmp_path / f"eval{n}_{type(inputs).__name__}"
            work.mkdir()
            ev = track.evaluate(
                TrackData({"video_classifier": inputs}, payload=payload),
                {"video_classifier": outputs},
                work,
            )
            results.append(ev.metrics)
            rows = read_results_h5(work / "results.h5")
            assert rows.shape == (n, 92) and np.array_equal(rows, outputs)
            assert [r.label for r in read_manifest(work / "manifest.jsonl")] == [
                f"c{i % 4}" for i in range(n)
            ]
        assert results[0] == results[1]
    # one read batch at a time, whatever the number of videos
    assert peaks[READ_BATCH + 4] == peaks[4 * (READ_BATCH + 4)] == READ_BATCH * clip[0].nbytes


@pytest.mark.hub
def test_aihub_uploads_cached_clips_one_chunk_at_a_time(fake, models, tmp_path):  # noqa: F811
    """AI Hub's chunked upload reads each chunk off disk when it needs it: the same outputs
    as from the stacked array, never the whole set in memory."""
    from test_aihub import hub_with_events, local_outputs, video_inputs

    from lpcvlab.hubs import ComponentJob

    sample = 3 * 4 * 6 * 6 * 4  # the fake video model's (1, 3, 4, 6, 6) float32 input
    hub, _ = hub_with_events(
        tmp_path,
        runtime="qnn_context_binary",
        device="dragonwing_iq9075_evk",
        track="video",
        chunk_bytes=2 * sample,
    )
    inputs = video_inputs(5, seed=3)
    files = []
    for i in range(5):
        np.save(tmp_path / f"{i}.npy", inputs[i : i + 1])
        files.append(tmp_path / f"{i}.npy")
    lazy = CachedClips(files, 1, (3, 4, 6, 6))
    exported = models["video_classifier"]
    run = hub.run_components([ComponentJob(exported, lazy)])["video_classifier"]
    assert len(fake.jobs_of("inference", profiling=False)) == 3
    np.testing.assert_allclose(run.inference.outputs, local_outputs(exported, inputs), atol=1e-3)
    assert lazy.materialised == 0 and lazy.loaded_bytes_peak <= 2 * sample


def _sample(i: int):
    from lpcvlab.data.qevd import VideoSample

    return VideoSample(
        path=Path(f"/data/val/c{i % 4}/{i:03d}.mp4"), class_name=f"c{i % 4}", label=0
    )


# --------------------------------------------------------------------------- the track


def _tiny_cfg(tmp: Path, *extra: str):
    return compose_config(
        "track=video",
        "backbone=video_tiny",
        "backbone.width=4",
        f"paths.cache_dir={tmp}/cache",
        f"tracking.uri={seeded_store(tmp)}",
        "data.workers=0",
        "data.demo.videos_per_class_train=2",
        "data.demo.videos_per_class_val=1",
        "train.trainer.max_epochs=1",
        "train.trainer.enable_progress_bar=false",
        "train.batch_size=4",
        *extra,
    )


class _Log:
    """A RunLog over a real MLflow run (Lightning's logger writes into it), remembering what
    the track logged."""

    def __init__(self, tmp: Path) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = seeded_store(tmp)
        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name("t") or client.get_experiment(
            client.create_experiment("t", artifact_location=str(tmp / "artifacts"))
        )
        self.run_id = client.create_run(exp.experiment_id).info.run_id
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics |= metrics

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        self.tags |= tags


def test_track_streams_validation_and_decodes_training_videos_once(tmp_path: Path) -> None:
    track = build_track_for(_tiny_cfg(tmp_path))
    data = track.load_data(tmp_path, training=True)
    clips = data.inputs["video_classifier"]
    assert isinstance(clips, CachedClips) and clips.shape == (4, 3, 16, 112, 112)
    payload = data.payload
    assert payload.train_kind == FRAMES and len(payload.train) == 7  # one demo video too short
    assert all(np.load(p, mmap_mode="r").dtype == np.uint8 for p in payload.train_cache)
    again = track.load_data(tmp_path, training=True)
    assert again.stats["train_cache_hits"] == 7 and again.stats["val_cache_hits"] == 4
    # calibration clips come from window 0, centre crop: the official clip to uint8 precision
    cal = track.calibration_inputs(data, "video_classifier", 2)
    official = decode_video(payload.train[0].path, track.preprocess)[0].numpy()
    assert np.abs(cal[0] - official).max() <= 0.5 / 255 + 1e-7
    # clip_sampling=first decodes the official clips, as before
    first = build_track_for(_tiny_cfg(tmp_path, "train.clip_sampling=first"))
    assert first.load_data(tmp_path, training=True).payload.train_kind == "clips"


def _teacher_checkpoint(path: Path) -> Path:
    """A tiny teacher as lpcvlab's training would have saved it."""
    from lpcvlab.models.video import TinyVideoNet, VideoClassifier

    torch.manual_seed(0)
    backbone = TinyVideoBackboneConfig(name="video_tiny", width=4)
    net = VideoClassifier(TinyVideoNet(92, width=4))
    module = VideoClassifierModule(net, optimizer=torch.optim.SGD)
    record = {"track": "video", "backbone": dataclasses.asdict(backbone)}
    torch.save({"state_dict": module.state_dict(), CHECKPOINT_KEY: record}, path)
    return path


def test_distillation_from_a_tiny_teacher_caches_its_logits(tmp_path: Path) -> None:
    ckpt = _teacher_checkpoint(tmp_path / "teacher.ckpt")
    cfg = _tiny_cfg(
        tmp_path, f"train.distill.teacher={ckpt}", "train.distill.weight=0.5", "train.clip_step=4"
    )
    track = build_track_for(cfg)
    s = load_settings(cfg)
    data = track.load_data(tmp_path, training=True)
    bundle = track.build_model()
    runs = []
    for i in range(2):
        log = _Log(tmp_path)
        track.train(bundle, data, s.train, log, tmp_path / f"work{i}")
        runs.append(log)
    first, second = runs
    assert first.metrics["train/teacher_videos_computed"] == 7
    assert first.metrics["train/teacher_videos_cached"] == 0
    assert second.metrics["train/teacher_videos_computed"] == 0  # the second run reads the cache
    assert second.metrics["train/teacher_videos_cached"] == 7
    assert first.tags["distill/teacher"] == str(ckpt)
    files = sorted((tmp_path / "cache" / "teacher_logits").rglob("*.npy"))
    assert len(files) == 7
    # one row of 92 logits per candidate window (4 frames apart) of each video
    for f in files:
        rows = np.load(f)
        assert rows.ndim == 2 and rows.shape[1] == 92
    # the logits are the teacher's on the centre-cropped windows
    from lpcvlab.config.teacher import Teacher
    from lpcvlab.training.distill import build_teacher

    teacher, _ = build_teacher(Teacher(checkpoint=ckpt), 92)
    ds = track._train_set(s.train, data.payload)
    top, left = centre_offsets(track.preprocess.resize, track.preprocess.crop)
    with torch.no_grad():
        want = teacher(ds.clip(0, 1, top, left)[None]).numpy()[0]
    key = f"{Path(data.payload.train_cache[0]).name.split('-')[0]}-"
    (mine,) = [f for f in files if f.name.startswith(key)]
    np.testing.assert_allclose(np.load(mine)[1], want, rtol=1e-5, atol=1e-5)


def test_distillation_loss_is_the_tempered_kl() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * 4
    torch.testing.assert_close(distillation_loss(s, t, 2.0), want)
    assert float(distillation_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_a_random_teacher_is_refused(tmp_path: Path) -> None:
    from lpcvlab.config.teacher import Teacher, backbone_option
    from lpcvlab.training.distill import build_teacher

    with pytest.raises(ConfigError, match="teach nothing"):
        build_teacher(Teacher(backbone=backbone_option("video_tiny")), 92)
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ConfigError, match="no 'lpcvlab' record"):
        build_teacher(Teacher(checkpoint=tmp_path / "plain.ckpt"), 92)


# --------------------------------------------------------------------------- config, devices


def test_the_demo_trains_video_tiny_from_scratch_and_the_baseline_is_the_sample() -> None:
    demo = load_settings(compose_config("track=video"))
    assert demo.backbone.name == "video_tiny" and demo.backbone.pretrained is None
    assert demo.train.trainable == [] and demo.train.clip_sampling == "random"
    assert demo.train.trainer["max_epochs"] == 20 and demo.train.trainer["precision"] == "auto"
    base = load_settings(compose_config("experiment=track2_baseline", "data.root=/data/qevd"))
    assert base.backbone.name == "r2plus1d_18" and base.backbone.pretrained == "kinetics400"
    assert base.train.trainable == ["layer4", "fc"] and base.train.lr == 1.0e-3
    assert base.preprocess.video.num_frames == 16 and base.preprocess.video.fps == 4
    # the frame count is one override away (the Track 2 page may move to 8-frame clips)
    eight = build_track_for(compose_config("track=video", "preprocess.video.num_frames=8"))
    (comp,) = eight.build_model().components
    assert comp.input.shape == (1, 3, 8, 112, 112)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (
            ["train.clip_sampling=first", "train.clips_per_video=3"],
            ["train.clips_per_video=3", "clip_sampling=random"],
        ),
        (["train.clip_sampling=middle"], ["train.clip_sampling", "random, first"]),
        (["train.clip_step=0"], ["train.clip_step=0", ">= 1"]),
    ],
)
def test_clip_settings_are_checked_at_load(override, words):
    with pytest.raises(ConfigError) as err:
        load_settings(compose_config("track=video", *override))
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_trainer_precision_auto_is_float32_on_a_cpu_and_mixed_on_a_gpu(monkeypatch) -> None:
    assert resolve_trainer({"precision": "auto", "accelerator": "cpu"})["precision"] == "32-true"
    assert resolve_trainer({"precision": "16-mixed"})["precision"] == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_trainer({"precision": "auto"})["precision"] == "bf16-mixed"
    assert resolve_trainer({"precision": "auto", "accelerator": "cpu"})["precision"] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_trainer({"precision": "auto", "accelerator": "gpu"})["precision"] == "16-mixed"


def test_ddp_relaunch_is_refused_in_a_sweep(monkeypatch) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lpcvlab.config import checks

    s = load_settings(
        compose_config("track=video", "train.trainer.devices=2", "train.trainer.strategy=ddp")
    )
    checks._check_relaunch(s.train)  # a single run: Lightning re-runs this command, fine

    class _Hydra:
        mode = RunMode.MULTIRUN

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: _Hydra()))
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="ddp_spawn"):
        checks._check_relaunch(s.train)
    monkeypatch.setenv("SLURM_NTASKS", "2")  # srun started one task per device: fine
    checks._check_relaunch(s.train)
    one = load_settings(compose_config("track=video", "train.trainer.strategy=ddp"))
    monkeypatch.delenv("SLURM_NTASKS")
    checks._check_relaunch(one.train)  # one device: nothing is re-launched


def test_worker_rank_from_launchers(monkeypatch) -> None:
    from lpcvlab.training.launch import worker_rank

    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert worker_rank() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's ddp re-launch
    assert worker_rank() == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert worker_rank() == 0
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert worker_rank() == 3
    monkeypatch.setenv("RANK", "2")  # torchrun
    assert worker_rank() == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_step_with_mixed_precision_and_channels_last() -> None:
    import pytorch_lightning as pl

    from lpcvlab.models.video import TinyVideoNet, VideoClassifier

    x = torch.rand(8, 3, 16, 112, 112)
    y = torch.randint(0, 4, (8,))
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=4)
    module = VideoClassifierModule(
        VideoClassifier(TinyVideoNet(4)),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        channels_last=True,
    )
    trainer = pl.Trainer(
        **resolve_trainer({"precision": "auto", "accelerator": "auto", "max_epochs": 1}),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, loader, loader)
    assert trainer.precision in ("bf16-mixed", "16-mixed")
    assert "val/top1" in trainer.callback_metrics


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_one_run(tmp_path: Path) -> None:
    """`python run.py ... train.trainer.devices=2 train.trainer.strategy=ddp` on the CPU
    (gloo): Lightning runs the command again as rank 1, which trains and leaves; rank 0 owns
    the one MLflow run and finishes it."""
    from mlflow.tracking import MlflowClient

    uri = seeded_store(tmp_path)
    cmd = [
        sys.executable,
        "run.py",
        "track=video",
        "backbone.width=4",
        f"paths.cache_dir={tmp_path}/cache",
        f"tracking.uri={uri}",
        f"tracking.artifact_root={tmp_path}/artifacts",
        f"hydra.run.dir={tmp_path}/out",
        "data.workers=0",
        "data.demo.videos_per_class_train=2",
        "data.demo.videos_per_class_val=2",
        "hub.profile_iterations=2",
        "hub.warmup_iterations=1",
        "train.trainer.max_epochs=2",
        "train.trainer.accelerator=cpu",
        "train.trainer.devices=2",
        "train.trainer.strategy=ddp",
        "train.trainer.enable_progress_bar=false",
        "train.batch_size=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training worker rank 1" in proc.stdout + proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lpcvc-video").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["train/world_size"] == "2"
    assert run.data.tags["train/strategy"] == "DDP"
    assert len(client.get_metric_history(run.info.run_id, "val/top1")) == 2
    assert "top1" in run.data.metrics
