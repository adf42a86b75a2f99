"""Track 2 frame selection and pixel preprocessing (pure), matching the official LPCVC recipe.

* frame selection (:func:`frame_indices`): ``lpcvc_sample`` decodes at 4 fps, i.e. source frame
  ``floor(k * source_fps / 4)`` for ``k = 0..15``; ``dynamic_fps`` is the official fork's
  "dynamic frame selection" (a video too short for 16 frames at 4 fps is sampled at
  ``ceil(16 / duration)`` fps instead); ``uniform_span`` spreads 16 frames over the whole video;
* pixels (:func:`preprocess_frames`): RGB uint8 -> float32 / 255, bilinear resize to 128x171
  without antialias, centre crop 112x112, no mean/std (the exported model carries those);
  output ``(C, T, H, W)``.

Decoding the frames is :mod:`lpcvlab.data.decode`'s job, many videos at once
:mod:`lpcvlab.data.batch`'s. The skip reasons and :class:`VideoDecodeError` live here, the lowest
layer, because frame selection is what decides that a video is too short.

Too-short policy (no padding is ever invented):

* ``lpcvc_sample``: a video with fewer than 16 frames at 4 fps (shorter than 4 s) raises
  :class:`VideoDecodeError` with reason ``too-short`` (the official ``VideoClips`` yields no clip
  for it and drops it); batch decoding counts it as a skip;
* ``dynamic_fps``: follows the fork exactly, which raises the rate as far as needed, so a video
  with fewer than 16 frames in total gets repeated frames (``floor(k * fps / rate)`` repeats);
  only a video with no frame at all fails;
* ``uniform_span``: 16 evenly spaced frames, repeating frames when the video has fewer than 16;
  only a video with no frame at all fails.

Several clips per video (``clips_per_video = C > 1``, for clip-averaged evaluation): for
``lpcvc_sample`` / ``dynamic_fps``, C windows of 16 consecutive frames at the chosen rate whose
start offsets are evenly spaced over the resampled video,
``start_c = floor(c * (T - 16) / (C - 1))`` with ``T`` resampled frames (the official
``process_video(clip_strategy="uniform")`` rule, in exact integer arithmetic); clip 0 is always
the single-clip result. For ``uniform_span``, the video is cut into C equal segments and 16
frames are spread over each. A video too short for distinct windows repeats windows rather than
failing.

Random-clip training (:func:`frame_sequence_indices`, :func:`window_starts`,
:func:`resize_frames_uint8`): a training video is decoded once into its whole resampled frame
sequence -- for ``lpcvc_sample`` / ``dynamic_fps`` every frame at the chosen rate,
``floor(k * source_fps / rate)`` for ``k = 0..T_total-1``; for ``uniform_span`` its 16 spread
frames, the only window it has -- resized to 128x171 and stored as uint8. A clip is a window of
16 consecutive frames of that sequence; windows start every ``step`` frames (torchvision's
``step_between_clips``). Window 0 is the official clip: the same source frames, and its centre
crop is ``round(255 * official clip)`` exactly (the uint8 values of the same float resize).

Importing this module does not import torch (only :func:`preprocess_frames` needs it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lpcvlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    import numpy as np
    import torch

FRAME_SELECTIONS = ("lpcvc_sample", "dynamic_fps", "uniform_span")

# Skip reasons (stable strings: they end up in CSV reports and MLflow tags).
MISSING = "missing"
ZERO_LENGTH = "zero-length"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
AUDIO_ONLY = "audio-only"
TOO_SHORT = "too-short"
WORKER_CRASHED = "worker-crashed"

# Bump when the decoding/preprocessing code changes its output, to invalidate old cache entries.
CACHE_FORMAT = 1
# Bump when the uint8 frame sequences of random-clip training change.
SEQUENCE_FORMAT = 1


class VideoDecodeError(DataError):
    """A video that cannot give the requested frames; ``reason`` is one of the skip reasons."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str, detail: str) -> None:
        self.path = None if path is None else Path(path)
        self.reason = reason
        self.detail = detail
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{reason}: {detail}")

    def with_path(self, path: str | os.PathLike[str]) -> VideoDecodeError:
        return VideoDecodeError(path, self.reason, self.detail)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class VideoPreprocess:
    """How a video becomes model input; :meth:`key` names the result in caches.

    ``resize`` is (height, width); ``crop`` the side of the centre square.
    """

    frame_selection: str
    fps: float = 4
    num_frames: int = 16
    resize: tuple[int, int] = (128, 171)
    crop: int = 112
    clips_per_video: int = 1

    def __post_init__(self) -> None:
        if self.frame_selection not in FRAME_SELECTIONS:
            raise ConfigError(
                f"preprocess.frame_selection={self.frame_selection!r} is not one of "
                f"{', '.join(FRAME_SELECTIONS)}"
            )
        try:
            fps = float(self.fps)
        except (TypeError, ValueError):
            raise ConfigError(f"preprocess.fps={self.fps!r} is not a number") from None
        if not math.isfinite(fps) or fps <= 0:
            raise ConfigError(f"preprocess.fps={self.fps!r} must be a positive number")
        object.__setattr__(self, "fps", fps)
        try:
            resize = tuple(self.resize)
        except TypeError:
            resize = ()
        if len(resize) != 2 or not all(_is_positive_int(v) for v in resize):
            raise ConfigError(
                f"preprocess.resize={self.resize!r} must be [height, width], positive integers"
            )
        object.__setattr__(self, "resize", (int(resize[0]), int(resize[1])))
        for name in ("num_frames", "crop", "clips_per_video"):
            if not _is_positive_int(getattr(self, name)):
                raise ConfigError(
                    f"preprocess.{name}={getattr(self, name)!r} must be a positive integer"
                )
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.crop > min(self.resize):
            raise ConfigError(
                f"preprocess.crop={self.crop} is larger than the resized frame {self.resize}"
            )

    def key(self) -> str:
        """Stable text naming these settings (and the cache format), for cache file names."""
        return (
            f"sel={self.frame_selection};fps={self.fps!r};t={self.num_frames};"
            f"resize={self.resize[0]}x{self.resize[1]};crop={self.crop};"
            f"clips={self.clips_per_video};fmt={CACHE_FORMAT}"
        )

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one clip."""
        return (3, self.num_frames, self.crop, self.crop)

    @property
    def output_shape(self) -> tuple[int, int, int, int, int]:
        """``(n_clips, C, T, H, W)`` of one decoded video."""
        return (self.clips_per_video, *self.clip_shape)

    def sequence_key(self) -> str:
        """Stable text naming a video's cached uint8 frame sequence (random-clip training): the
        frame selection and the resize, not the crop or the evaluation clips."""
        return (
            f"frames;sel={self.frame_selection};fps={self.fps!r};t={self.num_frames};"
            f"resize={self.resize[0]}x{self.resize[1]};fmt={CACHE_FORMAT};seq={SEQUENCE_FORMAT}"
        )


def _is_positive_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v > 0
    return isinstance(v, float) and v.is_integer() and v > 0


# --------------------------------------------------------------------------- frame selection


def _as_fraction(x: float | Fraction | int) -> Fraction:
    if isinstance(x, Fraction):
        return x
    if isinstance(x, int):
        return Fraction(x)
    return Fraction(repr(float(x)))


def sampling_rate(
    frame_selection: str,
    num_source_frames: int,
    source_fps: float | Fraction,
    *,
    fps: float = 4,
    num_frames: int = 16,
) -> Fraction:
    """Rate (frames/s) at which ``lpcvc_sample`` / ``dynamic_fps`` sample the video.

    ``dynamic_fps`` raises the rate to ``ceil(num_frames / duration)`` with
    ``duration = num_source_frames / source_fps`` when the video has fewer than ``num_frames``
    frames at ``fps``, exactly as the official fork's ``compute_clips_for_video``.
    """
    rate = _as_fraction(fps)
    if frame_selection == "dynamic_fps" and num_source_frames > 0:
        src = _as_fraction(source_fps)
        if num_source_frames * rate / src < num_frames:
            rate = Fraction(math.ceil(Fraction(num_frames) * src / num_source_frames))
    return rate


def frame_indices(
    frame_selection: str,
    num_source_frames: int,
    source_fps: float | Fraction,
    *,
    fps: float = 4,
    num_frames: int = 16,
    clips: int = 1,
) -> list[list[int]]:
    """Source frame indices (0-based, presentation order) for each clip; pure arithmetic.

    Exact rational arithmetic on the stream's frame rate (e.g. 30000/1001), so
    ``lpcvc_sample`` gives ``floor(k * source_fps / fps)`` with no float rounding.
    Raises :class:`VideoDecodeError` (no path; callers add it) with reason ``too-short`` when
    the policy in the module docstring says the video cannot give a clip.
    """
    if frame_selection not in FRAME_SELECTIONS:
        raise ConfigError(
            f"frame_selection={frame_selection!r} is not one of {', '.join(FRAME_SELECTIONS)}"
        )
    if clips < 1 or num_frames < 1:
        raise ConfigError(f"clips={clips} and num_frames={num_frames} must be >= 1")
    n = int(num_source_frames)
    if n <= 0:
        raise VideoDecodeError(None, CORRUPT, "the video stream has no frames")
    src = _as_fraction(source_fps)
    if src <= 0:
        raise VideoDecodeError(None, CORRUPT, f"invalid source frame rate {source_fps}")

    if frame_selection == "uniform_span":
        out = []
        for c in range(clips):
            lo = (c * n) // clips
            hi = max(lo, ((c + 1) * n) // clips - 1)
            hi = min(hi, n - 1)
            lo = min(lo, hi)
            if num_frames == 1:
                out.append([lo])
            else:
                out.append([lo + (k * (hi - lo)) // (num_frames - 1) for k in range(num_frames)])
        return out

    rate = sampling_rate(frame_selection, n, src, fps=fps, num_frames=num_frames)
    step = src / rate  # source frames per sampled frame
    total = math.floor(n * rate / src)  # resampled frames available (official ``total_frames``)
    if frame_selection == "dynamic_fps":
        total = max(total, num_frames)
    if total < num_frames:
        need = Fraction(num_frames) * step
        raise VideoDecodeError(
            None,
            TOO_SHORT,
            f"{n} frames at {float(src):.3f} fps ({float(n / src):.2f} s) give {total} frames at "
            f"{float(rate):g} fps, fewer than the {num_frames} needed (needs >= "
            f"{math.ceil(need)} source frames, {float(need / src):.2f} s); use "
            "frame_selection=dynamic_fps or uniform_span to keep short videos",
        )
    last_start = total - num_frames
    if clips == 1:
        starts = [0]
    else:
        starts = [(c * last_start) // (clips - 1) for c in range(clips)]
    out = []
    for s in starts:
        idx = [math.floor((s + k) * step) for k in range(num_frames)]
        out.append([min(i, n - 1) for i in idx])
    return out


def frame_sequence_indices(
    frame_selection: str,
    num_source_frames: int,
    source_fps: float | Fraction,
    *,
    fps: float = 4,
    num_frames: int = 16,
) -> list[int]:
    """Source frame indices of the whole resampled sequence that training windows are cut from.

    ``lpcvc_sample`` / ``dynamic_fps``: every frame at the sampling rate, so that
    ``sequence[s : s + num_frames]`` is the clip :func:`frame_indices` gives for start ``s``
    (start 0: the official clip). ``uniform_span``: its one clip. Raises like
    :func:`frame_indices` for a video too short to give a clip.
    """
    first = frame_indices(
        frame_selection, num_source_frames, source_fps, fps=fps, num_frames=num_frames
    )[0]
    if frame_selection == "uniform_span":
        return first
    n = int(num_source_frames)
    src = _as_fraction(source_fps)
    rate = sampling_rate(frame_selection, n, src, fps=fps, num_frames=num_frames)
    step = src / rate
    total = math.floor(n * rate / src)
    if frame_selection == "dynamic_fps":
        total = max(total, num_frames)
    return [min(math.floor(k * step), n - 1) for k in range(total)]


def window_starts(length: int, num_frames: int, step: int = 1) -> list[int]:
    """Start offsets of the clips of ``num_frames`` consecutive frames in a sequence of
    ``length``, ``step`` apart (torchvision's ``VideoClips(step_between_clips=step)``); the first
    is always 0 (a sequence shorter than a clip still gives that one, padded by the caller)."""
    if num_frames < 1 or step < 1:
        raise ConfigError(f"num_frames={num_frames} and step={step} must be >= 1")
    return list(range(0, max(length - num_frames, 0) + 1, step))


# --------------------------------------------------------------------------- pixels


def preprocess_frames(
    frames: np.ndarray | torch.Tensor, resize: tuple[int, int] = (128, 171), crop: int = 112
) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 RGB -> ``(3, T, crop, crop)`` float32, the official recipe.

    Same operations, order and memory layout as torchvision's ``ConvertImageDtype`` ->
    ``Resize(antialias=False)`` -> ``CenterCrop`` on a ``TCHW`` clip. The resize runs on one
    thread: torch's vectorised bilinear kernel rounds the last bit differently depending on how
    the work is split between threads, so this pins the result to the same bits on every machine,
    in every worker process and in every cache entry.
    """
    x = _resize(frames, resize)  # (T, 3, h, w)
    top, left = centre_offsets(resize, crop)
    x = x[:, :, top : top + crop, left : left + crop]
    return x.permute(1, 0, 2, 3).contiguous()


def centre_offsets(resize: tuple[int, int], crop: int) -> tuple[int, int]:
    """(top, left) of the centre crop, as torchvision's ``CenterCrop`` rounds them."""
    h, w = resize
    return int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))


def resize_frames_uint8(
    frames: np.ndarray | torch.Tensor, resize: tuple[int, int] = (128, 171), chunk: int = 8
) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 RGB -> ``(3, T, h, w)`` uint8: the official float resize of every
    frame, rounded to uint8 (a quarter of the float's size, which is what makes caching a whole
    training video affordable). Any crop of it is ``round(255 * x)`` of the same crop of
    :func:`preprocess_frames`' output. ``chunk`` frames are resized at a time, so full-HD
    videos never hold the whole sequence in float.
    """
    import torch

    x = torch.as_tensor(frames)
    h, w = resize
    out = torch.empty((3, x.shape[0], h, w), dtype=torch.uint8)
    for a in range(0, x.shape[0], chunk):
        part = _resize(x[a : a + chunk], resize).permute(1, 0, 2, 3)
        out[:, a : a + chunk] = part.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def _resize(frames: np.ndarray | torch.Tensor, resize: tuple[int, int]) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, h, w)`` float32 in [0,1], resized on one thread."""
    import torch  # here, not at the top: importing frames stays cheap (no torch)
    import torch.nn.functional as F

    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255)  # in place: the same bits as ``/``
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        return F.interpolate(
            x, size=list(resize), mode="bilinear", align_corners=False, antialias=False
        )
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
