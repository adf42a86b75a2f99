"""Track 2: classify QEVD fitness videos with R(2+1)D-style models; score Top-1 / Top-5.

Evaluation is at two levels, as torchvision's video references do: per clip, and per video
(softmax averaged over the video's clips). The results file is written in the official layout so
the organisers' ``evaluate.py`` reads it unchanged. Evaluation clips stay in the decode cache
and are read on demand (:class:`~lpcvlab.data.clips.CachedClips`), so memory does not grow with
the number of validation videos.

Training (``train=finetune``) follows torchvision's video recipe by default: each training
video is decoded once into its uint8 frame sequence, and every epoch takes a random window and
a random crop of it (``train.clip_sampling=random``; ``first`` trains on the official clip),
optionally distilled from a teacher whose logits per clip are cached
(:mod:`lpcvlab.training.distill`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpcvlab.config.schema import (
    FinetuneConfig,
    TrainConfig,
    VideoDataConfig,
    VideoFinetuneConfig,
    VideoPreprocessConfig,
    VideoTrackConfig,
)
from lpcvlab.config.teacher import Teacher
from lpcvlab.config.weights import normalization_text
from lpcvlab.data.batch import (
    CLIPS,
    FRAMES,
    DecodeBatch,
    cached_sha256,
    decode_videos,
    skipped_summary,
)
from lpcvlab.data.clips import CachedClips
from lpcvlab.data.formats import ManifestRecord, check_results_against_manifest, write_results_h5
from lpcvlab.data.frames import VideoPreprocess, centre_offsets
from lpcvlab.data.qevd import VideoSample, load_class_map, read_split
from lpcvlab.errors import ConfigError, DataError
from lpcvlab.metrics import softmax, top_k_accuracy
from lpcvlab.models.video import VideoBackbone
from lpcvlab.tracks.base import TrackData, data_source
from lpcvlab.types import (
    Component,
    DatasetRecord,
    EvalResult,
    ModelBundle,
    ReferenceParity,
    RunLog,
    TensorSpec,
)
from lpcvlab.util.console import stage
from lpcvlab.util.hashing import file_sha256, manifest_sha256

log = logging.getLogger(__name__)

VIDEO = "video_classifier"


@dataclass
class VideoPayload:
    val: list[VideoSample]  # decoded validation videos, manifest (sorted full path) order
    val_cache: list[Path | None]  # the decoded tensor file of each, when cached
    clips_per_video: int
    class_names: list[str]  # index -> name
    train: list[VideoSample]  # decoded training videos (empty without training)
    train_cache: list[Path]
    # what train_cache holds: "clips" (the official float32 clip) or "frames" (the uint8 frame
    # sequence random-clip training cuts windows from)
    train_kind: str = CLIPS


def video_preprocess(video: VideoPreprocessConfig) -> VideoPreprocess:
    return VideoPreprocess(
        frame_selection=video.frame_selection,
        fps=video.fps,
        num_frames=video.num_frames,
        resize=(int(video.resize[0]), int(video.resize[1])),
        crop=video.crop,
        clips_per_video=video.clips_per_video,
    )


def _skips_csv(path: Path, batches: dict[str, DecodeBatch]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "video_path", "reason", "message"])
        for split, batch in batches.items():
            w.writerows((split, s.path, s.reason, s.message) for s in batch.skipped)
    return path


class VideoTrack:
    name = "video"

    def __init__(
        self,
        track: VideoTrackConfig,
        data: VideoDataConfig,
        video: VideoPreprocessConfig,
        backbone: VideoBackbone,
        cache_dir: str | Path,
        seed: int = 0,
        teacher: Teacher | None = None,
        train: TrainConfig | None = None,
    ) -> None:
        self.teacher = teacher  # train.distill.teacher, resolved (None: no distillation)
        self.train_settings = train  # which clips training reads decides what is decoded
        self.cache_dir = Path(cache_dir)
        self.settings = track
        self.data = data
        self.preprocess = video_preprocess(video)
        self.backbone = backbone
        self.clip_cache = Path(cache_dir) / "video_clips"
        self.seed = seed
        self.class_map = load_class_map(data.class_map)
        # The file as read (validated above), kept with the results: evaluate.py --class_map.
        self.class_map_json = (
            Path(data.class_map).read_bytes()
            if data.class_map is not None
            else resources.files("lpcvlab").joinpath("resources/track2_class_map.json").read_bytes()
        )

    def _decode(
        self, samples: list[VideoSample], pp: VideoPreprocess, desc: str, kind: str = CLIPS
    ) -> DecodeBatch:
        """Fill the decode cache (nothing is kept in memory: stages read the cache)."""
        return decode_videos(
            [s.path for s in samples],
            pp,
            cache_dir=self.clip_cache,
            workers=int(self.data.workers),
            return_tensors=False,
            desc=desc,
            kind=kind,
        )

    @property
    def train_kind(self) -> str:
        """What the training split is decoded into: frame sequences for random clips."""
        t = self.train_settings
        if isinstance(t, VideoFinetuneConfig) and t.clip_sampling == "random":
            return FRAMES
        return CLIPS

    def load_data(self, work_dir: Path, *, training: bool = False) -> TrackData:
        data = self.data
        assert data.root is not None  # checked when the config was loaded
        if data.demo is not None:
            from lpcvlab.data.demo_video import make_demo_video_dataset

            make_demo_video_dataset(
                data.root,
                seed=data.demo.seed,
                videos_per_class_train=data.demo.videos_per_class_train,
                videos_per_class_val=data.demo.videos_per_class_val,
            )
        class_map = self.class_map
        pp = self.preprocess
        val_split = read_split(data.root, data.val_split, class_map)
        train_split = read_split(data.root, data.train_split, class_map) if training else None

        batches: dict[str, DecodeBatch] = {}
        val = self._decode(val_split.samples, pp, f"decode {data.val_split}")
        batches[data.val_split] = val
        kept = [(s, r) for s, r in zip(val_split.samples, val.results, strict=True) if r.ok]
        if not kept:
            raise DataError(f"{data.root}/{data.val_split}: no video could be decoded")
        # (N*C, 3, T, H, W), or (N*C, T, H, W, 3): read from the cache on demand
        clips = CachedClips(
            [r.cache_path for _, r in kept],
            pp.clips_per_video,
            pp.clip_shape,
            channel_last=bool(self.settings.channel_last),
        )

        train, train_cache = [], []
        kind = self.train_kind
        if train_split is not None:
            one_clip = VideoPreprocess(**{**pp.__dict__, "clips_per_video": 1})
            what = "frames" if kind == FRAMES else "clips"
            tb = self._decode(
                train_split.samples, one_clip, f"decode {data.train_split} ({what})", kind
            )
            batches[data.train_split] = tb
            pairs = [
                (s, r.cache_path)
                for s, r in zip(train_split.samples, tb.results, strict=True)
                if r.ok
            ]
            train = [s for s, _ in pairs]
            train_cache = [p for _, p in pairs]
            if not train:
                raise DataError(f"{data.root}/{data.train_split}: no video could be decoded")

        stats: dict[str, float] = {"val_videos": len(kept), "train_videos": len(train)}
        for read in (val_split, train_split):
            if read is not None:  # files in class folders that are not videos (.txt, .jpg...)
                stats[f"{read.name}_non_video_files"] = len(read.non_video_files)
        for split, batch in batches.items():
            stats[f"{split}_skipped"] = len(batch.skipped)
            stats[f"{split}_cache_hits"] = batch.cache_hits
            for reason, n in batch.skip_counts().items():
                stats[f"{split}_skipped/{reason}"] = n
        reports = []
        if any(b.skipped for b in batches.values()):
            reports.append(_skips_csv(work_dir / "skipped_videos.csv", batches))
            for split, batch in batches.items():
                if batch.skipped:
                    stage("data", skipped_summary(batch, split, reports[-1]))
        names = [n for n, _ in sorted(class_map.items(), key=lambda kv: kv[1])]
        payload = VideoPayload(
            val=[s for s, _ in kept],
            val_cache=[r.cache_path for _, r in kept],
            clips_per_video=pp.clips_per_video,
            class_names=names,
            train=train,
            train_cache=train_cache,
            train_kind=kind,
        )
        datasets = [self._dataset(data.val_split, "evaluation", payload.val, payload.val_cache)]
        if train:
            datasets.append(self._dataset(data.train_split, "training", train, train_cache))
        return TrackData(
            inputs={VIDEO: clips},
            stats=stats,
            reports=reports,
            payload=payload,
            datasets=datasets,
        )

    def _dataset(
        self, split: str, context: str, samples: list[VideoSample], cached: list
    ) -> DatasetRecord:
        """A split as MLflow shows it: its videos' content hashes (already computed: they name
        the decode cache's entries) by class and file name."""
        entries = [
            (f"{s.class_name}/{s.path.name}", cached_sha256(c) if c else file_sha256(s.path))
            for s, c in zip(samples, cached, strict=True)
        ]
        return DatasetRecord(
            name=f"{self.data.name}/{split}",
            context=context,
            source=data_source(self.data),
            sha256=manifest_sha256(entries),
            profile={"videos": len(samples), "classes": len({s.label for s in samples})},
        )

    def calibration_inputs(self, data: TrackData, component: str, n: int) -> np.ndarray | None:
        """Up to ``n`` training clips, evenly spaced over the class-sorted training split, in the
        exported layout: what calibrates a quantized model. None without a training split."""
        payload: VideoPayload = data.payload
        if component != VIDEO or not payload.train_cache:
            return None
        from lpcvlab.deploy.precision.calibration import spread

        clips = []
        top, left = centre_offsets(self.preprocess.resize, self.preprocess.crop)
        t, c = self.preprocess.num_frames, self.preprocess.crop
        for i in spread(len(payload.train_cache), min(n, len(payload.train_cache))):
            arr = np.load(payload.train_cache[int(i)], mmap_mode="r")
            if payload.train_kind == FRAMES:  # window 0, centre crop: the official clip
                window = arr[:, :t, top : top + c, left : left + c]
                clips.append(np.asarray(window, dtype=np.float32) / 255)
                continue
            clips.append(np.asarray(arr[0] if arr.ndim == 5 else arr, dtype=np.float32))
        stacked = np.stack(clips)  # (n, 3, T, H, W)
        if self.settings.channel_last:
            stacked = np.ascontiguousarray(stacked.transpose(0, 2, 3, 4, 1))
        return stacked

    def _bundle(self, model: object, weights: str) -> ModelBundle:
        from lpcvlab.models.video import VideoClassifier

        channel_last = bool(self.settings.channel_last)
        shape = (1, *self.preprocess.clip_shape)
        if channel_last:
            shape = (1, shape[2], shape[3], shape[4], shape[1])
        net = VideoClassifier(
            model, self.backbone.mean, self.backbone.std, channel_last=channel_last
        )
        return ModelBundle(
            components=[
                Component(
                    VIDEO,
                    net,
                    TensorSpec("video", shape, "float32", channel_last=channel_last),
                    output_name="class_probs",
                )
            ],
            weights=weights,
            model=model,
            facts=self.facts(),
        )

    def facts(self) -> dict[str, str]:
        """The normalisation baked into the export and where it was read (params and tags)."""
        b = self.backbone
        return {
            "normalization": f"{normalization_text(b.mean, b.std)} in the graph",
            "normalization/mean": ",".join(f"{v:.8g}" for v in b.mean),
            "normalization/std": ",".join(f"{v:.8g}" for v in b.std),
            "normalization/where": "graph",
            "normalization/from": b.normalization_from,
        }

    def reference_parity(self, bundle: ModelBundle, data: TrackData) -> ReferenceParity:
        """The model as loaded, in the export wrapper with the weights' normalisation, against
        torchvision's builder with its ``weights.transforms()`` normalisation on the same
        weights (:func:`lpcvlab.models.video.video_reference`), on the organisers' input:
        (1,3,T,112,112) clips in [0,1]."""
        from lpcvlab.models.video import VideoClassifier, video_reference
        from lpcvlab.models.weights import REFERENCE_SAMPLES, reference_parity

        model, weights = self.backbone.take_loaded()
        b = self.backbone
        reference = video_reference(b.settings, b.plan, model, weights, b.mean, b.std)
        clips = np.asarray(data.inputs[VIDEO][:REFERENCE_SAMPLES], dtype=np.float32)
        if self.settings.channel_last:  # (N,T,H,W,3) -> the organisers' (N,3,T,H,W)
            clips = clips.transpose(0, 4, 1, 2, 3)
        x = torch.from_numpy(np.ascontiguousarray(clips))
        ours = {VIDEO: VideoClassifier(model, b.mean, b.std).eval()}
        return reference_parity(ours, model, (b.mean, b.std), reference, {VIDEO: x})

    def build_model(self) -> ModelBundle:
        model, weights = self.backbone.build(len(self.class_map))
        return self._bundle(model, weights)

    def train(
        self,
        bundle: ModelBundle,
        data: TrackData,
        settings: TrainConfig,
        run: RunLog,
        work_dir: Path,
    ) -> ModelBundle:
        from hydra.utils import instantiate

        from lpcvlab.models.video import VideoClassifier
        from lpcvlab.training.fit import fit
        from lpcvlab.training.module import (
            ClipDataModule,
            ClipDataset,
            VideoClassifierModule,
            set_trainable,
        )

        if not isinstance(settings, VideoFinetuneConfig):
            raise ConfigError(f"train={settings.name} is not available for track=video")
        payload: VideoPayload = data.payload
        if payload.train_kind != self.train_kind:
            raise ConfigError(
                f"train.clip_sampling={settings.clip_sampling} needs the training split decoded "
                f"as {self.train_kind}, but it was decoded as {payload.train_kind}"
            )
        train_set = self._train_set(settings, payload)
        teacher_desc = ""
        if self.teacher is not None:
            targets, teacher_desc = self._teacher_targets(train_set, payload, run)
            train_set.set_targets(targets)
        # Validation during training: the first clip of each validation video, channel-first.
        val_set = ClipDataset(
            [p for p in payload.val_cache if p is not None],
            [s.label for s, p in zip(payload.val, payload.val_cache, strict=True) if p is not None],
        )
        gpu = _uses_gpu(settings)
        dm = ClipDataModule(
            train_set,
            val_set,
            int(settings.batch_size),
            int(settings.num_workers),
            seed=self.seed,
            pin_memory=gpu,
        )
        model = copy.deepcopy(bundle.model)
        net = VideoClassifier(model, self.backbone.mean, self.backbone.std)
        prefixes = list(settings.trainable)
        trainable, total = set_trainable(model, prefixes)
        log.info("training %d of %d parameters (prefixes %s)", trainable, total, prefixes)
        run.set_tags({"train/trainable_params": str(trainable), "train/total_params": str(total)})
        stage(
            "train",
            self._describe(settings, payload, bundle.weights, trainable, total, teacher_desc),
        )
        distill = settings.distill
        channels_last = settings.channels_last if settings.channels_last is not None else gpu
        module = VideoClassifierModule(
            net,
            optimizer=instantiate(settings.optimizer),
            scheduler=instantiate(settings.scheduler) if settings.scheduler else None,
            distill=(float(distill.weight), float(distill.temperature)) if self.teacher else None,
            channels_last=bool(channels_last),
        )
        net.train()
        record = {
            "track": self.name,
            "backbone": dataclasses.asdict(self.backbone.settings),
            # what the weights were trained with here (lpcvlab.config.weights.read_record)
            "normalization": {"mean": list(self.backbone.mean), "std": list(self.backbone.std)},
        }
        result = fit(settings, module, dm, run, work_dir, record=record)
        net.eval()
        net.to(memory_format=torch.contiguous_format)
        log.info(
            "fine-tuning done: best %s %.4f (%s)",
            result.monitor,
            result.best_score,
            result.best_checkpoint,
        )
        return self._bundle(model, bundle.weights)

    def _train_set(self, settings: VideoFinetuneConfig, payload: VideoPayload) -> Any:
        """The training items: random windows and crops of each video's frame sequence, or the
        official clip (``first``)."""
        from lpcvlab.training.module import ClipDataset, FrameWindowDataset

        aug = settings.augment
        labels = [s.label for s in payload.train]
        if payload.train_kind == FRAMES:
            return FrameWindowDataset(
                payload.train_cache,
                labels,
                num_frames=self.preprocess.num_frames,
                crop=self.preprocess.crop,
                clips_per_video=int(settings.clips_per_video),
                clip_step=int(settings.clip_step),
                flip=bool(aug.flip),
                translate=int(aug.translate),
                seed=self.seed,
            )
        return ClipDataset(
            payload.train_cache,
            labels,
            flip=bool(aug.flip),
            translate=int(aug.translate),
            seed=self.seed,
        )

    def _teacher_targets(
        self, train_set: Any, payload: VideoPayload, run: RunLog
    ) -> tuple[Any, str]:
        """The teacher's logits for every clip of every training video (see
        :mod:`lpcvlab.training.distill`), from the cache where it has them."""
        from lpcvlab.training.distill import TeacherClips, build_teacher, teacher_logits
        from lpcvlab.training.module import FrameWindowDataset
        from lpcvlab.util.hashing import state_dict_digest

        assert self.teacher is not None
        net, weights = build_teacher(self.teacher, len(self.class_map))
        digest = hashlib.sha256(f"{state_dict_digest(net)}|{net!r}".encode()).hexdigest()[:16]
        pp = self.preprocess
        videos = []
        if isinstance(train_set, FrameWindowDataset):
            top, left = centre_offsets(pp.resize, pp.crop)
            what = f"{pp.sequence_key()};step={train_set.clip_step};crop={pp.crop};centre"
            for v, path in enumerate(train_set.frames):
                windows = len(train_set.windows(v))

                def clips(a: int, b: int, v: int = v) -> torch.Tensor:
                    return torch.stack([train_set.clip(v, w, top, left) for w in range(a, b)])

                videos.append((path, windows, clips))
            targets_of = list
        else:
            what = VideoPreprocess(**{**pp.__dict__, "clips_per_video": 1}).key()
            for i, path in enumerate(train_set.clips):

                def clips(a: int, b: int, i: int = i) -> torch.Tensor:
                    return torch.from_numpy(train_set._load(i).copy())[None]

                videos.append((path, 1, clips))

            def targets_of(rows: list[np.ndarray]) -> np.ndarray:
                return np.concatenate(rows)

        key = hashlib.sha256(what.encode()).hexdigest()[:16]
        items = [
            TeacherClips(f"{cached_sha256(path)}-{key}", count, clips)
            for path, count, clips in videos
        ]
        folder = self.cache_dir / "teacher_logits" / digest
        device = "cuda" if torch.cuda.is_available() else "cpu"
        got = teacher_logits(net, items, folder, device=device)
        run.log_metrics(
            {
                "train/teacher_videos_cached": float(got.cached),
                "train/teacher_videos_computed": float(got.computed),
            }
        )
        description = self.teacher.description
        run.set_tags({"distill/teacher": description, "distill/teacher_weights": weights})
        run.set_tags({"distill/teacher_digest": digest})
        if payload.train_kind != FRAMES:
            assert all(len(r) == 1 for r in got.logits)
        summary = f"{got.computed} videos' logits computed, {got.cached} cached"
        return targets_of(got.logits), f"{description} ({summary})"

    def _describe(
        self,
        settings: VideoFinetuneConfig,
        payload: VideoPayload,
        weights: str,
        trainable: int,
        total: int,
        teacher: str,
    ) -> str:
        """One line on what trains: the console says it before the epochs start."""
        pp = self.preprocess
        layers = (
            "all layers" if not settings.trainable else f"layers {', '.join(settings.trainable)}"
        )
        if payload.train_kind == FRAMES:
            step = settings.clip_step
            clips = (
                f"{settings.clips_per_video} random {pp.num_frames}-frame window"
                f"{'s' if settings.clips_per_video > 1 else ''} ({pp.frame_selection}, windows "
                f"{step} frame{'s' if step > 1 else ''} apart) with a random {pp.crop} crop per "
                "video per epoch"
            )
        else:
            clips = f"the official clip ({pp.num_frames} frames, centre {pp.crop} crop)"
        epochs = settings.trainer.get("max_epochs", "?")
        epochs = f"{epochs} epoch{'' if epochs == 1 else 's'}"
        classes = len({s.label for s in payload.train})
        line = (
            f"{self.backbone.name} ({weights} weights), {trainable:,} of {total:,} parameters "
            f"({layers}), {epochs} of {clips}; {len(payload.train)} videos of {classes} "
            f"classes, batch {settings.batch_size}"
        )
        if teacher:
            line += f"; distilled from {teacher}"
        return ("demo: " if self.data.demo is not None else "") + line

    def evaluate(
        self, data: TrackData, outputs: dict[str, np.ndarray], work_dir: Path
    ) -> EvalResult:
        payload: VideoPayload = data.payload
        logits = outputs[VIDEO]
        n, c = len(payload.val), payload.clips_per_video
        if logits.shape[0] != n * c:
            raise DataError(f"got {logits.shape[0]} outputs for {n} videos x {c} clips")
        labels = np.array([s.label for s in payload.val])
        clip_logits = logits.reshape(n, c, -1)
        probs = softmax(clip_logits, axis=-1).mean(axis=1)  # video level: mean softmax
        metrics = {
            "top1": top_k_accuracy(probs, labels, 1),
            "top5": top_k_accuracy(probs, labels, 5),
            "clip_top1": top_k_accuracy(logits, np.repeat(labels, c), 1),
            "clip_top5": top_k_accuracy(logits, np.repeat(labels, c), 5),
        }
        # Official results file: one (1, classes) row per video in manifest order. With one clip
        # these are the raw logits; with several, log(mean softmax), whose softmax is the mean.
        rows = clip_logits[:, 0] if c == 1 else np.log(np.maximum(probs, 1e-30))
        results = write_results_h5(work_dir / "results.h5", rows)
        manifest = work_dir / "manifest.jsonl"
        shape = [c, *data.inputs[VIDEO].shape[1:]]
        with open(manifest, "w") as f:
            for s, p in zip(payload.val, payload.val_cache, strict=True):
                record = ManifestRecord(
                    video_path=str(s.path),
                    label=s.class_name,
                    tensor_path=str(p) if p else "",
                    shape=shape,
                    dtype="torch.float32",
                )
                f.write(record.to_json() + "\n")
        check_results_against_manifest(manifest, results)
        class_map = work_dir / "class_map.json"  # the one this run used, as read
        class_map.write_bytes(self.class_map_json)
        per_video = work_dir / "per_video_predictions.csv"
        top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
        with open(per_video, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["video_path", "label", "class", "predicted", "predicted_class", "prob", "top5"]
            )
            for i, s in enumerate(payload.val):
                p = int(top5[i, 0])
                w.writerow(
                    [
                        s.path,
                        s.label,
                        s.class_name,
                        p,
                        payload.class_names[p],
                        f"{probs[i, p]:.6f}",
                        ";".join(payload.class_names[j] for j in top5[i]),
                    ]
                )
        confusion = _confusion_png(
            work_dir / "confusion_matrix.png", labels, top5[:, 0], payload.class_names
        )
        return EvalResult(
            metrics=metrics,
            artifacts=[results, manifest, class_map, per_video, confusion],
            summary={"videos": n, "clips_per_video": c},
        )


def _confusion_png(path: Path, labels: np.ndarray, preds: np.ndarray, names: list[str]) -> Path:
    """Confusion matrix over the classes that occur (92 would be unreadable for a demo)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(set(labels.tolist()) | set(preds.tolist()))
    index = {k: i for i, k in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(labels, preds, strict=True):
        m[index[int(t)], index[int(p)]] += 1
    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ticks = [names[k] for k in classes]
    ax.set_xticks(range(len(classes)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), ticks, fontsize=7)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _uses_gpu(settings: FinetuneConfig) -> bool:
    """Whether the Trainer will run on a CUDA device (``accelerator`` auto/gpu/cuda, one there)."""
    accelerator = str(settings.trainer.get("accelerator", "auto"))
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
