"""Calibration data: the track's own inputs, chosen, checked and content-hashed.

The training split's inputs when the track has one (``Track.calibration_inputs``); otherwise
``precision.calibration_samples`` evaluation inputs at evenly spaced positions (``eval_spread``:
indices ``round(i * (N - 1) / (n - 1))``, so that every part of the evaluation set -- Track 2's
class-sorted videos, Track 1's image and caption lists -- is represented). The run records which
(``calibration/<component>/source``), how many and their hash.
"""

from __future__ import annotations

import numpy as np

from lpcvlab.deploy.precision.plan import Calibration
from lpcvlab.errors import ConfigError
from lpcvlab.types import TensorSpec
from lpcvlab.util.hashing import array_sha256

SETTING = "precision.calibration_samples"


def spread(count: int, n: int) -> np.ndarray:
    """``n`` indices in ``range(count)``, evenly spaced, first and last included."""
    return np.unique(np.linspace(0, count - 1, n).round().astype(np.int64))


def choose_calibration(
    component: str,
    spec: TensorSpec,
    n: int,
    eval_inputs: np.ndarray,
    train_inputs: np.ndarray | None = None,
) -> Calibration:
    """``n`` calibration samples for ``component``, in its exported input's shape and dtype; a
    ConfigError naming the component and the setting when there are too few or they do not fit.
    """
    if train_inputs is not None:
        pool, source, where = train_inputs, "train", "the training split has"
    else:
        pool, source, where = eval_inputs, "eval_spread", "the evaluation set has"
    if len(pool) < n:
        raise ConfigError(
            f"{component}: {SETTING}={n} but {where} only {len(pool)} inputs for it; set "
            f"{SETTING}={len(pool)} or fewer, or add data"
        )
    samples = np.asarray(pool[spread(len(pool), n)] if len(pool) > n else pool)
    expected = tuple(spec.shape[1:])
    if samples.ndim != len(spec.shape) or tuple(samples.shape[1:]) != expected:
        raise ConfigError(
            f"{component}: calibration data ({source}) has shape {tuple(samples.shape)}, but the "
            f"exported input {spec.name!r} takes (N, {', '.join(map(str, expected))}); the track's "
            "calibration inputs must be in the layout the model is exported with"
        )
    if np.dtype(samples.dtype).kind != np.dtype(spec.dtype).kind:
        raise ConfigError(
            f"{component}: calibration data ({source}) is {samples.dtype}, but the exported input "
            f"{spec.name!r} takes {spec.dtype}"
        )
    samples = np.ascontiguousarray(samples, dtype=spec.dtype)
    return Calibration(samples, array_sha256(samples), source)
