"""``lpcvlab compare``: runs side by side, what differs between them, and the Pareto front.

The columns are the parameters that differ between the runs (a config group shows as its choice,
e.g. ``backbone=clip_tiny``, not as the dozen keys that come with it; the deployment precision as
one ``precision`` column, ``w8a8`` or ``image_encoder:fp16 text_encoder:w8a8``), accuracy,
latency, peak memory and fidelity against fp32 per component, total latency, the fidelity gate,
weights and runtime. A sweep parent run gets the same table as ``sweep_runs.csv`` and an
accuracy-vs-latency Pareto plot as ``pareto.png``. A run that failed the fidelity gate is marked
(``fidelity_gate=failed``, a cross in the plot) and left off the Pareto front: its accuracy is
not what the device would deliver safely.

"Differ in" lists settings only (config values such as ``backbone.name`` or ``seed``), never what
a run derived (operator and layer counts, data sizes, the normalisation its weights use). The
best run is the one a participant would submit (:func:`best_run`): the highest objective, a tie
going to the lower ``latency_ms/total``, then to the earlier job -- the same rule for a sweep's
parent, its summary, this table and the plot.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpcvlab.config.schema import RunConfig
from lpcvlab.errors import LpcvlabError
from lpcvlab.tracking.runstore import (
    RunInfo,
    check_run_id,
    child_runs,
    experiment_runs,
    get_run,
    open_store,
)
from lpcvlab.util import console

# Accuracy metrics of both tracks, in display order; only those some run has are shown.
ACCURACY_METRICS = (
    "recall_at_10",
    "recall_at_5",
    "recall_at_1",
    "hit_at_10",
    "top1",
    "top5",
    "clip_top1",
    "clip_top5",
)
PER_COMPONENT = ("latency_ms", "peak_memory_mb", "parity_cosine_min", "fidelity_cosine_min")
TOTAL_LATENCY = "latency_ms/total"
PRECISION = "precision"  # the column of the deployment precision (from the run's tags)
GATE_FAILED = "failed"
_INFO_TAGS = ("weights", "runtime", "device", "hub")
OBJECTIVE = "objective"  # what a run returned to the sweeper (budget and gates applied)
# The top-level config keys: a param under one of them is a setting, anything else was derived.
_SETTINGS = frozenset(f.name for f in dataclasses.fields(RunConfig))


@dataclass
class Comparison:
    """A table of runs: ``columns`` in order, one dict per run in ``rows``."""

    runs: list[RunInfo]
    swept: list[str]
    accuracy: list[str]
    components: list[str]
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_csv(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            for row in self.rows:
                w.writerow({k: _csv_value(row.get(k)) for k in self.columns})
        return path

    def render(self) -> str:
        """The terminal table: short run IDs; no experiment, device, hub or parity columns (the
        CSV has them), and no column that is empty for every run."""
        skip = {"run_id", "experiment_id", "name", "device", "hub"}
        skip |= {c for c in self.columns if c.startswith("parity_cosine_min/")}
        skip |= {
            c for c in self.columns if all(_cell(r.get(c)) in ("", "-", None) for r in self.rows)
        }
        cols = ["run"] + [c for c in self.columns if c not in skip]
        rows = [[r["run_id"][:8]] + [_cell(r.get(c)) for c in cols[1:]] for r in self.rows]
        return console.table(cols, rows)


def objective_name(run: RunInfo) -> str:
    """The metric the run's track optimises (``track.objective``), recall_at_10 if unknown."""
    return run.params.get("track.objective", "recall_at_10")


def is_setting(param: str) -> bool:
    """A config value (``backbone.name``, ``seed``, ``hub.profile_iterations``), not something
    the run derived and logged as a param (``onnx_ops/...``, ``compute_units/...``, ``data/...``,
    ``normalization``, thread counts)."""
    return "/" not in param and param.split(".", 1)[0] in _SETTINGS


def swept_params(runs: Sequence[RunInfo]) -> list[str]:
    """Settings that differ between runs, a config group collapsed to ``<group>.name``.

    ``backbone.model_cfg.*`` differs whenever ``backbone.name`` does; such keys are shown only when
    they also differ between runs that chose the same group option (an explicit override).
    Derived params (:func:`is_setting`) are never listed.
    """
    if len(runs) < 2:
        return []
    keys = sorted(k for k in set().union(*(r.params for r in runs)) if is_setting(k))
    differ = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]
    groups = {k[: -len(".name")] for k in differ if k.endswith(".name")}
    out = []
    for key in differ:
        group = next((g for g in groups if key.startswith(g + ".")), None)
        if group is None or key == f"{group}.name":
            out.append(key)
            continue
        by_choice: dict[str | None, set[str | None]] = {}
        for r in runs:
            by_choice.setdefault(r.params.get(f"{group}.name"), set()).add(r.params.get(key))
        if any(len(v) > 1 for v in by_choice.values()):
            out.append(key)
    return out


def precision_label(run: RunInfo) -> str:
    """``w8a8`` when every component has that precision, else ``<component>:<precision> ...``."""
    per = {k.split("/", 1)[1]: v for k, v in run.tags.items() if k.startswith("precision/")}
    per.pop("default", None)
    if not per:
        return run.tags.get(PRECISION, "")
    if len(set(per.values())) == 1:
        return next(iter(per.values()))
    return " ".join(f"{c}:{p}" for c, p in sorted(per.items()))


def _with_precision(swept: list[str], runs: Sequence[RunInfo]) -> list[str]:
    """Every swept ``precision.*`` param as one ``precision`` column."""
    precision = [p for p in swept if p.startswith(PRECISION + ".")]
    if not precision and len({precision_label(r) for r in runs}) < 2:
        return swept
    return [p for p in swept if p not in precision] + [PRECISION]


def _param(run: RunInfo, param: str) -> str:
    return precision_label(run) if param == PRECISION else run.params.get(param, "")


def build_comparison(runs: Sequence[RunInfo]) -> Comparison:
    runs = list(runs)
    swept = _with_precision(swept_params(runs), runs)
    all_metrics = set().union(*(r.metrics for r in runs)) if runs else set()
    accuracy = [m for m in ACCURACY_METRICS if m in all_metrics]
    components = sorted(
        {
            m.split("/", 1)[1]
            for m in all_metrics
            if m.startswith("latency_ms/") and m != TOTAL_LATENCY
        }
    )
    columns = ["run_id", "name", "experiment_id", "status"]
    columns += [param_column(p) for p in swept]
    columns += list(_INFO_TAGS) + accuracy + ["objective"]
    columns += [f"{m}/{c}" for c in components for m in PER_COMPONENT]
    columns += [TOTAL_LATENCY, "over_budget", "fidelity_gate", "cache_hits"]
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run_id": r.run_id,
            "name": r.name,
            "experiment_id": r.experiment_id,
            "status": r.status,
            "over_budget": r.tags.get("over_budget", ""),
            "fidelity_gate": r.tags.get("fidelity_gate", ""),
            "cache_hits": r.tags.get("cache/hits", ""),
        }
        row |= {param_column(p): _param(r, p) for p in swept}
        row |= {t: r.tags.get(t, "") for t in _INFO_TAGS}
        row |= {m: r.metrics.get(m, math.nan) for m in accuracy + ["objective", TOTAL_LATENCY]}
        row |= {
            f"{m}/{c}": r.metrics.get(f"{m}/{c}", math.nan)
            for c in components
            for m in PER_COMPONENT
        }
        rows.append(row)
    return Comparison(runs, swept, accuracy, components, columns, rows)


def ranking(run: RunInfo) -> tuple[float, float, int, int]:
    """Sort key, best first: the higher objective, then the lower total latency, then the
    earlier job (its number in the sweep, else its start time). Missing numbers sort last."""
    objective = run.metrics.get(OBJECTIVE, math.nan)
    latency = run.metrics.get(TOTAL_LATENCY, math.nan)
    job = run.tags.get("sweep_job", "")
    return (
        -objective if math.isfinite(objective) else math.inf,
        latency if math.isfinite(latency) else math.inf,
        int(job) if job.isdigit() else 1 << 62,
        run.start_time,
    )


def best_run(runs: Sequence[RunInfo]) -> RunInfo | None:
    """The run a participant would submit: among FINISHED runs with an objective, the highest
    objective, a tie going to the lower ``latency_ms/total``, then to the earlier job."""
    scored = [
        r
        for r in runs
        if r.status == "FINISHED" and math.isfinite(r.metrics.get(OBJECTIVE, math.nan))
    ]
    return min(scored, key=ranking, default=None)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower latency (x) and higher accuracy (y)."""
    order = sorted(
        (i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)),
        key=lambda i: (points[i][0], -points[i][1]),
    )
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def accuracy_latency(runs: Sequence[RunInfo]) -> list[tuple[float, float]]:
    """(total latency ms, the track's objective metric) per run; NaN where missing, and for a
    run that failed the fidelity gate (it is not a candidate for the front)."""
    return [
        (
            r.metrics.get(TOTAL_LATENCY, math.nan),
            math.nan if gate_failed(r) else r.metrics.get(objective_name(r), math.nan),
        )
        for r in runs
    ]


def gate_failed(run: RunInfo) -> bool:
    return run.tags.get("fidelity_gate") == GATE_FAILED


def plot_pareto(comparison: Comparison, path: Path, title: str = "") -> Path | None:
    """Accuracy vs total latency with the Pareto front; None when no run has both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = comparison.runs
    points = accuracy_latency(runs)
    front = pareto_front(points)
    failed = [i for i, r in enumerate(runs) if gate_failed(r)]
    for i in failed:  # plotted where they measured, marked, and kept off the front
        points[i] = (points[i][0], runs[i].metrics.get(objective_name(runs[i]), math.nan))
    ok = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    if not ok:
        return None
    fig, (ax, key) = plt.subplots(
        1, 2, figsize=(10, 4.8), dpi=120, gridspec_kw={"width_ratios": [2.3, 1]}
    )
    passed = [i for i in ok if i not in failed]
    ax.scatter(
        [points[i][0] for i in passed],
        [points[i][1] for i in passed],
        color="tab:gray",
        label="runs",
        zorder=2,
    )
    shown = [i for i in ok if i in failed]
    if shown:
        ax.scatter(
            [points[i][0] for i in shown],
            [points[i][1] for i in shown],
            color="tab:red",
            marker="x",
            label="fidelity gate failed",
            zorder=2,
        )
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "o-",
        color="tab:red",
        label="Pareto front",
        zorder=3,
    )
    best = best_run(runs)
    if best is not None and runs.index(best) in ok:
        b = runs.index(best)
        ax.scatter(
            [points[b][0]], [points[b][1]], marker="*", s=220, color="gold", edgecolors="black",
            label="best (objective; ties: lower latency)", zorder=4,
        )  # fmt: skip
    _number_points(ax, key, comparison, points, ok)
    budgets = {runs[i].params.get("budget.latency_ms") for i in ok} - {None, "None", "null"}
    for b in sorted(budgets):
        ax.axvline(float(b), color="tab:orange", linestyle="--", label=f"budget {float(b):g} ms")
    objectives = sorted({objective_name(runs[i]) for i in ok})
    measured = {runs[i].tags.get("hub", "") for i in ok}
    where = "host CPU, hub=local" if measured == {"local"} else ", ".join(sorted(measured))
    ax.set_xlabel(f"total latency, ms ({where})")
    ax.set_ylabel(" / ".join(objectives))
    ax.set_title(title or "accuracy vs latency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def label(comparison: Comparison, i: int) -> str:
    """A run's point in the Pareto front: its swept values (its short ID when nothing differs)."""
    row = comparison.rows[i]
    parts = [f"{param_column(p)}={row.get(param_column(p), '')}" for p in comparison.swept]
    return " ".join(parts) or comparison.runs[i].short_id


# Points numbered in the plot and listed beside it: beyond this many, only the front and the
# best run (the CSV and the table name every run).
MAX_LABELS = 24


def plot_numbers(comparison: Comparison, ok: Sequence[int]) -> list[int]:
    """The runs numbered in the plot, best first (:func:`ranking`): every one of ``ok``, or
    beyond :data:`MAX_LABELS` the Pareto front and the best run."""
    runs = comparison.runs
    shown = sorted(ok, key=lambda i: ranking(runs[i]))
    if len(shown) > MAX_LABELS:
        keep = set(pareto_front(accuracy_latency(runs)))
        best = best_run(runs)
        if best is not None:
            keep.add(runs.index(best))
        shown = [i for i in shown if i in keep]
    return shown


def plot_key(comparison: Comparison, shown: Sequence[int], hidden: int = 0) -> list[str]:
    """The list beside the plot: a header naming the swept settings, then each number with its
    run's swept values only."""
    columns = [param_column(p) for p in comparison.swept]
    lines = [f"best first: {' / '.join(columns) if columns else 'run'}"]
    for n, i in enumerate(shown, start=1):
        values = " / ".join(str(comparison.rows[i].get(c, "")) for c in columns)
        lines.append(f"{n:>2}  {values or comparison.runs[i].short_id}")
    if hidden:
        lines.append(f"(+{hidden} more: sweep_runs.csv)")
    return lines


def _number_points(
    ax: Any, key: Any, comparison: Comparison, points: list[tuple[float, float]], ok: list[int]
) -> None:
    """Number the points best first and list, beside the plot, each number with the run's
    swept values, one run a line: short labels on the points never overlap the way a setting
    list per point does."""
    shown = plot_numbers(comparison, ok)
    for n, i in enumerate(shown, start=1):
        ax.annotate(
            str(n),
            points[i],
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
        )
    text = "\n".join(plot_key(comparison, shown, len(ok) - len(shown)))
    key.axis("off")
    key.text(0, 1, text, va="top", ha="left", fontsize=7, family="monospace", wrap=True)
    ax.margins(x=0.08, y=0.08)


def param_column(param: str) -> str:
    """A swept param as a column: a group by its name (``backbone``, not ``backbone.name``)."""
    return param[: -len(".name")] if param.endswith(".name") else param


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return value


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value


def select_runs(
    uri: str, run_ids: Sequence[str] = (), experiment: str | None = None, sweep: str | None = None
) -> tuple[list[RunInfo], str]:
    """The runs to compare and a phrase saying where they came from."""
    if sum(bool(x) for x in (run_ids, experiment, sweep)) != 1:
        raise LpcvlabError(
            "say which runs: RUN_ID ... (one sweep parent ID compares its children), "
            "--experiment NAME, or --sweep PARENT_RUN_ID"
        )
    for run_id in [*run_ids, *([sweep] if sweep else [])]:
        check_run_id(run_id)  # before the store is opened: the mistake is the argument's
    client = open_store(uri)
    if experiment:
        return experiment_runs(client, experiment), f"experiment {experiment!r}"
    if sweep:
        get_run(client, sweep)
        return child_runs(client, sweep), f"sweep {sweep}"
    if len(run_ids) == 1:
        children = child_runs(client, run_ids[0])
        if children:
            return children, f"sweep {run_ids[0]}"
    return [get_run(client, r) for r in run_ids], f"{len(run_ids)} run(s)"
