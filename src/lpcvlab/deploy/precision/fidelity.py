"""Fidelity of a non-fp32 deployment against the fp32 export, and the gate that judges it.

Per component, over every evaluation input: ``fidelity_cosine_min/<component>`` (the worst
sample), ``fidelity_cosine_mean/<component>`` and ``fidelity_psnr/<component>``. Per run: the
track's objective computed from the fp32 outputs (``<objective>_fp32``) and what this run lost
(``<objective>_drop`` = fp32 minus this run). The gate (``fidelity`` settings, e.g. cosine >= 0.95
and a drop <= 0.02, as a careful public Track 1 entry used) reads those metrics back, so a
sweeper's objective can be penalised from the metrics alone, like the latency budget. A quantized
component whose outputs collapse (``fidelity_distinct_ratio/<component>``: far fewer distinct
outputs than distinct inputs, e.g. 3 text embeddings for 99 captions) fails the gate by name:
its embeddings tie, and the tie order, not the model, then decides Recall@10.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from lpcvlab.config.schema import FidelityConfig
from lpcvlab.metrics import cosine_per_sample, psnr

COSINE_MIN = "fidelity_cosine_min/"
DISTINCT_RATIO = "fidelity_distinct_ratio/"
DISTINCT_OUT, DISTINCT_IN = "distinct_outputs/", "distinct_inputs/"


def distinct_rows(array: np.ndarray) -> int:
    """How many different rows (samples) ``array`` holds, compared by value (-0.0 == 0.0),
    one row at a time so that a large input tensor is never copied whole."""
    seen = set()
    for i in range(len(array)):
        row = np.ascontiguousarray(array[i])
        if row.dtype.kind == "f":
            row = row + 0.0  # -0.0 and 0.0 are the same value
        seen.add(hashlib.blake2b(row.tobytes(), digest_size=16).digest())
    return len(seen)


def component_fidelity(
    name: str, reference: np.ndarray, outputs: np.ndarray, inputs: np.ndarray | None = None
) -> dict[str, float]:
    """How close ``outputs`` are to the fp32 ``reference`` on the same inputs, per sample, and
    whether they collapsed: ``distinct_outputs/<component>`` against ``distinct_inputs/`` (the
    inputs' distinct rows when given as an array, else the fp32 outputs'), their ratio
    ``fidelity_distinct_ratio/<component>``. Collapsed embeddings tie, and ties decide Recall@K."""
    ref = np.asarray(reference).reshape(len(reference), -1)
    out = np.asarray(outputs).reshape(len(outputs), -1)
    if ref.shape != out.shape:
        raise ValueError(f"{name}: outputs {out.shape} do not match the fp32 outputs {ref.shape}")
    cos = cosine_per_sample(ref, out)
    distinct_in = distinct_rows(inputs if isinstance(inputs, np.ndarray) else ref)
    distinct_out = distinct_rows(out)
    return {
        f"{COSINE_MIN}{name}": float(cos.min()),
        f"fidelity_cosine_mean/{name}": float(cos.mean()),
        f"fidelity_psnr/{name}": psnr(ref, out),
        f"{DISTINCT_OUT}{name}": float(distinct_out),
        f"{DISTINCT_IN}{name}": float(distinct_in),
        f"{DISTINCT_RATIO}{name}": distinct_out / max(distinct_in, 1),
    }


def metric_fidelity(objective: str, value: float, fp32_value: float) -> dict[str, float]:
    """``<objective>_fp32`` and ``<objective>_drop`` (positive: this run is worse)."""
    return {f"{objective}_fp32": fp32_value, f"{objective}_drop": fp32_value - value}


@dataclass(frozen=True)
class GateVerdict:
    """Whether a non-fp32 run kept close enough to fp32, and why not."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was checked, for the results table

    @property
    def tag(self) -> str:
        return "passed" if self.passed else "failed"

    def line(self) -> str:
        """One line for the results table."""
        checked = ", ".join(self.checks) or "nothing (fidelity thresholds are null)"
        if self.passed:
            return f"Fidelity gate ({checked}): passed"
        return f"Fidelity gate ({checked}): FAILED: {'; '.join(self.reasons)}"


def gate(settings: FidelityConfig, objective: str, metrics: dict[str, float]) -> GateVerdict | None:
    """The verdict on a run's fidelity metrics; None for a run with none (all fp32)."""
    cosines = {k[len(COSINE_MIN) :]: v for k, v in metrics.items() if k.startswith(COSINE_MIN)}
    drop = metrics.get(f"{objective}_drop")
    if not cosines and drop is None:
        return None
    reasons, checks = [], []
    if settings.cosine_min is not None:
        limit = float(settings.cosine_min)
        checks.append(f"cosine >= {limit:g}")
        for name, value in sorted(cosines.items()):
            if not value >= limit:  # NaN fails
                reasons.append(f"{name} cosine min {value:.4f} < {limit:g}")
    if settings.metric_drop_max is not None and drop is not None:
        limit = float(settings.metric_drop_max)
        checks.append(f"{objective} drop <= {limit:g}")
        if not drop <= limit or math.isnan(drop):
            fp32 = metrics.get(f"{objective}_fp32", math.nan)
            reasons.append(f"{objective} {fp32 - drop:.4f} vs fp32 {fp32:.4f} (drop {drop:.4f})")
    ratios = {
        k[len(DISTINCT_RATIO) :]: v for k, v in metrics.items() if k.startswith(DISTINCT_RATIO)
    }
    if settings.distinct_min is not None and ratios:
        limit = float(settings.distinct_min)
        checks.append(f"distinct outputs >= {limit:g} x distinct inputs")
        for name, value in sorted(ratios.items()):
            if not value >= limit:
                outs = metrics.get(f"{DISTINCT_OUT}{name}", math.nan)
                ins = metrics.get(f"{DISTINCT_IN}{name}", math.nan)
                reasons.append(
                    f"{name} collapsed: {outs:.0f} distinct outputs for {ins:.0f} distinct "
                    f"inputs (ratio {value:.3f} < {limit:g})"
                )
    return GateVerdict(not reasons, reasons, checks)
