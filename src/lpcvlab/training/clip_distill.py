"""Track 1 distillation targets: the teacher's embeddings of the training split, computed once.

The teacher (:func:`lpcvlab.models.clip.build_clip_teacher`) embeds every training image and
caption before training; the result is cached on disk under ``<paths.cache_dir>/teacher/``,
keyed by the teacher's weights (a hash of its state), the training split's content hash, the
image resize and normalisation and the captions, so a second run with the same teacher and data
reuses it (and says so), and a changed teacher or a changed file computes it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lpcvlab.data.images import ImagePreprocess
from lpcvlab.models.clip import ClipTeacher
from lpcvlab.util.hashing import state_dict_digest
from lpcvlab.util.io import atomic_save_npy, atomic_write_text, file_lock, load_cached_npy

log = logging.getLogger(__name__)

_VERSION = 1


@dataclass
class TeacherEmbeddings:
    image: np.ndarray  # (n_images, D) float32, L2-normalised
    text: np.ndarray  # (n_captions, D) float32, L2-normalised
    logit_scale: float
    reused: bool  # read from the cache (else computed now)
    key: str
    seconds: float


def teacher_embeddings(
    teacher: ClipTeacher,
    pixels: np.ndarray,
    captions: Sequence[str],
    preprocess: ImagePreprocess,
    data_sha256: str,
    cache_dir: Path | str,
    batch_size: int = 64,
) -> TeacherEmbeddings:
    """The teacher's embeddings of ``pixels`` (uint8, ``(N, 3, S, S)``) and ``captions``, from
    the cache or computed now (on the GPU when there is one).

    ``preprocess`` is the student's host preprocessing with its in-model mean/std folded in
    (what the student's encoder works on); the teacher gets its own weights' normalisation
    instead when they have one (``teacher.mean``/``std``).
    """
    t0 = time.perf_counter()
    mean = teacher.mean if teacher.mean is not None else preprocess.mean
    std = teacher.std if teacher.std is not None else preprocess.std
    parts = {
        "version": _VERSION,
        "teacher": state_dict_digest(teacher.model),
        "data": data_sha256,
        "size": preprocess.size,
        "resample": preprocess.resample,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "captions": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir) / "teacher"
    paths = {name: folder / f"{key}-{name}.npy" for name in ("image", "text")}
    meta = folder / f"{key}.json"
    with file_lock(meta):
        if meta.is_file():
            image = load_cached_npy(paths["image"], lambda a: len(a) == len(pixels))
            text = load_cached_npy(paths["text"], lambda a: len(a) == len(captions))
            if image is not None and text is not None:
                scale = float(json.loads(meta.read_text())["logit_scale"])
                log.info("teacher %s: embeddings reused from %s", teacher.description, folder)
                return TeacherEmbeddings(image, text, scale, True, key, time.perf_counter() - t0)
        image, text, scale = _compute(
            teacher, pixels, captions, ImagePreprocess(preprocess.size, None, mean, std), batch_size
        )
        atomic_save_npy(paths["image"], image)
        atomic_save_npy(paths["text"], text)
        atomic_write_text(
            meta, json.dumps(parts | {"logit_scale": scale, "what": teacher.description})
        )
    return TeacherEmbeddings(image, text, scale, False, key, time.perf_counter() - t0)


@torch.no_grad()
def _compute(
    teacher: ClipTeacher,
    pixels: np.ndarray,
    captions: Sequence[str],
    scale_pixels: ImagePreprocess,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = teacher.model.to(device).eval()
    images = []
    for i in tqdm(range(0, len(pixels), batch_size), desc="teacher: images", unit="batch"):
        x = torch.from_numpy(scale_pixels.scale(pixels[i : i + batch_size])).to(device)
        images.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    texts = []
    for i in tqdm(range(0, len(captions), batch_size), desc="teacher: captions", unit="batch"):
        tokens = torch.as_tensor(np.asarray(teacher.tokenizer(list(captions[i : i + batch_size]))))
        texts.append(F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1).cpu())
    scale = float(model.logit_scale.exp().clamp(max=100).item())
    model.to("cpu")
    return torch.cat(images).numpy(), torch.cat(texts).numpy(), scale
