"""Decoding one Track 2 video with PyAV: probing, frame reading, checking.

Decoding touches only what is needed: frames are decoded in order and the loop stops at the last
needed one; only the needed frames are converted to RGB (the conversion costs more than the
decode); when the needed frames leave long gaps, the decoder seeks to the keyframe before each
gap's end instead of decoding through it (frames are then identified by their pts against the
packet index, so a seek can never shift an index; if the pts do not line up it falls back to
plain in-order decoding).

torchvision >= 0.24 no longer decodes video, so the official ``VideoClips`` preprocessing cannot
run on current torchvision; this reproduces it with PyAV, frame for frame (which frames and which
pixel operations: :mod:`lpcvlab.data.frames`). A file that cannot give its frames raises
:class:`~lpcvlab.data.frames.VideoDecodeError` with one of the skip reasons.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from lpcvlab.data.frames import (
    AUDIO_ONLY,
    CORRUPT,
    MISSING,
    TRUNCATED,
    ZERO_LENGTH,
    VideoDecodeError,
    VideoPreprocess,
    frame_indices,
    frame_sequence_indices,
    preprocess_frames,
    resize_frames_uint8,
)

# Seek only across gaps of at least this many frames between needed frames, and only when the
# keyframe lands at least SEEK_MIN_SKIP frames ahead of the decoder: a seek flushes the decoder,
# which costs about as much as decoding a handful of frames.
SEEK_MIN_GAP = 32
SEEK_MIN_SKIP = 8


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
    stream = container.streams.video[0]
    # One decoder thread: PyAV's default starts a slice-thread pool per video, which costs more
    # than it gains on short clips (and worker processes are the parallelism). Frame threading
    # would be faster on long videos but delays decoding errors and can lose the one of a
    # truncated last packet, which must make the file count as damaged.
    stream.thread_count = 1
    return container, stream


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
    sequence: bool = False,
) -> tuple[list[list[int]], dict[int, np.ndarray], VideoInfo]:
    """Decode just the frames ``preprocess`` selects: (indices per clip, RGB frames, info).

    ``seek=None`` seeks when the needed frames leave gaps of more than ``SEEK_MIN_GAP`` frames;
    ``True``/``False`` force it on/off (tests compare both). ``sequence``: one "clip", the whole
    resampled sequence training windows are cut from (:func:`frame_sequence_indices`). Raises
    :class:`VideoDecodeError`.
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
                if sequence:
                    clips = [
                        frame_sequence_indices(
                            preprocess.frame_selection,
                            n,
                            info.fps,
                            fps=preprocess.fps,
                            num_frames=preprocess.num_frames,
                        )
                    ]
                else:
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


def _stack_frames(
    path: str | os.PathLike[str], frames: dict[int, np.ndarray]
) -> tuple[list[int], np.ndarray]:
    """The decoded frames in source order, stacked ``(U, H, W, 3)``."""
    order = sorted(frames)
    try:
        return order, np.stack([frames[i] for i in order])
    except ValueError:
        raise VideoDecodeError(
            path, CORRUPT, "the frame size changes inside the video; re-encode it"
        ) from None


def decode_video(
    path: str | os.PathLike[str], preprocess: VideoPreprocess, *, seek: bool | None = None
) -> torch.Tensor:
    """Decode and preprocess one video: float32 ``(n_clips, 3, T, crop, crop)``.

    Every clip of every video has the same shape (clips_per_video is fixed), which is what makes
    batches and the official ``(1, 3, 16, 112, 112)`` files possible.
    """
    clips, frames, _ = read_video_frames(path, preprocess, seek=seek)
    order, stacked = _stack_frames(path, frames)
    processed = preprocess_frames(stacked, preprocess.resize, preprocess.crop)  # (3, U, h, w)
    if len(clips) == 1 and clips[0] == order:  # one clip of distinct frames: nothing to gather
        return processed.unsqueeze(0)
    pos = {i: j for j, i in enumerate(order)}
    gather = torch.tensor([[pos[i] for i in clip] for clip in clips], dtype=torch.long)
    out = processed[:, gather]  # (3, n_clips, T, h, w)
    return out.permute(1, 0, 2, 3, 4).contiguous()


def decode_frame_sequence(
    path: str | os.PathLike[str], preprocess: VideoPreprocess, *, seek: bool | None = None
) -> torch.Tensor:
    """A training video's whole resampled frame sequence, resized and rounded to uint8:
    ``(3, L, h, w)`` with ``L >= num_frames`` (see :func:`frame_sequence_indices`). Window 0,
    centre-cropped, is ``round(255 * decode_video(path, preprocess)[0])``."""
    (indices,), frames, _ = read_video_frames(path, preprocess, seek=seek, sequence=True)
    order, stacked = _stack_frames(path, frames)
    resized = resize_frames_uint8(stacked, preprocess.resize)  # (3, U, h, w), U unique frames
    pos = {i: j for j, i in enumerate(order)}
    gather = torch.tensor([pos[i] for i in indices], dtype=torch.long)
    return resized[:, gather].contiguous()


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
