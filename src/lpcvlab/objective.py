"""The number a run returns to a sweeper: the track's objective, penalised over a latency budget.

LPCVC ranks accuracy only among submissions that run fast enough, so a search must not
"win" with a model that is too slow. With ``budget.latency_ms`` set, a run whose total latency
(the sum of ``latency_ms/<component>``) exceeds it returns
``objective - budget.penalty * total_latency / budget`` and is tagged ``over_budget=true``:
with the default penalty of 1 every over-budget run scores below every in-budget run of an
accuracy in [0, 1], and among over-budget runs the faster one scores higher, which gives a
sampler a direction to move in.

A run deployed in another precision than fp32 must also stay close to fp32: with ``fidelity``
thresholds set, a run that fails the fidelity gate
(:func:`lpcvlab.deploy.precision.fidelity.gate`) is
tagged ``fidelity_gate=failed`` and returns ``objective - fidelity.penalty`` on top of any budget
penalty: with the default penalty of 1, below every run that passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lpcvlab.config.schema import BudgetConfig, FidelityConfig
from lpcvlab.deploy.precision.fidelity import GateVerdict, gate
from lpcvlab.errors import ConfigError

LATENCY_PREFIX = "latency_ms/"
TOTAL_LATENCY = "latency_ms/total"


@dataclass(frozen=True)
class Objective:
    """The track's objective as measured (``raw``) and as returned to the sweeper (``value``)."""

    name: str
    raw: float
    value: float
    total_latency_ms: float
    budget_ms: float | None
    over_budget: bool
    fidelity: GateVerdict | None = None  # None: every component in fp32

    def metrics(self) -> dict[str, float]:
        return {TOTAL_LATENCY: self.total_latency_ms, "objective": self.value}

    def tags(self) -> dict[str, str]:
        tags = {}
        if self.budget_ms is not None:
            tags |= {
                "over_budget": str(self.over_budget).lower(),
                "latency_budget_ms": f"{self.budget_ms:g}",
            }
        if self.fidelity is not None:
            tags["fidelity_gate"] = self.fidelity.tag
            if self.fidelity.reasons:
                tags["fidelity_gate_reasons"] = "; ".join(self.fidelity.reasons)[:5000]
        return tags


def total_latency_ms(metrics: dict[str, float]) -> float:
    """Sum of the per-component latencies (NaN when no component reported one)."""
    values = [
        float(v) for k, v in metrics.items() if k.startswith(LATENCY_PREFIX) and k != TOTAL_LATENCY
    ]
    return float(sum(values)) if values else float("nan")


def score(
    objective: str,
    budget: BudgetConfig,
    metrics: dict[str, float],
    fidelity: FidelityConfig | None = None,
) -> Objective:
    """Score a run: ``objective`` is ``track.objective``; ``budget`` the ``budget`` section;
    ``fidelity`` the thresholds of the fidelity gate (read from the run's fidelity metrics)."""
    if objective not in metrics:
        known = ", ".join(sorted(k for k in metrics if "/" not in k)) or "none"
        raise ConfigError(
            f"track.objective={objective!r} is not a metric this run produced; choose one of: "
            f"{known}"
        )
    raw = float(metrics[objective])
    total = total_latency_ms(metrics)
    verdict = gate(fidelity, objective, metrics) if fidelity is not None else None
    value = raw
    if verdict is not None and not verdict.passed:
        value -= float(fidelity.penalty) if fidelity is not None else 0.0
    if budget.latency_ms is None:
        return Objective(objective, raw, value, total, None, False, verdict)
    limit = float(budget.latency_ms)
    if math.isnan(total):
        raise ConfigError(
            f"budget.latency_ms={limit:g} is set but this run measured no latency_ms/<component>"
        )
    over = total > limit
    if over:
        value -= float(budget.penalty) * total / limit
    return Objective(objective, raw, value, total, limit, over, verdict)
