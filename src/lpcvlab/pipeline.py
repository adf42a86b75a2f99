"""One Hydra job, start to end: data -> model -> (train) -> export -> runtime -> metrics -> MLflow.

The pipeline owns the MLflow run; each stage is a function of the previous stage's record.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lpcvlab import console
from lpcvlab.cache import StageCache
from lpcvlab.export import export_component
from lpcvlab.objective import Objective, score
from lpcvlab.runtimes import ComponentJob, build_runtime
from lpcvlab.tracking import RunRecorder, flatten, git_info, start_run
from lpcvlab.tracks import get_track
from lpcvlab.types import ComponentRun, EvalResult, ExportResult

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    run_id: str
    metrics: dict[str, float]
    exports: dict[str, ExportResult] = field(default_factory=dict)
    runs: dict[str, ComponentRun] = field(default_factory=dict)
    eval: EvalResult | None = None
    weights: str = ""
    objective: Objective | None = None  # what run.py returns to a sweeper (budget applied)


class StageClock:
    """Seconds spent in each stage, as ``stage_seconds/<stage>`` metrics (cache speed-ups)."""

    def __init__(self) -> None:
        self._last = self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict[str, float]:
        total = {"total": time.perf_counter() - self._start}
        return {f"stage_seconds/{k}": v for k, v in (self.seconds | total).items()}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (0 is a seed like any other)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(cfg: DictConfig) -> str:
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    return f"{cfg.backbone.name}/{cfg.preprocess.name}/{cfg.device.name}/{cfg.hub.name}"


def run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {
        "track": cfg.track.name,
        "backbone": cfg.backbone.name,
        "preprocess": cfg.preprocess.name,
        "data": cfg.data.name,
        "device": cfg.device.name,
        "runtime": cfg.runtime.name,
        "hub": cfg.hub.name,
        "train": cfg.train.name,
        "seed": str(cfg.seed),
    }
    if cfg.hub.name == "local":
        tags["measured_on"] = "host_cpu"
    return tags | git_info()


def component_metrics(name: str, run: ComponentRun) -> dict[str, float]:
    prof = run.profile
    metrics = {
        f"latency_ms/{name}": prof.latency_ms,
        f"peak_memory_mb/{name}": prof.peak_memory_mb[1],
        f"peak_memory_mb_low/{name}": prof.peak_memory_mb[0],
        f"inference_seconds/{name}": run.inference.seconds,
    }
    metrics |= {
        f"compute_units/{name}/{u.lower()}": float(n) for u, n in prof.compute_units.items()
    }
    metrics |= {f"{k}/{name}": v for k, v in run.inference.metrics.items()}
    return metrics


def _work_dir(work_dir: Path | None) -> Path:
    if work_dir is None:
        work_dir = Path("outputs") / time.strftime("adhoc/%Y-%m-%d_%H-%M-%S")
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def run(
    cfg: DictConfig,
    work_dir: Path | None = None,
    hydra_dir: Path | None = None,
    extra_tags: dict[str, str] | None = None,
) -> PipelineResult:
    """Run one configured job in its own MLflow run and return what it measured.

    ``extra_tags`` are added to the run's tags (e.g. ``reproduced_from``) without changing the
    config, so that a reproduction logs the same params as the run it reproduces.
    """
    work_dir = _work_dir(work_dir)
    track = get_track(cfg.track.name)
    if cfg.hub.name == "local" and cfg.device.name != "host_cpu":
        log.warning(
            "hub=local measures on this machine's CPU with ONNX Runtime: device=%s and "
            "runtime=%s are recorded as the target, but latency and memory are the host's. "
            "Use hub=aihub for numbers from the device.",
            cfg.device.name,
            cfg.runtime.name,
        )
    experiment = str(cfg.tracking.experiment)
    tags = run_tags(cfg) | (extra_tags or {})
    with start_run(cfg.tracking, experiment, run_name(cfg), tags) as rec:
        try:
            rec.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
            rec.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            result = _stages(cfg, track, rec, work_dir)
            result.objective = score(cfg, result.metrics)
            rec.log_metrics(result.objective.metrics())
            rec.set_tags(result.objective.tags())
            result.metrics |= result.objective.metrics()
        finally:
            if hydra_dir is not None and hydra_dir.is_dir():
                rec.log_artifact(hydra_dir, ".hydra")
            for logfile in work_dir.glob("*.log"):
                rec.log_artifact(logfile)
    _print_summary(cfg, result, rec.tracking_uri, experiment)
    return result


def _stages(cfg: DictConfig, track: Any, rec: RunRecorder, work_dir: Path) -> PipelineResult:
    seed_everything(int(cfg.seed))
    clock = StageClock()
    # Built first: it checks the hub settings and credentials (no network) before any work.
    runtime = build_runtime(cfg)
    runtime.job_listener = rec.on_job
    cache = StageCache.from_config(cfg, rec.run_id, job_listener=rec.on_job)
    console.stage("data", f"{cfg.data.name} (track={cfg.track.name})")
    data = track.load_data(cfg, work_dir)
    clock.lap("data")
    rec.log_metrics({f"data/{k}": v for k, v in data.stats.items()})
    for report in data.reports:
        rec.log_artifact(report, "data")

    console.stage("model", cfg.backbone.name)
    bundle = track.build_model(cfg)
    rec.set_tags({"weights": bundle.weights})
    clock.lap("model")

    if cfg.train.name != "none":
        console.stage("train", cfg.train.name)
        track.train(cfg, bundle, data, rec, work_dir)
        clock.lap("train")

    console.stage("export", ", ".join(c.name for c in bundle.components))
    onnx_dir = Path(cfg.paths.cache_dir) / "onnx"
    exports: dict[str, ExportResult] = {}
    for comp in bundle.components:
        samples = data.inputs[comp.name][: int(cfg.export.parity_samples)]
        exp = cache.export(
            comp,
            samples,
            int(cfg.export.opset),
            float(cfg.export.parity_threshold),
            lambda comp=comp, samples=samples: export_component(
                comp,
                samples,
                onnx_dir,
                opset=int(cfg.export.opset),
                parity_threshold=float(cfg.export.parity_threshold),
            ),
        )
        exports[comp.name] = exp
        rec.set_tags({f"onnx_sha256/{comp.name}": exp.sha256})
        rec.log_metrics(
            {
                f"parity_cosine_min/{comp.name}": exp.parity_cosine_min,
                f"export_seconds/{comp.name}": exp.seconds,
            }
        )
        if cfg.tracking.log_onnx:
            rec.log_artifact(exp.path, "onnx")
    rec.set_tags(cache.tags())
    clock.lap("export")

    console.stage("compile, profile, infer", f"hub={cfg.hub.name}")
    runs = cache.run_components(
        cfg,
        [ComponentJob(exp, data.inputs[name]) for name, exp in exports.items()],
        lambda: runtime,
    )
    rec.set_tags(cache.tags())
    if cache.hits:
        reused = ", ".join(f"{h.component}/{h.stage}" for h in cache.hits)
        sources = ", ".join(sorted({h.run_id for h in cache.hits}))
        console.stage("cache", f"reused {reused} (from run {sources})")
    clock.lap("runtime")
    metrics: dict[str, float] = {}
    for name, crun in runs.items():
        metrics |= component_metrics(name, crun)
        rec.log_dict(crun.profile.raw, f"profiles/{name}.json")
    rec.log_metrics(metrics)

    console.stage("metrics", cfg.track.name)
    evaluation = track.evaluate(
        cfg, data, {n: r.inference.outputs for n, r in runs.items()}, work_dir
    )
    rec.log_metrics(evaluation.metrics)
    for path in evaluation.artifacts:
        rec.log_artifact(path, "results")
    if evaluation.summary:
        rec.log_text(json.dumps(evaluation.summary, indent=2, default=str), "results/summary.json")
    metrics |= evaluation.metrics
    metrics |= {f"parity_cosine_min/{n}": e.parity_cosine_min for n, e in exports.items()}
    clock.lap("metrics")
    rec.log_metrics(clock.metrics())
    metrics |= clock.metrics()
    return PipelineResult(rec.run_id, metrics, exports, runs, evaluation, bundle.weights)


def _print_summary(cfg: DictConfig, res: PipelineResult, uri: str, experiment: str) -> None:
    assert res.eval is not None
    acc = [(k, v) for k, v in sorted(res.eval.metrics.items())]
    comp_rows = []
    for name, crun in res.runs.items():
        low, high = crun.profile.peak_memory_mb
        comp_rows.append(
            [
                name,
                crun.profile.latency_ms,
                f"{console.fmt(low, 1)}-{console.fmt(high, 1)}",
                f"{res.exports[name].parity_cosine_min:.6f}",
            ]
        )
    where = "host CPU (onnxruntime)" if cfg.hub.name == "local" else cfg.device.aihub_name
    print()
    print(
        f"Results: track={cfg.track.name} backbone={cfg.backbone.name} "
        f"preprocess={cfg.preprocess.name} weights={res.weights}"
    )
    print(console.table(["metric", "value"], acc))
    print()
    print(
        console.table(
            [f"component ({where})", "latency ms", "peak memory MB", "parity cos min"], comp_rows
        )
    )
    obj = res.objective
    if obj is not None and obj.budget_ms is not None:
        verdict = "OVER budget" if obj.over_budget else "within budget"
        print(
            f"\nLatency budget {obj.budget_ms:g} ms: total {obj.total_latency_ms:.3f} ms, "
            f"{verdict}; {obj.name}={obj.raw:.4f}, returned to the sweeper: {obj.value:.4f}"
        )
    print()
    print(f"MLflow run {res.run_id} in experiment {experiment!r} at {uri}")
    if uri.startswith("sqlite:"):
        print(f"Open the UI: mlflow ui --backend-store-uri {uri}")
