"""Turn Track 1 files into the tensors the deployed encoders receive.

Images: exactly the organisers' upload path — PIL ``resize((224, 224))`` with PIL's default
filter, ``/255``, NCHW float32; mean/std only when the preprocess config asks for it on the host.
Text: CLIP BPE to ``(77,)`` int64 with SOT/EOT; longer captions are truncated and counted.

Images PIL cannot turn into pixels are skipped and named with their CSV row: unreadable or
truncated files, and images above PIL's decompression-bomb limit. 16-bit and 32-bit grey images
are scaled to 8 bits before the RGB conversion, which would otherwise clip them to white.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from lpcvlab.data.track1 import ImageRow, Skip

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

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = to_8bit(img).convert("RGB")
        size = (self.size, self.size)
        img = (
            img.resize(size)
            if self.resample is None
            else img.resize(size, _RESAMPLE[self.resample])
        )
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        if self.mean is not None:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x.astype(np.float32)


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
    captions: Sequence[str], tokenizer, context_length: int = 77
) -> tuple[np.ndarray, list[int]]:
    """CLIP BPE tokens ``(N, 77)`` int64, and the indices of captions that were truncated."""
    encoder = getattr(tokenizer, "encode", None)
    truncated = []
    if encoder is not None:
        for i, caption in enumerate(captions):
            if len(encoder(caption)) + 2 > context_length:  # + SOT and EOT
                truncated.append(i)
    tokens = tokenizer(list(captions), context_length=context_length)
    return np.asarray(tokens, dtype=np.int64), truncated
