"""One parser for profiles from every runtime (AI Hub's ``download_profile()`` shape)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from lpcvlab.types import ProfileResult

_MB = 1024 * 1024


def parse_profile(
    component: str,
    raw: dict[str, Any],
    job_id: str | None = None,
    job_url: str | None = None,
) -> ProfileResult:
    """Latency µs -> ms, peak memory range bytes -> MB, layers counted per compute unit.

    Missing fields become NaN (latency, memory) or an empty count rather than an exception: a
    profile that lacks a field still has the others worth logging.
    """
    summary = raw.get("execution_summary") or {}
    latency_us = summary.get("estimated_inference_time")
    latency_ms = float(latency_us) / 1000.0 if latency_us is not None else float("nan")
    peak = summary.get("inference_memory_peak_range")
    if peak is not None and len(peak) == 2:
        peak_mb = (float(peak[0]) / _MB, float(peak[1]) / _MB)
    else:
        peak_mb = (float("nan"), float("nan"))
    units = Counter(
        str(layer.get("compute_unit", "UNKNOWN")).upper()
        for layer in raw.get("execution_detail") or []
    )
    return ProfileResult(
        component=component,
        latency_ms=latency_ms,
        peak_memory_mb=peak_mb,
        compute_units=dict(units),
        raw=raw,
        job_id=job_id,
        job_url=job_url,
    )
