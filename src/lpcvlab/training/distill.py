"""Distillation for Track 2: the teacher network, and its logits per clip, computed once.

A *clip* here is one candidate window of a training video -- the windows random-clip training
chooses from (``train.clip_step`` frames apart), each centre-cropped -- or, with
``train.clip_sampling=first``, the video's official clip. The teacher sees every clip once;
its logits are stored under ``<paths.cache_dir>/teacher_logits/<teacher digest>/`` one file per
video, keyed by the video's content, the frame settings and the windows, so later epochs and
later runs (a sweep over student settings) read them instead of running the teacher. The
student sees a random crop of the window whose logits it is taught with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lpcvlab.config.teacher import CHECKPOINT_KEY, Teacher
from lpcvlab.errors import ConfigError
from lpcvlab.models.video import VideoBackbone, VideoClassifier
from lpcvlab.models.weights import RANDOM
from lpcvlab.util.io import atomic_save_npy, load_cached_npy

log = logging.getLogger(__name__)


def build_teacher(teacher: Teacher, num_classes: int) -> tuple[nn.Module, str]:
    """The teacher as a frozen :class:`VideoClassifier` (its own normalisation inside) and a
    description of its weights.

    A checkpoint is rebuilt from the backbone it records (:data:`CHECKPOINT_KEY`) and its
    weights; a backbone option uses its ``pretrained`` weights, which must be trained on the
    class map: a random network, or Kinetics weights with a fresh head, teaches nothing.
    """
    if teacher.checkpoint is not None:
        path = Path(teacher.checkpoint)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        record = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
        if not isinstance(record, dict) or "backbone" not in record:
            raise ConfigError(
                f"train.distill.teacher={path}: not a checkpoint lpcvlab's training wrote (it "
                f"has no {CHECKPOINT_KEY!r} record of its backbone); name a backbone option with "
                "train.distill.teacher_pretrained=<weights> instead"
            )
        if record.get("track", "video") != "video":
            raise ConfigError(
                f"train.distill.teacher={path} was trained for track={record['track']}, not "
                "track=video"
            )
        factory = VideoBackbone({**record["backbone"], "pretrained": str(path)})  # type: ignore[arg-type]
        model, weights = factory.build(num_classes)
    else:
        assert teacher.backbone is not None
        factory = VideoBackbone(teacher.backbone)  # type: ignore[arg-type]
        model, weights = factory.build(num_classes)
        if weights in (RANDOM, "kinetics400"):
            has = "random weights" if weights == RANDOM else "Kinetics-400 weights, a fresh head"
            raise ConfigError(
                f"train.distill.teacher={teacher.backbone.name} has {has}, which teach "
                "nothing: set train.distill.teacher_pretrained=/path/to/weights trained on "
                "these classes, or train.distill.teacher=/path/to/lpcvlab.ckpt"
            )
    net = VideoClassifier(model, factory.mean, factory.std).eval()  # the weights' own
    for p in net.parameters():
        p.requires_grad_(False)
    return net, weights


@dataclass
class TeacherClips:
    """One training video as the teacher sees it: its cache key, how many clips it has, and
    its clips made on demand, a batch at a time (``clips(a, b)`` -> clips ``a..b-1``,
    ``(b - a, 3, T, H, W)`` in [0,1]), so a long video is never held whole."""

    key: str
    count: int
    clips: Callable[[int, int], torch.Tensor]


@dataclass
class TeacherLogits:
    """Logits per video, one row per clip; how many videos came from the cache."""

    logits: list[np.ndarray]
    cached: int
    computed: int


def teacher_logits(
    net: nn.Module,
    videos: Sequence[TeacherClips],
    folder: Path,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> TeacherLogits:
    """The teacher's logits for every clip of every video: read from ``folder/<key>.npy`` when
    there, else computed (in batches, with a progress bar) and stored there atomically."""
    out: list[np.ndarray] = []
    cached = computed = 0
    todo = []
    for i, video in enumerate(videos):
        path = folder / f"{video.key}.npy"
        arr = _load(path, video.count)
        out.append(arr if arr is not None else np.empty((0,)))
        if arr is None:
            todo.append(i)
        else:
            cached += 1
    if todo:
        net = net.to(device)
        for i in tqdm(todo, desc="teacher logits", unit="video", leave=False):
            video = videos[i]
            rows = []
            with torch.no_grad():
                for a in range(0, video.count, batch_size):
                    clips = video.clips(a, min(a + batch_size, video.count))
                    rows.append(net(clips.to(device)).float().cpu())
            arr = torch.cat(rows).numpy().astype(np.float32)
            atomic_save_npy(folder / f"{video.key}.npy", arr)
            out[i] = arr
            computed += 1
        net.to("cpu")
    log.info("teacher logits: %d videos from the cache, %d computed", cached, computed)
    return TeacherLogits(out, cached, computed)


def _load(path: Path, count: int) -> np.ndarray | None:
    return load_cached_npy(path, lambda arr: arr.ndim == 2 and len(arr) == count)
