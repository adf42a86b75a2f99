"""Decoding many Track 2 videos: worker processes, the on-disk clip cache, skip accounting.

Results can be cached on disk as ``.npy`` keyed by the SHA-256 of the file's bytes and
:meth:`~lpcvlab.data.frames.VideoPreprocess.key`: the official float32 clips
(``kind="clips"``), or, for random-clip training, each video's whole resampled frame sequence
as uint8 (``kind="frames"``, keyed by :meth:`~lpcvlab.data.frames.VideoPreprocess.sequence_key`),
decoded once and read by every later epoch and run. Videos that cannot be decoded are never dropped
silently: each keeps its slot with a skip reason, and :func:`skipped_summary` says on one line
what was skipped and where the list is. A cache entry that cannot be written (disk full) is an
error naming the file, not a skipped video. Ctrl-C (or SIGTERM, turned into
:class:`~lpcvlab.errors.Interrupted`) stops the worker pool without waiting for queued videos.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lpcvlab.data.decode import decode_frame_sequence, decode_video
from lpcvlab.data.frames import MISSING, WORKER_CRASHED, VideoDecodeError, VideoPreprocess
from lpcvlab.errors import ConfigError
from lpcvlab.util.hashing import file_sha256
from lpcvlab.util.io import atomic_save_npy, load_cached_npy

_CACHE_SUBDIR = "video"
CLIPS, FRAMES = "clips", "frames"  # what a cache entry holds (``kind``)


# --------------------------------------------------------------------------- cache


def cache_path(
    cache_dir: str | os.PathLike[str], sha256: str, preprocess: VideoPreprocess, kind: str = CLIPS
) -> Path:
    """``cache_dir/video/<sha[:2]>/<sha>-<settings digest>.npy``."""
    key = preprocess.key() if kind == CLIPS else preprocess.sequence_key()
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / _CACHE_SUBDIR / sha256[:2] / f"{sha256}-{digest}.npy"


def cached_sha256(cached: str | os.PathLike[str]) -> str:
    """The content hash of the video a cache entry was decoded from (it names the entry, see
    :func:`cache_path`): a dataset's digest without reading its videos again."""
    return Path(cached).name.split("-", 1)[0]


def _load_cached(
    path: Path, preprocess: VideoPreprocess, *, header_only: bool = False, kind: str = CLIPS
) -> np.ndarray | None:
    """The cached array, or None when the entry is unreadable or of another shape (then it is
    recomputed and overwritten)."""

    def frames(arr: np.ndarray) -> bool:
        return (
            arr.dtype == np.uint8
            and arr.ndim == 4
            and arr.shape[0] == 3
            and arr.shape[1] >= preprocess.num_frames
            and tuple(arr.shape[2:]) == preprocess.resize
        )

    def clips(arr: np.ndarray) -> bool:
        return arr.shape == preprocess.output_shape and arr.dtype == np.float32

    return load_cached_npy(path, frames if kind == FRAMES else clips, mmap=header_only)


# --------------------------------------------------------------------------- batches


@dataclass
class VideoResult:
    """One input video's outcome; ``clips`` is None when skipped or not requested."""

    path: Path
    # (n_clips, 3, T, crop, crop) float32; kind="frames": (3, L, h, w) uint8
    clips: torch.Tensor | None = None
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
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))


def skipped_summary(
    batch: DecodeBatch, split: str, listed_in: str | os.PathLike[str] | None = None
) -> str:
    """One line for the terminal on a split's skipped videos ("" when none was skipped), e.g.
    ``skipped 3 of 40 videos (val): 2 too-short, 1 corrupt; listed in run/skipped_videos.csv``.

    Reasons are ordered by count, most frequent first; ``listed_in`` is the CSV naming them.
    """
    if not batch.skipped:
        return ""
    counts = sorted(
        Counter(s.reason for s in batch.skipped).items(), key=lambda kv: (-kv[1], kv[0])
    )
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts)
    where = "" if listed_in is None else f"; listed in {listed_in}"
    return (
        f"skipped {len(batch.skipped)} of {len(batch.results)} videos ({split}): {reasons}{where}"
    )


def _decode_job(
    path: str,
    preprocess: VideoPreprocess,
    cache_dir: str | None,
    return_tensors: bool,
    kind: str = CLIPS,
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
            cpath = cache_path(cache_dir, sha, preprocess, kind)
            if cpath.exists():
                cached = _load_cached(cpath, preprocess, header_only=not return_tensors, kind=kind)
                if cached is not None:
                    return (cached if return_tensors else None), str(cpath), True, None, None
        decode = decode_frame_sequence if kind == FRAMES else decode_video
        arr = decode(p, preprocess).numpy()
        if cpath is not None:
            atomic_save_npy(cpath, arr)  # StorageError (disk full) propagates
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
    kind: str = CLIPS,
) -> DecodeBatch:
    """Decode + preprocess many videos, in worker processes when ``workers > 0``.

    Results come back in input order; unusable videos are listed in ``skipped`` with a reason
    (missing, zero-length, corrupt, truncated, audio-only, too-short, worker-crashed) and keep
    their slot in ``results`` (``clips`` None), so nothing shifts. With ``cache_dir``, results are
    stored as ``.npy`` keyed by file content and settings and reused on the next call;
    ``return_tensors=False`` (needs ``cache_dir``) only fills the cache, for datasets too big to
    hold in memory. ``kind="frames"``: each video's uint8 frame sequence for random-clip
    training (:func:`~lpcvlab.data.decode.decode_frame_sequence`) instead of its clips.
    """
    if kind not in (CLIPS, FRAMES):
        raise ConfigError(f"decode_videos(kind={kind!r}): use {CLIPS!r} or {FRAMES!r}")
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

    jobs = [(path, preprocess, cdir, return_tensors, kind) for path in items]
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
    :func:`_mp_context`) and, like spawned ones, re-import the main script. An exception in the
    parent (Ctrl-C, SIGTERM as :class:`~lpcvlab.errors.Interrupted`) or raised by a job (e.g. a
    :class:`~lpcvlab.errors.StorageError`) cancels the queued jobs and returns at once.
    """
    if workers < 0:
        raise ConfigError(f"workers={workers} must be >= 0 (0 runs in this process)")
    out: list[Any] = [None] * len(jobs)
    # None: tqdm turns itself off when stderr is not a terminal (a log file).
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=(not progress) or None, leave=False)
    try:
        if workers == 0 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                out[i] = fn(*job)
                bar.update(1)
            return out
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=_mp_context(), initializer=_worker_init
        )
        futures: dict[Future[Any], int] = {}
        try:
            for i, job in enumerate(jobs):
                futures[pool.submit(fn, *job)] = i
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
        except BaseException:
            # Ctrl-C or SIGTERM (Interrupted, a KeyboardInterrupt), a full disk, ...: drop the
            # queued jobs and do not wait for them, so the run stops now. Jobs already running
            # finish in their workers (a worker is never killed halfway through a file).
            # Cancelled here, not only by shutdown(cancel_futures=True): the pool's manager
            # thread does that later, and not at all once the pool object is garbage.
            for fut in futures:
                fut.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return out
    finally:
        bar.close()
