"""The official LPCVC 2026 Track 2 file formats: the preprocessed-set manifest and results HDF5.

Preprocessed tensors are one ``.npy`` per video, ``(1, 3, 16, 112, 112)`` float32, at
``out_dir/<class>/<video stem>.npy``, listed in ``out_dir/manifest.jsonl`` with the keys
``video_path``, ``label`` (the class folder name, which the organisers' ``evaluate.py`` maps
through ``class_map.json``), ``tensor_path``, ``shape``, ``dtype`` (``"torch.float32"``, as the
official ``preprocess_and_save.py`` writes it); :func:`lpcvlab.data.qevd_tools.write_preprocessed`
writes such a set. Results are HDF5 with group ``data/0`` holding ``batch_0 .. batch_{N-1}``,
each ``(1, num_classes)`` logits, in manifest order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lpcvlab.data.qevd import load_class_map
from lpcvlab.errors import DataError
from lpcvlab.util.io import atomic_write

MANIFEST_KEYS = ("video_path", "label", "tensor_path", "shape", "dtype")
MANIFEST_DTYPE = "torch.float32"
RESULTS_GROUP = "data/0"


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestRecord:
    video_path: str
    label: str
    tensor_path: str
    shape: list[int]
    dtype: str

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in MANIFEST_KEYS})


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestRecord]:
    """Parse ``manifest.jsonl``; each line must have exactly the official keys."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"manifest {p} not found") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or set(obj) != set(MANIFEST_KEYS):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{p}:{n}: expected keys {list(MANIFEST_KEYS)}, got {got}")
        shape = obj["shape"]
        if not isinstance(shape, list) or not all(isinstance(v, int) for v in shape):
            raise DataError(f"{p}:{n}: 'shape' must be a list of integers, got {shape!r}")
        records.append(
            ManifestRecord(
                str(obj["video_path"]),
                str(obj["label"]),
                str(obj["tensor_path"]),
                shape,
                str(obj["dtype"]),
            )
        )
    return records


# --------------------------------------------------------------------------- results HDF5


def write_results_h5(
    path: str | os.PathLike[str], logits: np.ndarray | Sequence[np.ndarray]
) -> Path:
    """Write ``(N, C)`` logits as the official results file: ``data/0/batch_i`` of ``(1, C)``."""
    rows = [np.asarray(r, dtype=np.float32).reshape(1, -1) for r in logits]
    if rows and len({r.shape[1] for r in rows}) != 1:
        raise DataError(f"results for {path}: rows have different numbers of classes")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            grp = f.create_group(RESULTS_GROUP)
            for i, row in enumerate(rows):
                grp.create_dataset(f"batch_{i}", data=row)

    return atomic_write(path, write)


def read_results_h5(path: str | os.PathLike[str]) -> np.ndarray:
    """``(N, C)`` float32 logits from an official results file, rows in ``batch_i`` order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"results file {p} not found")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DataError(f"results file {p} is not a readable HDF5 file ({e})") from None
    with f:
        if RESULTS_GROUP not in f:
            raise DataError(f"results file {p} has no group '{RESULTS_GROUP}' (official layout)")
        grp = f[RESULTS_GROUP]
        numbered: dict[int, str] = {}
        for key in grp.keys():
            m = re.fullmatch(r"batch_(\d+)", key)
            if m is None:
                raise DataError(f"results file {p}: unexpected dataset '{RESULTS_GROUP}/{key}'")
            numbered[int(m.group(1))] = key
        if sorted(numbered) != list(range(len(numbered))):
            gap = min(set(range(len(numbered))) - set(numbered))
            raise DataError(f"results file {p}: '{RESULTS_GROUP}/batch_{gap}' is missing")
        rows = [np.asarray(grp[numbered[i]][...], dtype=np.float32) for i in range(len(numbered))]
    rows = [r.reshape(1, -1) if r.ndim == 1 else r for r in rows]
    bad = [i for i, r in enumerate(rows) if r.ndim != 2 or r.shape[0] != 1]
    if bad:
        raise DataError(
            f"results file {p}: batch_{bad[0]} has shape {rows[bad[0]].shape}, expected (1, C)"
        )
    if len({r.shape[1] for r in rows}) > 1:
        raise DataError(f"results file {p}: rows have different numbers of classes")
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows, axis=0)


def check_results_against_manifest(
    manifest_path: str | os.PathLike[str],
    results_path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
) -> int:
    """Row count shared by a manifest and a results file; DataError naming both otherwise."""
    records = read_manifest(manifest_path)
    logits = read_results_h5(results_path)
    if len(records) != logits.shape[0]:
        raise DataError(
            f"{results_path} has {logits.shape[0]} result rows but {manifest_path} lists "
            f"{len(records)} videos; results must be produced from exactly this manifest "
            "(same preprocessing run, all inference chunks collected)"
        )
    if num_classes is not None and logits.size and logits.shape[1] != num_classes:
        raise DataError(
            f"{results_path} has {logits.shape[1]} classes per row, expected {num_classes}"
        )
    return len(records)


def manifest_labels(
    records: Sequence[ManifestRecord], class_map: Mapping[str, Any] | None = None
) -> list[int]:
    """Class indices of manifest rows (labels are class folder names, as in ``evaluate.py``)."""
    cmap = dict(class_map) if class_map is not None else load_class_map()
    out = []
    for i, r in enumerate(records):
        if r.label not in cmap:
            raise DataError(
                f"manifest row {i + 1} ({r.video_path}): label {r.label!r} not in the class map"
            )
        out.append(int(cmap[r.label]))
    return out
