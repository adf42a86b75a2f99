"""Evaluation clips read from the decode cache on demand, instead of stacked in memory.

Track 2's evaluation inputs are N videos x C clips of ``(3, T, 112, 112)`` float32 (2.4 MB a
clip at 16 frames). :class:`CachedClips` stands where the stacked array used to: it has the
array's ``shape``, ``dtype``, ``len()`` and indexing (an integer, a slice, a list of indices),
but each access memory-maps the cached ``.npy`` files and copies out only the clips asked for,
so the local runtime (one clip at a time), AI Hub's chunked upload (one chunk at a time),
export parity and calibration samples hold what they use, never the whole set, and memory does
not grow with the number of validation videos. :meth:`CachedClips.content_sha256` hashes the
clips in order without holding them: the same digest ``array_sha256`` gives the stacked array,
so stage-cache keys are unchanged.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class CachedClips:
    """``(N * clips_per_video, 3, T, H, W)`` float32 (channel-last: ``(.., T, H, W, 3)``), read
    lazily from per-video cache files of shape ``(clips_per_video, 3, T, H, W)``.

    ``loaded_bytes_peak`` is the most bytes one access returned, and ``materialised`` counts
    conversions of the whole set to an ndarray (``np.asarray(clips)``): what tests check to know
    that nothing held every clip at once.
    """

    dtype = np.dtype(np.float32)

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        clips_per_video: int,
        clip_shape: tuple[int, int, int, int],
        channel_last: bool = False,
    ) -> None:
        self.files = [Path(f) for f in files]
        self.clips_per_video = int(clips_per_video)
        self.clip_shape = tuple(int(v) for v in clip_shape)  # (3, T, H, W), as cached
        self.channel_last = bool(channel_last)
        c, t, h, w = self.clip_shape
        item = (t, h, w, c) if self.channel_last else (c, t, h, w)
        self.shape: tuple[int, ...] = (len(self.files) * self.clips_per_video, *item)
        self.loaded_bytes_peak = 0
        self.materialised = 0

    # -- the array protocol lpcvlab's stages use ------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """What the stacked array would take (never allocated here)."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            out = self._clips([self._index(int(key))])[0]
        elif isinstance(key, slice):
            out = self._clips(list(range(*key.indices(len(self)))))
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
                raise IndexError(f"CachedClips takes an int, a slice or 1-D indices, not {key!r}")
            out = self._clips([self._index(int(i)) for i in idx])
        self.loaded_bytes_peak = max(self.loaded_bytes_peak, out.nbytes)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole set in memory: what streaming avoids (counted in ``materialised``)."""
        self.materialised += 1
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def batches(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, clips[start:start+size])`` over the whole set, in order."""
        for a in range(0, len(self), size):
            yield a, self[a : a + size]

    def content_sha256(self, batch: int = 16) -> str:
        """``array_sha256`` of the stacked array, computed batch by batch."""
        h = hashlib.sha256(f"{self.dtype.str}|{self.shape}\n".encode())
        for _, block in self.batches(batch):
            h.update(np.ascontiguousarray(block).view(np.uint8).reshape(-1))
        return h.hexdigest()

    # -- internals ----------------------------------------------------------------------

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"clip {i} is out of range for {n} clips")
        return i % n if n else i

    def _clips(self, indices: list[int]) -> np.ndarray:
        out = np.empty((len(indices), *self.shape[1:]), dtype=self.dtype)
        opened: dict[int, np.ndarray] = {}
        for j, i in enumerate(indices):
            video, clip = divmod(i, self.clips_per_video)
            arr = opened.get(video)
            if arr is None:
                arr = np.load(self.files[video], mmap_mode="r", allow_pickle=False)
                if arr.shape[1:] != self.clip_shape or arr.shape[0] != self.clips_per_video:
                    raise ValueError(
                        f"{self.files[video]}: cached clips have shape {arr.shape}, expected "
                        f"({self.clips_per_video}, {', '.join(map(str, self.clip_shape))})"
                    )
                opened = {video: arr}  # one file mapped at a time
            x = arr[clip]
            out[j] = np.moveaxis(x, 0, -1) if self.channel_last else x
        return out
