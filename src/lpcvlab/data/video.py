"""Track 2 video decoding and frame selection (PyAV), matching the official LPCVC recipe.

torchvision >= 0.24 no longer decodes video, so the official ``VideoClips`` preprocessing cannot
run on current torchvision; this module reproduces it with PyAV, frame for frame:

* frame selection (pure, :func:`frame_indices`): ``lpcvc_sample`` decodes at 4 fps, i.e. source
  frame ``floor(k * source_fps / 4)`` for ``k = 0..15``; ``dynamic_fps`` is the official fork's
  "dynamic frame selection" (a video too short for 16 frames at 4 fps is sampled at
  ``ceil(16 / duration)`` fps instead); ``uniform_span`` spreads 16 frames over the whole video;
* pixels (:func:`preprocess_frames`): RGB uint8 -> float32 / 255, bilinear resize to 128x171
  without antialias, centre crop 112x112, no mean/std (the exported model carries those);
  output ``(C, T, H, W)``.

Decoding touches only what is needed: frames are decoded in order and the loop stops at the last
needed one; only the needed frames are converted to RGB (the conversion costs more than the
decode); when the needed frames leave long gaps, the decoder seeks to the keyframe before each
gap's end instead of decoding through it (frames are then identified by their pts against the
packet index, so a seek can never shift an index; if the pts do not line up it falls back to
plain in-order decoding). Results can be cached on disk as ``.npy`` keyed by the SHA-256 of the
file's bytes and :meth:`VideoPreprocess.key`.

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
"""

from __future__ import annotations

import bisect
import hashlib
import math
import multiprocessing
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lpcvlab.errors import ConfigError, DataError
from lpcvlab.hashing import file_sha256

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

# Seek only across gaps of at least this many frames between needed frames, and only when the
# keyframe lands at least SEEK_MIN_SKIP frames ahead of the decoder: a seek flushes the decoder,
# which costs about as much as decoding a handful of frames.
SEEK_MIN_GAP = 32
SEEK_MIN_SKIP = 8

_CACHE_SUBDIR = "video"
_IGNORED_CONFIG_KEYS = {"name", "description", "track"}


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

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> VideoPreprocess:
        """Build from a (Hydra) mapping; unknown keys are an error so typos do not pass silently.

        Keys starting with ``_`` and ``name``/``description``/``track`` are ignored.
        """
        known = {"frame_selection", "fps", "num_frames", "resize", "crop", "clips_per_video"}
        values = {str(k): v for k, v in dict(cfg).items()}
        unknown = sorted(
            k
            for k in values
            if k not in known and not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS
        )
        if unknown:
            raise ConfigError(
                f"unknown Track 2 preprocess key(s) {unknown}; expected some of {sorted(known)}"
            )
        if "frame_selection" not in values:
            raise ConfigError(
                f"preprocess.frame_selection is required (one of {', '.join(FRAME_SELECTIONS)})"
            )
        kwargs = {k: v for k, v in values.items() if k in known}
        if "resize" in kwargs and kwargs["resize"] is not None:
            kwargs["resize"] = tuple(kwargs["resize"])
        return cls(**kwargs)

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
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        x = F.interpolate(
            x, size=list(resize), mode="bilinear", align_corners=False, antialias=False
        )
    finally:
        if threads != 1:
            torch.set_num_threads(threads)
    h, w = resize
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    x = x[:, :, top : top + crop, left : left + crop]
    return x.permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream."""

    path: Path
    num_frames: int  # frame count used for frame selection
    fps: Fraction
    width: int
    height: int
    codec: str
    frame_count_source: str  # "metadata", "duration" or "packets"

    @property
    def duration_s(self) -> float:
        return float(self.num_frames / self.fps)


def _mp4_looks_truncated(path: Path) -> bool:
    """True when an ISO-BMFF (mp4/mov) file was cut short: a top-level box runs past the end of
    the file, or there is an ``ftyp`` but no ``moov`` box (the muxer writes it last)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(12)
            if len(head) < 8 or head[4:8] != b"ftyp":
                return False
            pos, seen_moov = 0, False
            while pos + 8 <= size:
                f.seek(pos)
                hdr = f.read(16)
                box_size = int.from_bytes(hdr[0:4], "big")
                box_type = hdr[4:8]
                if box_size == 1 and len(hdr) >= 16:
                    box_size = int.from_bytes(hdr[8:16], "big")
                elif box_size == 0:
                    box_size = size - pos
                if box_size < 8:
                    return False  # garbage, not a truncation
                if box_type == b"moov":
                    seen_moov = True
                if pos + box_size > size:
                    return True
                pos += box_size
            return not seen_moov
    except OSError:
        return False


def _classify_failure(path: Path) -> str:
    if _mp4_looks_truncated(path):
        return TRUNCATED
    return CORRUPT


def _open_video(path: Path) -> tuple[Any, Any]:
    """Open ``path`` and return (container, first video stream) or raise VideoDecodeError."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise VideoDecodeError(path, MISSING, "file not found") from None
    except OSError as e:
        raise VideoDecodeError(path, CORRUPT, f"cannot stat the file ({e})") from None
    if size == 0:
        raise VideoDecodeError(path, ZERO_LENGTH, "the file is empty (0 bytes); re-download it")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as e:
        reason = _classify_failure(path)
        hint = (
            "the file was cut short (no complete moov box); re-download or re-copy it"
            if reason == TRUNCATED
            else "not a readable video container"
        )
        raise VideoDecodeError(path, reason, f"{hint} ({e})") from None
    if not container.streams.video:
        has_audio = bool(container.streams.audio)
        container.close()
        if has_audio:
            raise VideoDecodeError(path, AUDIO_ONLY, "the file has audio but no video stream")
        raise VideoDecodeError(path, CORRUPT, "the file has no video stream")
    return container, container.streams.video[0]


def _stream_fps(path: Path, stream: Any) -> Fraction:
    for attr in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, attr, None)
        if rate:
            return Fraction(rate)
    raise VideoDecodeError(path, CORRUPT, "the video stream has no frame rate")


def _packet_index(container: Any, stream: Any) -> tuple[list[int], list[int]] | None:
    """Sorted frame pts and the indices of keyframes, from a demux pass (no decoding).

    None when pts are missing or repeated (then only in-order decoding is safe).
    """
    pts: list[int] = []
    key_pts: list[int] = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # flush packet
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            key_pts.append(packet.pts)
    pts.sort()
    if len(set(pts)) != len(pts):
        return None
    where = {p: i for i, p in enumerate(pts)}
    return pts, sorted(where[p] for p in key_pts)


def _metadata_frame_count(stream: Any, container: Any, fps: Fraction) -> tuple[int, str] | None:
    if stream.frames and stream.frames > 0:
        return int(stream.frames), "metadata"
    if stream.duration and stream.time_base:
        return int(round(stream.duration * stream.time_base * fps)), "duration"
    if container.duration:
        return int(round(Fraction(container.duration, av.time_base) * fps)), "duration"
    return None


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Open a video and read its frame count and rate; raises :class:`VideoDecodeError`."""
    p = Path(path)
    container, stream = _open_video(p)
    with container:
        return _probe_open(p, container, stream)


def _probe_open(path: Path, container: Any, stream: Any) -> VideoInfo:
    fps = _stream_fps(path, stream)
    counted = _metadata_frame_count(stream, container, fps)
    if counted is None:
        try:
            index = _packet_index(container, stream)
            n = (
                len(index[0])
                if index is not None
                else sum(1 for pk in container.demux(stream) if pk.size)
            )
        except av.FFmpegError as e:
            raise VideoDecodeError(path, _classify_failure(path), f"demux failed ({e})") from None
        counted = (n, "packets")
        container.seek(0)
    cc = stream.codec_context
    return VideoInfo(
        path=path,
        num_frames=counted[0],
        fps=fps,
        width=int(cc.width or 0),
        height=int(cc.height or 0),
        codec=str(cc.name),
        frame_count_source=counted[1],
    )


class _SeekMismatch(Exception):
    """Decoded pts do not match the packet index: fall back to in-order decoding."""


@dataclass
class _Decoded:
    frames: dict[int, np.ndarray]
    frames_seen: int  # frames decoded (in-order mode) before stopping
    reached_eof: bool
    error: str | None = None


def _decode_in_order(container: Any, stream: Any, needed: Sequence[int]) -> _Decoded:
    wanted = set(needed)
    last = max(needed)
    out: dict[int, np.ndarray] = {}
    seen = 0
    try:
        for frame in container.decode(stream):
            i = seen
            seen += 1
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                return _Decoded(out, seen, reached_eof=False)
    except av.FFmpegError as e:
        return _Decoded(out, seen, reached_eof=False, error=str(e))
    return _Decoded(out, seen, reached_eof=True)


def _decode_with_seeks(
    container: Any, stream: Any, needed: Sequence[int], pts: list[int], keys: list[int]
) -> _Decoded:
    """Decode only around the needed frames: seek to the keyframe before a far target."""
    wanted = set(needed)
    where = {p: i for i, p in enumerate(pts)}
    out: dict[int, np.ndarray] = {}
    frames_iter = None
    pos = -1  # index of the last frame the decoder produced
    floor_idx = 0  # frames below this index (after a seek) may be broken leading frames
    try:
        for target in sorted(wanted):
            if target in out:
                continue
            k = bisect.bisect_right(keys, target) - 1
            key = keys[k] if k >= 0 else 0
            if frames_iter is None or key - pos > SEEK_MIN_SKIP:
                if key > 0:
                    container.seek(pts[key], stream=stream, backward=True, any_frame=False)
                elif frames_iter is not None:
                    container.seek(pts[0], stream=stream, backward=True, any_frame=False)
                frames_iter = iter(container.decode(stream))
                floor_idx = key
                pos = key - 1
            for frame in frames_iter:
                idx = where.get(frame.pts)
                if idx is None:
                    raise _SeekMismatch(f"decoded pts {frame.pts} is not in the packet index")
                if idx < floor_idx:
                    continue
                pos = idx
                if idx in wanted and idx not in out:
                    out[idx] = frame.to_ndarray(format="rgb24")
                if idx >= target:
                    break
            else:
                return _Decoded(out, pos + 1, reached_eof=True)
    except av.FFmpegError as e:
        return _Decoded(out, pos + 1, reached_eof=False, error=str(e))
    return _Decoded(out, pos + 1, reached_eof=False)


def _needs_seeking(needed: Sequence[int]) -> bool:
    prev = -1
    for i in needed:
        if i - prev > SEEK_MIN_GAP:
            return True
        prev = i
    return False


def read_video_frames(
    path: str | os.PathLike[str],
    preprocess: VideoPreprocess,
    *,
    seek: bool | None = None,
) -> tuple[list[list[int]], dict[int, np.ndarray], VideoInfo]:
    """Decode just the frames ``preprocess`` selects: (indices per clip, RGB frames, info).

    ``seek=None`` seeks when the needed frames leave gaps of more than ``SEEK_MIN_GAP`` frames;
    ``True``/``False`` force it on/off (tests compare both). Raises :class:`VideoDecodeError`.
    """
    p = Path(path)
    container, stream = _open_video(p)
    with container:
        info = _probe_open(p, container, stream)
        n = info.num_frames
        decoded: _Decoded | None = None
        missing: list[int] = []
        for attempt in range(3):
            try:
                clips = frame_indices(
                    preprocess.frame_selection,
                    n,
                    info.fps,
                    fps=preprocess.fps,
                    num_frames=preprocess.num_frames,
                    clips=preprocess.clips_per_video,
                )
            except VideoDecodeError as e:
                raise e.with_path(p) from None
            needed = sorted({i for clip in clips for i in clip})
            decoded = None
            use_seek = _needs_seeking(needed) if seek is None else seek
            if use_seek:
                try:
                    index = _packet_index(container, stream)
                except av.FFmpegError:
                    index = None
                container.seek(0)
                if index is not None and len(index[0]) != n and attempt == 0:
                    # The packet count is what the official code counts: select again with it.
                    n = len(index[0])
                    info = _with_count(info, n, "packets")
                    continue
                if index is not None and index[1]:
                    try:
                        decoded = _decode_with_seeks(container, stream, needed, *index)
                    except _SeekMismatch:
                        decoded = None
                    container.seek(0)
            if decoded is None:
                decoded = _decode_in_order(container, stream, needed)
                container.seek(0)
            missing = [i for i in needed if i not in decoded.frames]
            if not missing:
                return clips, decoded.frames, info
            if decoded.error is not None:
                raise VideoDecodeError(
                    p,
                    _classify_failure(p),
                    f"decoding failed after {decoded.frames_seen} of {n} frames "
                    f"({decoded.error}); the file is damaged, quarantine it with `qevd check`",
                )
            if info.frame_count_source == "decoded":
                break
            # Clean end of stream before the declared frame count: count the frames that are
            # really there (the official code counts decoded frames) and select again.
            actual = _count_frames(p)
            if actual == 0:
                raise VideoDecodeError(p, CORRUPT, "the video stream has no decodable frame")
            if actual == n:
                break
            n = actual
            info = _with_count(info, n, "decoded")
        assert decoded is not None
        raise VideoDecodeError(
            p,
            TRUNCATED,
            f"the stream ends after {decoded.frames_seen} frames but frame {missing[0]} is needed",
        )


def _with_count(info: VideoInfo, n: int, source: str) -> VideoInfo:
    return VideoInfo(info.path, n, info.fps, info.width, info.height, info.codec, source)


def _count_frames(path: Path) -> int:
    container, stream = _open_video(path)
    n = 0
    with container:
        try:
            for _ in container.decode(stream):
                n += 1
        except av.FFmpegError:
            pass
    return n


def decode_video(
    path: str | os.PathLike[str], preprocess: VideoPreprocess, *, seek: bool | None = None
) -> torch.Tensor:
    """Decode and preprocess one video: float32 ``(n_clips, 3, T, crop, crop)``.

    Every clip of every video has the same shape (clips_per_video is fixed), which is what makes
    batches and the official ``(1, 3, 16, 112, 112)`` files possible.
    """
    clips, frames, _ = read_video_frames(path, preprocess, seek=seek)
    order = sorted(frames)
    try:
        stacked = np.stack([frames[i] for i in order])
    except ValueError:
        raise VideoDecodeError(
            path, CORRUPT, "the frame size changes inside the video; re-encode it"
        ) from None
    processed = preprocess_frames(stacked, preprocess.resize, preprocess.crop)  # (3, U, h, w)
    pos = {i: j for j, i in enumerate(order)}
    gather = torch.tensor([[pos[i] for i in clip] for clip in clips], dtype=torch.long)
    out = processed[:, gather]  # (3, n_clips, T, h, w)
    return out.permute(1, 0, 2, 3, 4).contiguous()


def decode_clip(path: str | os.PathLike[str], preprocess: VideoPreprocess) -> torch.Tensor:
    """One clip ``(3, T, crop, crop)``; ``preprocess.clips_per_video`` must be 1."""
    if preprocess.clips_per_video != 1:
        raise ConfigError(
            f"decode_clip needs clips_per_video=1, got {preprocess.clips_per_video}; "
            "use decode_video for several clips"
        )
    return decode_video(path, preprocess)[0]


def verify_video(path: str | os.PathLike[str], *, full_decode: bool = True) -> int:
    """Check that a video opens and decodes; returns the frames decoded.

    ``full_decode`` decodes every frame (catches damage anywhere, and a stream that ends well
    before its frame count); otherwise only the first frame. Raises :class:`VideoDecodeError`.
    """
    p = Path(path)
    container, stream = _open_video(p)
    with container:
        info = _probe_open(p, container, stream)
        n = 0
        try:
            for _ in container.decode(stream):
                n += 1
                if not full_decode:
                    break
        except av.FFmpegError as e:
            raise VideoDecodeError(
                p,
                _classify_failure(p),
                f"decoding failed after {n} of {info.num_frames} frames ({e})",
            ) from None
    if n == 0:
        raise VideoDecodeError(p, CORRUPT, "the video stream has no decodable frame")
    if full_decode and info.frame_count_source == "metadata":
        shortfall = info.num_frames - n
        if shortfall >= 2 and shortfall > 0.01 * info.num_frames:
            raise VideoDecodeError(
                p, TRUNCATED, f"only {n} of the {info.num_frames} frames it declares decode"
            )
    return n


# --------------------------------------------------------------------------- cache


def cache_path(cache_dir: str | os.PathLike[str], sha256: str, preprocess: VideoPreprocess) -> Path:
    """``cache_dir/video/<sha[:2]>/<sha>-<settings digest>.npy``."""
    digest = hashlib.sha256(preprocess.key().encode()).hexdigest()[:16]
    return Path(cache_dir) / _CACHE_SUBDIR / sha256[:2] / f"{sha256}-{digest}.npy"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_cached(
    path: Path, preprocess: VideoPreprocess, *, header_only: bool = False
) -> np.ndarray | None:
    """The cached array, or None when the entry is unreadable or of another shape (then it is
    recomputed and overwritten)."""
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if header_only else None)
    except (OSError, ValueError, EOFError):
        return None
    if arr.shape != preprocess.output_shape or arr.dtype != np.float32:
        return None
    return arr


# --------------------------------------------------------------------------- batches


@dataclass
class VideoResult:
    """One input video's outcome; ``clips`` is None when skipped or not requested."""

    path: Path
    clips: torch.Tensor | None = None  # (n_clips, 3, T, crop, crop) float32
    cache_path: Path | None = None
    from_cache: bool = False
    reason: str | None = None  # skip reason, None when decoded
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class SkippedVideo:
    index: int  # position in the input list
    path: Path
    reason: str
    message: str


@dataclass
class DecodeBatch:
    """Per-video results in input order, plus the skipped ones (never silently dropped)."""

    results: list[VideoResult]
    skipped: list[SkippedVideo] = field(default_factory=list)

    @property
    def num_ok(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def cache_hits(self) -> int:
        return sum(r.from_cache for r in self.results)

    def skip_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return dict(sorted(counts.items()))


def _decode_job(
    path: str,
    preprocess: VideoPreprocess,
    cache_dir: str | None,
    return_tensors: bool,
) -> tuple[np.ndarray | None, str | None, bool, str | None, str | None]:
    """(array, cache path, from_cache, reason, message) — picklable, runs in a worker."""
    p = Path(path)
    cpath: Path | None = None
    try:
        if cache_dir is not None:
            try:
                sha = file_sha256(p)
            except FileNotFoundError:
                return None, None, False, MISSING, f"{p}: {MISSING}: file not found"
            cpath = cache_path(cache_dir, sha, preprocess)
            if cpath.exists():
                cached = _load_cached(cpath, preprocess, header_only=not return_tensors)
                if cached is not None:
                    return (cached if return_tensors else None), str(cpath), True, None, None
        arr = decode_video(p, preprocess).numpy()
        if cpath is not None:
            _atomic_save(cpath, arr)
        return (arr if return_tensors else None), (str(cpath) if cpath else None), False, None, None
    except VideoDecodeError as e:
        return None, None, False, e.reason, str(e)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _mp_context() -> multiprocessing.context.BaseContext:
    """Fork-server workers where the platform has them, else spawned ones.

    Never plain fork: torch's OpenMP pool is not fork-safe once the parent has used it. The fork
    server is a fresh process that imports this module (and torch) once; workers are forked from
    it in milliseconds instead of each paying torch's import, which otherwise dominates short
    batches.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def decode_videos(
    paths: Sequence[str | os.PathLike[str]],
    preprocess: VideoPreprocess,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    *,
    return_tensors: bool = True,
    progress: bool = True,
    desc: str = "decode videos",
) -> DecodeBatch:
    """Decode + preprocess many videos, in worker processes when ``workers > 0``.

    Results come back in input order; unusable videos are listed in ``skipped`` with a reason
    (missing, zero-length, corrupt, truncated, audio-only, too-short, worker-crashed) and keep
    their slot in ``results`` (``clips`` None), so nothing shifts. With ``cache_dir``, results are
    stored as ``.npy`` keyed by file content and settings and reused on the next call;
    ``return_tensors=False`` (needs ``cache_dir``) only fills the cache, for datasets too big to
    hold in memory.
    """
    if not return_tensors and cache_dir is None:
        raise ConfigError("decode_videos(return_tensors=False) needs a cache_dir to write to")
    items = [str(p) for p in paths]
    cdir = None if cache_dir is None else str(cache_dir)
    results: list[VideoResult | None] = [None] * len(items)

    def store(i: int, out: tuple[Any, ...]) -> None:
        arr, cpath, hit, reason, message = out
        results[i] = VideoResult(
            path=Path(items[i]),
            clips=None if arr is None else torch.from_numpy(arr),
            cache_path=None if cpath is None else Path(cpath),
            from_cache=hit,
            reason=reason,
            message=message,
        )

    jobs = [(path, preprocess, cdir, return_tensors) for path in items]
    outs = parallel_map(_decode_job, jobs, workers, progress=progress, desc=desc)
    for i, out in enumerate(outs):
        if isinstance(out, BrokenProcessPool):
            msg = (
                f"{items[i]}: {WORKER_CRASHED}: a decoding worker died (a decoder crash on some "
                "file in flight); rerun with workers=0 to find the file"
            )
            out = (None, None, False, WORKER_CRASHED, msg)
        store(i, out)

    final: list[VideoResult] = []
    skipped: list[SkippedVideo] = []
    for i, r in enumerate(results):
        assert r is not None
        final.append(r)
        if r.reason is not None:
            skipped.append(SkippedVideo(i, r.path, r.reason, r.message or r.reason))
    return DecodeBatch(final, skipped)


def parallel_map(
    fn: Callable[..., Any],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    *,
    progress: bool = True,
    desc: str = "",
    unit: str = "video",
) -> list[Any]:
    """``[fn(*job) for job in jobs]`` in ``workers`` processes (0 = in this process),
    in input order, with a progress bar. A job whose worker died comes back as a
    :class:`BrokenProcessPool` instance instead of a result, so callers can count it; when the
    pool dies before any job finished (typically an unguarded main script), ConfigError.

    ``fn`` must be a picklable top-level function. Workers come from a fork server (see
    :func:`_mp_context`) and, like spawned ones, re-import the main script.
    """
    if workers < 0:
        raise ConfigError(f"workers={workers} must be >= 0 (0 runs in this process)")
    out: list[Any] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress, leave=False)
    try:
        if workers == 0 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                out[i] = fn(*job)
                bar.update(1)
            return out
        ctx = _mp_context()
        with ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init
        ) as pool:
            futures: dict[Future[Any], int] = {
                pool.submit(fn, *job): i for i, job in enumerate(jobs)
            }
            completed = 0
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    out[i] = fut.result()
                    completed += 1
                except BrokenProcessPool as e:
                    if completed == 0:
                        raise ConfigError(
                            f"the {workers} worker processes died before finishing any job. "
                            "Worker processes re-import the main script: put a script's "
                            "top-level code under `if __name__ == '__main__':`. If the script "
                            "is guarded, a decoder crashed: rerun with workers=0 to find the file."
                        ) from e
                    out[i] = e
                bar.update(1)
        return out
    finally:
        bar.close()
