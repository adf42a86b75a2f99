"""Content hashes that name files, cache entries and remote jobs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import numpy as np


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes: a key that survives renames and catches edits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def array_sha256(x: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order)."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}|{x.shape}\n".encode())
    h.update(x.view(np.uint8).reshape(-1) if x.size else b"")
    return h.hexdigest()


def manifest_sha256(entries: Iterable[tuple[str, str]]) -> str:
    """SHA-256 of (name, content hash) pairs in order: one digest for a dataset's files, which
    changes when a file is renamed, edited, added or dropped."""
    h = hashlib.sha256()
    for name, digest in entries:
        h.update(f"{name}\t{digest}\n".encode())
    return h.hexdigest()


def state_dict_digest(module: Any) -> str:
    """sha256 of every parameter and buffer: names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
