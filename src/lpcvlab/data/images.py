"""Turn Track 1 files into the tensors the deployed encoders receive.

Images: exactly the organisers' upload path — PIL ``resize((224, 224))`` with PIL's default
filter, ``/255``, NCHW float32; mean/std only when the preprocess config asks for it on the host.
Text: CLIP BPE to ``(77,)`` int64 with SOT/EOT; longer captions are truncated and counted.

Images PIL cannot turn into pixels are skipped and named with their CSV row: unreadable or
truncated files, and images above PIL's decompression-bomb limit. 16-bit and 32-bit grey images
are scaled to 8 bits before the RGB conversion, which would otherwise clip them to white.

A training split is decoded once (:func:`decode_training_images`) into a uint8 cache of resized
images, memory-mapped, keyed by the files' content and the resize: epochs, the distillation
teacher and calibration read it instead of decoding again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from lpcvlab.data.captions import CaptionImage, CaptionSplit, Skip
from lpcvlab.data.track1 import ImageRow
from lpcvlab.util.hashing import file_sha256, manifest_sha256
from lpcvlab.util.io import atomic_write, atomic_write_text, file_lock

log = logging.getLogger(__name__)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ImagePreprocess:
    size: int = 224
    resample: str | None = None  # None = PIL's default for Image.resize (what the organisers use)
    mean: tuple[float, float, float] | None = None  # applied on the host, before upload
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.resample is not None and self.resample not in _RESAMPLE:
            raise ValueError(
                f"preprocess.image.resample must be one of {sorted(_RESAMPLE)} or null"
            )
        if (self.mean is None) != (self.std is None):
            raise ValueError("preprocess.image.mean and std must be set together")

    def resized(self, img: Image.Image) -> np.ndarray:
        """The resized RGB pixels, ``(3, size, size)`` uint8 (what :meth:`scale` turns into the
        model's input)."""
        img = to_8bit(img).convert("RGB")
        size = (self.size, self.size)
        img = (
            img.resize(size)
            if self.resample is None
            else img.resize(size, _RESAMPLE[self.resample])
        )
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)

    def scale(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels ``(..., 3, H, W)`` -> float32 in [0,1], mean/std when asked for."""
        x = np.asarray(pixels, dtype=np.float32) / 255.0
        if self.mean is not None:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x.astype(np.float32)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.scale(self.resized(img))


_16_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16- or 32-bit single-channel image as 8-bit grey (``L``), scaled so that
    ``convert("RGB")`` keeps its contrast (PIL clips every value above 255 to white).

    * ``I;16`` (any byte order): ``round(v * 255 / 65535)``;
    * ``I`` (32-bit integers, how some readers hand over 16-bit data): the same when every value
      is in 0..65535, else the image's own min..max stretched to 0..255;
    * ``F`` (32-bit floats): values in [0, 1] times 255, values in [0, 255] as they are, any
      other range stretched from min..max; NaN and infinities become 0.

    Any other mode is returned unchanged.
    """
    if img.mode not in _16_BIT_MODES and img.mode not in ("I", "F"):
        return img
    a = np.asarray(img, dtype=np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode in _16_BIT_MODES or (img.mode == "I" and lo >= 0 and hi <= 65535):
        full = 65535.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        full = 1.0
    elif img.mode == "F" and lo >= 0 and hi <= 255:
        full = 255.0
    else:  # outside every usual range: stretch what is there
        a, full = a - lo, max(hi - lo, 1e-12)
    return Image.fromarray(np.rint(a * (255.0 / full)).astype(np.uint8))


def _too_many_pixels(exc: Image.DecompressionBombError) -> str:
    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
    return (
        f"image has {size}, above PIL's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} "
        "(2 x Image.MAX_IMAGE_PIXELS); resize it or raise the limit"
    )


def load_images(
    rows: Sequence[ImageRow], preprocess: ImagePreprocess
) -> tuple[np.ndarray, list[ImageRow], list[Skip]]:
    """Decode every listed image; unreadable, truncated or oversized files are skipped and
    reported (file, CSV row, reason)."""
    arrays, kept, skipped = [], [], []
    for row in tqdm(rows, desc="decode images", unit="img"):
        try:
            with Image.open(row.path) as img:
                img.load()  # forces a full decode: a truncated file fails here, not later
                arrays.append(preprocess(img))
            kept.append(row)
        except Image.DecompressionBombError as exc:  # not an OSError
            msg = f"image too large (row {row.row} of img_list.csv): {_too_many_pixels(exc)}"
            log.warning("%s: %s; skipped", row.path, msg)
            skipped.append(Skip(row.name, row.row, msg))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            msg = f"unreadable image (row {row.row} of img_list.csv): {exc}"
            log.warning("%s: %s; skipped", row.path, msg)
            skipped.append(Skip(row.name, row.row, msg))
    shape = (0, 3, preprocess.size, preprocess.size)
    return (np.stack(arrays) if arrays else np.empty(shape, np.float32)), kept, skipped


def tokenize(
    captions: Sequence[str], tokenizer, context_length: int | None = None
) -> tuple[np.ndarray, list[int]]:
    """CLIP BPE tokens ``(N, L)`` int64, and the indices of captions that were truncated
    (``L``: ``context_length``, else the tokenizer's own, 77 for CLIP's)."""
    if context_length is None:
        context_length = int(getattr(tokenizer, "context_length", 77) or 77)
    encoder = getattr(tokenizer, "encode", None)
    truncated = []
    if encoder is not None:
        for i, caption in enumerate(captions):
            if len(encoder(caption)) + 2 > context_length:  # + SOT and EOT
                truncated.append(i)
    tokens = tokenizer(list(captions), context_length=context_length)
    return np.asarray(tokens, dtype=np.int64), truncated


@dataclass
class DecodedImages:
    """A training split's images, decoded once: ``pixels[i]`` is ``images[i]`` resized,
    ``(3, size, size)`` uint8, memory-mapped from the cache."""

    pixels: np.ndarray
    images: list[CaptionImage]
    skipped: list[Skip]  # unreadable, truncated or oversized files (file, row, reason)
    sha256: str  # content hash of the metadata files and every image listed
    cache_path: Path
    reused: bool  # the cache was there already


def split_sha256(split: CaptionSplit) -> str:
    """The content hash of a training split: its metadata files and every listed image, by
    name (the same files give the same digest whatever the preprocessing)."""
    entries = [(name, file_sha256(split.root / name)) for name in split.lists]
    for image in tqdm(split.images, desc="hash training images", unit="img", leave=False):
        entries.append((f"images/{image.name}", file_sha256(image.path)))
    return manifest_sha256(entries)


def decode_training_images(
    split: CaptionSplit, preprocess: ImagePreprocess, cache_dir: Path | str
) -> DecodedImages:
    """Decode and resize every image of ``split`` once into ``cache_dir/track1_train/`` (keyed
    by the content hash and the resize), or reuse that cache. Images PIL cannot read are skipped
    and reported with their row, as the evaluation reader does; the report is kept with the
    cache, so a second run reports them too."""
    sha = split_sha256(split)
    key = hashlib.sha256(f"{sha}|{preprocess.size}|{preprocess.resample}|v1".encode()).hexdigest()[
        :24
    ]
    path = Path(cache_dir) / "track1_train" / f"{key}.npy"
    meta_path = path.with_suffix(".json")
    with file_lock(path):
        reused = path.is_file() and meta_path.is_file()
        if not reused:
            _decode_into(split.images, preprocess, path, meta_path)
        meta = json.loads(meta_path.read_text())
    kept = set(meta["kept"])
    images = [image for image in split.images if image.name in kept]
    skipped = [Skip(str(f), int(r), str(why)) for f, r, why in meta["skipped"]]
    pixels = np.load(path, mmap_mode="r")[: len(images)]
    return DecodedImages(pixels, images, skipped, sha, path, reused)


def _decode_into(
    images: Sequence[CaptionImage], preprocess: ImagePreprocess, path: Path, meta_path: Path
) -> None:
    shape = (len(images), 3, preprocess.size, preprocess.size)
    kept: list[str] = []
    skipped: list[tuple[str, int, str]] = []

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for image in tqdm(images, desc="decode training images", unit="img"):
            try:
                with Image.open(image.path) as img:
                    img.load()  # a truncated file fails here, not later
                    out[len(kept)] = preprocess.resized(img)
                kept.append(image.name)
            except Image.DecompressionBombError as exc:
                msg = f"image too large ({image.where}): {_too_many_pixels(exc)}"
                log.warning("%s: %s; skipped", image.path, msg)
                skipped.append((image.name, image.row, msg))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                msg = f"unreadable image ({image.where}): {exc}"
                log.warning("%s: %s; skipped", image.path, msg)
                skipped.append((image.name, image.row, msg))
        out.flush()
        del out

    atomic_write(path, write)
    atomic_write_text(meta_path, json.dumps({"kept": kept, "skipped": skipped}))
