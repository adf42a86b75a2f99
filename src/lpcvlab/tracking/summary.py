"""What a run ends with: its result record, and the results table that the terminal prints
at the end and the MLflow run keeps as its description (metrics, latency and memory per
component, precision, weights, cache reuse, the fidelity gate and the latency budget)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lpcvlab.config.schema import RunConfig
from lpcvlab.objective import Objective
from lpcvlab.tracking.views import ui_link
from lpcvlab.types import ComponentRun, EvalResult, ExportResult
from lpcvlab.util import console


@dataclass
class PipelineResult:
    """One run's outcome: what :func:`lpcvlab.pipeline.run` returns."""

    run_id: str
    metrics: dict[str, float]
    exports: dict[str, ExportResult] = field(default_factory=dict)
    runs: dict[str, ComponentRun] = field(default_factory=dict)
    eval: EvalResult | None = None
    weights: str = ""
    objective: Objective | None = None  # what run.py returns to a sweeper (budget applied)
    experiment_id: str = ""
    cache_reused: str = ""  # "<component> <stage>/<stage>; ... (from run <id>)" from the cache


def results_text(s: RunConfig, res: PipelineResult) -> str:
    """The results table: what the terminal prints at the end, and the run's MLflow
    description (metrics, latency and memory per component, precision, weights, cache reuse)."""
    assert res.eval is not None
    acc = [(k, v) for k, v in sorted(res.eval.metrics.items())]
    comp_rows = []
    for name, crun in res.runs.items():
        assert crun.profile is not None
        low, high = crun.profile.peak_memory_mb
        fidelity = res.metrics.get(f"fidelity_cosine_min/{name}")
        reference = res.metrics.get(f"reference_cosine_min/{name}")
        comp_rows.append(
            [
                name,
                s.precision.of(name),
                crun.profile.latency_ms,
                f"{console.fmt(low, 1)}-{console.fmt(high, 1)}",
                f"{res.exports[name].parity_cosine_min:.6f}",
                "-" if reference is None else f"{reference:.6f}",
                "-" if fidelity is None else f"{fidelity:.6f}",
            ]
        )
    where = "host CPU (onnxruntime)" if s.hub.name == "local" else s.device.aihub_name
    lines = [
        f"Results: track={s.track.name} backbone={s.backbone.name} "
        f"preprocess={s.preprocess.name} precision={s.precision.name} weights={res.weights}",
        console.table(["metric", "value"], acc),
        "",
        console.table(
            [
                f"component ({where})",
                "precision",
                "latency ms",
                "peak memory MB",
                "parity cos min",
                "reference cos min",
                "vs fp32 cos min",
            ],
            comp_rows,
        ),
    ]
    if res.eval.notes:
        lines += ["", *res.eval.notes]
    if res.cache_reused:
        lines += ["", f"Stage cache: reused {res.cache_reused}"]
    obj = res.objective
    if obj is not None and obj.fidelity is not None:
        objective = s.track.objective
        fp32 = res.metrics.get(f"{objective}_fp32", float("nan"))
        lines += [
            "",
            f"{objective}: {obj.raw:.4f} here, {fp32:.4f} from the fp32 outputs",
            obj.fidelity.line()
            + (f"; returned to the sweeper: {obj.value:.4f}" if not obj.fidelity.passed else ""),
        ]
    if obj is not None and obj.budget_ms is not None:
        verdict = "OVER budget" if obj.over_budget else "within budget"
        lines += [
            "",
            f"Latency budget {obj.budget_ms:g} ms: total {obj.total_latency_ms:.3f} ms, "
            f"{verdict}; {obj.name}={obj.raw:.4f}, returned to the sweeper: {obj.value:.4f}",
        ]
    return "\n".join(lines)


def print_summary(summary: str, res: PipelineResult, uri: str, experiment: str) -> None:
    print()
    print(summary)
    print()
    print(f"MLflow run {res.run_id} in experiment {experiment!r} at {uri}")
    if uri.startswith("sqlite:"):
        print(
            f"Open the UI: mlflow ui --backend-store-uri {uri}, then "
            f"http://127.0.0.1:5000/{ui_link(res.experiment_id, res.run_id)}; all runs: "
            f"http://127.0.0.1:5000/{ui_link(res.experiment_id)}"
        )
