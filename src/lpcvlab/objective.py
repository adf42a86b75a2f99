"""The number a run returns to a sweeper: the track's objective, penalised over a latency budget.

LPCVC ranks accuracy only among submissions that run fast enough, so a search must not
"win" with a model that is too slow. With ``budget.latency_ms`` set, a run whose total latency
(the sum of ``latency_ms/<component>``) exceeds it returns
``objective - budget.penalty * total_latency / budget`` and is tagged ``over_budget=true``:
with the default penalty of 1 every over-budget run scores below every in-budget run of an
accuracy in [0, 1], and among over-budget runs the faster one scores higher, which gives a
sampler a direction to move in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lpcvlab.config.schema import BudgetConfig
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

    def metrics(self) -> dict[str, float]:
        return {TOTAL_LATENCY: self.total_latency_ms, "objective": self.value}

    def tags(self) -> dict[str, str]:
        if self.budget_ms is None:
            return {}
        return {
            "over_budget": str(self.over_budget).lower(),
            "latency_budget_ms": f"{self.budget_ms:g}",
        }


def total_latency_ms(metrics: dict[str, float]) -> float:
    """Sum of the per-component latencies (NaN when no component reported one)."""
    values = [
        float(v) for k, v in metrics.items() if k.startswith(LATENCY_PREFIX) and k != TOTAL_LATENCY
    ]
    return float(sum(values)) if values else float("nan")


def score(objective: str, budget: BudgetConfig, metrics: dict[str, float]) -> Objective:
    """Score a run: ``objective`` is ``track.objective``; ``budget`` the ``budget`` section."""
    if objective not in metrics:
        known = ", ".join(sorted(k for k in metrics if "/" not in k)) or "none"
        raise ConfigError(
            f"track.objective={objective!r} is not a metric this run produced; choose one of: "
            f"{known}"
        )
    raw = float(metrics[objective])
    total = total_latency_ms(metrics)
    if budget.latency_ms is None:
        return Objective(objective, raw, raw, total, None, False)
    limit = float(budget.latency_ms)
    if math.isnan(total):
        raise ConfigError(
            f"budget.latency_ms={limit:g} is set but this run measured no latency_ms/<component>"
        )
    over = total > limit
    value = raw - float(budget.penalty) * total / limit if over else raw
    return Objective(objective, raw, value, total, limit, over)
