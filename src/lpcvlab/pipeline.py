"""One run, start to end: data -> model -> (train) -> export -> hub -> metrics -> MLflow.

The config is read once, here: :func:`run` loads and checks the typed settings, checks the
tracking store, builds the track (with its backbone factory), the hub back-end and the precision
plan, and hands each stage those objects and its own settings. The pipeline owns the MLflow
run; each stage is a function of the previous stage's record.

:func:`run_steps` is the same run as a generator that yields at the device wait (what the hub
has in flight, :class:`~lpcvlab.hubs.base.InFlight`), so that a sweep can do the local work of
its next config, and wait on every config's AI Hub jobs together, while this run's MLflow run
stays open; :func:`run` drives it to the end, blocking. ``hub=local`` never yields.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lpcvlab.config import RunConfig, load_settings
from lpcvlab.config.schema import LocalHubConfig
from lpcvlab.deploy.export import export_component
from lpcvlab.deploy.hazards import DeviceLint
from lpcvlab.deploy.precision import ComponentPrecision, PrecisionPlan
from lpcvlab.deploy.precision.calibration import choose_calibration
from lpcvlab.deploy.precision.fidelity import component_fidelity, metric_fidelity
from lpcvlab.deploy.rewrites import op_counts
from lpcvlab.errors import Interrupted, ParityError
from lpcvlab.hubs import INFERENCE, ComponentJob, Hub, InFlight, build_hub, drive
from lpcvlab.hubs.cache import StageCache
from lpcvlab.objective import Objective, score
from lpcvlab.tracking.recorder import (
    ModelFacts,
    RunRecorder,
    check_store,
    compose_run_name,
    ensure_table_view,
    flatten,
    git_info,
    prune_vanished,
    resolve_uri,
    start_run,
    ui_link,
)
from lpcvlab.tracks import Track, TrackData, build_track
from lpcvlab.training.launch import worker_rank
from lpcvlab.types import CompiledIO, ComponentRun, EvalResult, ExportResult, ModelBundle
from lpcvlab.util import console
from lpcvlab.util.seeding import seed_everything, thread_params

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
    experiment_id: str = ""
    cache_reused: str = ""  # "<component> <stage>/<stage>; ... (from run <id>)" from the cache


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


def run_name(s: RunConfig, shown: Sequence[str] = ()) -> str:
    """``tracking.run_name``, else the backbone and what distinguishes the run: ``shown`` (the
    command line's or sweep's overrides, :func:`lpcvlab.app.name_overrides`), then training,
    precision, hub and seed where they are not the defaults."""
    if s.tracking.run_name:
        return str(s.tracking.run_name)
    implied = [
        f"{key}={value}"
        for key, value, default in (
            ("train", s.train.name, "none"),
            ("precision", s.precision.name, "fp32"),
            ("hub", s.hub.name, "local"),
            ("seed", str(s.seed), "0"),
        )
        if value != default
    ]
    return compose_run_name(s.backbone.name, shown, implied)


def run_tags(s: RunConfig) -> dict[str, str]:
    tags = {
        "track": s.track.name,
        "backbone": s.backbone.name,
        "preprocess": s.preprocess.name,
        "data": s.data.name,
        "device": s.device.name,
        "runtime": s.runtime.name,
        "hub": s.hub.name,
        "train": s.train.name,
        "seed": str(s.seed),
        "precision": s.precision.name,
    }
    if s.hub.name == "local":
        tags["measured_on"] = "host_cpu"
    return tags | git_info()


def system_metrics_on(s: RunConfig) -> bool:
    """MLflow's system metrics: ``tracking.system_metrics``, or on when the run trains."""
    if s.tracking.system_metrics is not None:
        return bool(s.tracking.system_metrics)
    return s.train.name != "none"


def model_facts(s: RunConfig, component: str, weights: str) -> ModelFacts:
    """What a component's logged model records besides its file (see :class:`ModelFacts`); the
    file is the fp32 export, ``precision`` what the component is deployed in."""
    deployment = {}
    if s.hub.name == "aihub":
        deployment = {
            "aihub.device": str(s.device.aihub_name),
            "aihub.runtime": str(s.runtime.target_runtime),
        }
    return ModelFacts(
        tags={"track": s.track.name},
        params={
            "backbone": s.backbone.name,
            "preprocess": s.preprocess.name,
            "weights": weights,
            "precision": s.precision.of(component),
            "export.opset": str(s.export.opset),
        },
        deployment=deployment,
    )


def component_metrics(name: str, run: ComponentRun) -> dict[str, float]:
    prof, inf = run.profile, run.inference
    assert prof is not None and inf is not None
    metrics = {
        f"latency_ms/{name}": prof.latency_ms,
        f"peak_memory_mb/{name}": prof.peak_memory_mb[1],
        f"peak_memory_mb_low/{name}": prof.peak_memory_mb[0],
        f"inference_seconds/{name}": inf.seconds,
    }
    metrics |= {f"{k}/{name}": v for k, v in inf.metrics.items()}
    return metrics


def counts(values: dict[str, float]) -> dict[str, str]:
    """Values that never change during a run (data sizes, layers per compute unit, operator
    counts), as params: the run's charts then open on what it measured, not on one-point bars."""
    return {k: str(int(v)) if float(v).is_integer() else f"{v:g}" for k, v in values.items()}


def component_params(name: str, run: ComponentRun) -> dict[str, str]:
    """A component's layers per compute unit on the device (``compute_units/<name>/<unit>``)."""
    assert run.profile is not None
    units = run.profile.compute_units
    return counts({f"compute_units/{name}/{u.lower()}": float(n) for u, n in units.items()})


def _work_dir(work_dir: Path | None) -> Path:
    if work_dir is None:
        # Outside Hydra (an API call): a folder of its own, even for two runs in one second.
        adhoc = Path("outputs") / "adhoc"
        adhoc.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=time.strftime("%Y-%m-%d_%H-%M-%S_"), dir=adhoc))
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def _resolved(cfg: DictConfig | RunConfig) -> DictConfig:
    """The config to log (params, ``config.yaml``): resolved, without the extra keys."""
    node = OmegaConf.structured(cfg) if isinstance(cfg, RunConfig) else cfg
    keep = [k for k in node if k != "reproduce"]
    return OmegaConf.masked_copy(node, keep)


def prune_store(uri: str) -> None:
    """Mark this host's runs whose process vanished as FAILED, and say which (a run killed with
    SIGKILL, or by the out-of-memory killer, would otherwise stay RUNNING forever)."""
    from mlflow.tracking import MlflowClient

    for gone in prune_vanished(MlflowClient(tracking_uri=uri)):
        log.warning(
            "MLflow run %s (%s) was still RUNNING but its process %s is gone: marked FAILED "
            "(failure=process-vanished)",
            gone.run_id,
            gone.name,
            gone.pid,
        )


def run(
    cfg: DictConfig | RunConfig,
    work_dir: Path | None = None,
    hydra_dir: Path | None = None,
    extra_tags: dict[str, str] | None = None,
    name_overrides: Sequence[str] = (),
) -> PipelineResult:
    """Run one configured job in its own MLflow run and return what it measured.

    ``extra_tags`` are added to the run's tags (e.g. ``reproduced_from``) without changing the
    config, so that a reproduction logs the same params as the run it reproduces;
    ``name_overrides`` are the overrides the run's name shows (:func:`run_name`).
    """
    return drive(run_steps(cfg, work_dir, hydra_dir, extra_tags, name_overrides))


def run_steps(
    cfg: DictConfig | RunConfig,
    work_dir: Path | None = None,
    hydra_dir: Path | None = None,
    extra_tags: dict[str, str] | None = None,
    name_overrides: Sequence[str] = (),
) -> Generator[InFlight, None, PipelineResult]:
    """:func:`run` as a generator: it yields what the hub has in flight at the device wait, and
    is resumed once that is done (its ``poll()`` returned True). An exception thrown in at the
    wait (a failed job, Ctrl-C) ends the run as it would have ended there (FAILED, KILLED).
    Before the wait the model is released: a sweep holds each waiting run's data and exports,
    not its weights."""
    settings = load_settings(cfg)  # every value and combination, before anything else
    rank = worker_rank()
    if rank:  # a DDP training worker started by a launcher: it trains, and that is all
        return train_worker(settings, rank, _work_dir(work_dir))
    uri = resolve_uri(settings.tracking.uri)
    check_store(uri)
    prune_store(uri)
    work_dir = _work_dir(work_dir)
    track = build_track(settings)
    precision = PrecisionPlan(settings.precision)
    if settings.hub.name == "local" and settings.device.name != "host_cpu":
        log.warning(
            "hub=local measures on this machine's CPU with ONNX Runtime: device=%s and "
            "runtime=%s are recorded as the target, but latency and memory are the host's. "
            "Use hub=aihub for numbers from the device.",
            settings.device.name,
            settings.runtime.name,
        )
    experiment = str(settings.tracking.experiment)
    tags = run_tags(settings) | (extra_tags or {})
    resolved = _resolved(cfg)
    run_id: str | None = None
    try:
        with start_run(
            settings.tracking,
            experiment,
            run_name(settings, name_overrides),
            tags,
            system_metrics=system_metrics_on(settings),
        ) as rec:
            run_id = rec.run_id
            ensure_table_view(rec.client, rec.experiment_id, settings.track.objective)
            try:
                params = flatten(OmegaConf.to_container(resolved, resolve=True))
                rec.log_params(params | thread_params())  # threads: results can depend on them
                rec.log_text(OmegaConf.to_yaml(resolved, resolve=True), "config.yaml")
                result = yield from _stages(settings, track, precision, rec, work_dir)
                result.objective = score(
                    settings.track.objective, settings.budget, result.metrics, settings.fidelity
                )
                rec.log_metrics(result.objective.metrics())
                rec.set_tags(result.objective.tags())
                result.metrics |= result.objective.metrics()
                result.experiment_id = rec.experiment_id
                summary = results_text(settings, result)
                rec.set_note(f"```text\n{summary}\n```\n")
            finally:
                if hydra_dir is not None and hydra_dir.is_dir():
                    rec.log_artifact(hydra_dir, ".hydra")
                for logfile in work_dir.glob("*.log"):
                    rec.log_artifact(logfile)
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, run_id, settings, work_dir) from None
    _print_summary(summary, result, rec.tracking_uri, experiment)
    return result


class _WorkerLog:
    """A training worker's RunLog: rank 0 records the run, workers record nothing."""

    run_id = ""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        return None

    def set_tags(self, tags: dict[str, str]) -> None:
        return None


def train_worker(s: RunConfig, rank: int, work_dir: Path) -> PipelineResult:
    """Rank ``rank`` (> 0) of a multi-process training launch (Lightning's ``ddp`` running the
    command again, ``torchrun``, ``srun``): the same data and starting weights as rank 0, then
    training, which joins rank 0's process group; no MLflow run, export or evaluation."""
    log.info("training worker rank %d: training only; rank 0 records the run", rank)
    nan = float("nan")
    objective = Objective(s.track.objective, nan, nan, nan, None, False)
    if s.train.name == "none":
        return PipelineResult("", {}, objective=objective)
    seed_everything(s.seed)
    track = build_track(s)
    data = track.load_data(work_dir, training=True)
    seed_everything(s.seed)
    bundle = track.build_model()
    track.train(bundle, data, s.train, _WorkerLog(resolve_uri(s.tracking.uri)), work_dir)
    return PipelineResult("", {}, objective=objective)


def _interrupted(
    exc: KeyboardInterrupt, run_id: str | None, s: RunConfig, work_dir: Path
) -> Interrupted:
    """The interrupt, with what was kept and how to go on."""
    signal_name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
    kept: list[str] = []
    resume = None
    checkpoints = sorted((work_dir / "checkpoints").glob("*.ckpt"))
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints)
        kept.append(f"Checkpoints ({names}) are in {work_dir / 'checkpoints'} and logged.")
        resume = f"Resume with the same command plus train.resume_from={run_id}."
    else:
        kept.append(
            "Temporary export files were removed; finished exports and hub results stay in the "
            f"stage cache ({s.cache.dir})"
            + (" and the AI Hub job ledger" if s.hub.name == "aihub" else "")
            + ", so the same command picks up from there."
        )
    return Interrupted(signal_name, run_id=run_id, kept=tuple(kept), resume=resume)


def _stages(
    s: RunConfig, track: Track, plan: PrecisionPlan, rec: RunRecorder, work_dir: Path
) -> Generator[InFlight, None, PipelineResult]:
    seed_everything(s.seed)
    clock = StageClock()
    # The hub first, inside the run: credentials, network and device are checked before any
    # data or model work, and a failure is recorded on the run.
    hub: Hub = build_hub(
        s.hub, s.device, s.runtime, track=s.track.name, cache_dir=s.paths.cache_dir
    )
    hub.job_listener = rec.on_job
    hub.preflight()  # credentials, network and device: before any data or model work
    cache = StageCache.from_settings(s.cache, rec.run_id, job_listener=rec.on_job)
    hub = cache.wrap(hub)
    training = s.train.name != "none"

    console.stage("data", f"{s.data.name} (track={s.track.name})")
    data = track.load_data(work_dir, training=training)
    clock.lap("data")
    rec.log_params(counts({f"data/{k}": v for k, v in data.stats.items()}))
    rec.log_datasets(data.datasets)
    for report in data.reports:
        rec.log_artifact(report, "data")

    console.stage("model", s.backbone.name)
    seed_everything(s.seed)  # the starting weights depend on the seed alone, not on the data
    bundle = track.build_model()
    rec.set_tags({"weights": bundle.weights} | bundle.facts)
    rec.log_params(bundle.facts)  # the activation and the normalisation the run applies
    if hasattr(track, "lever_metrics"):  # what a model lever (an activation swap) costs
        rec.log_metrics(track.lever_metrics(bundle, data))
    clock.lap("model")
    # The model as loaded against the weights' authors' code, before anything changes it.
    console.stage("reference", "the model as loaded against the weights' authors' code")
    reference = track.reference_parity(bundle, data)
    rec.log_metrics(reference.metrics())
    rec.set_tags({"reference": reference.reference[:5000]})
    clock.lap("reference")
    failure = reference.failure()
    if failure:
        raise ParityError(failure)

    if training:
        console.stage("train", s.train.name)
        bundle = track.train(bundle, data, s.train, rec, work_dir)
        # Where the deployed weights came from: tag, description and logged models agree.
        bundle = dataclasses.replace(bundle, weights=f"finetuned:{bundle.weights}")
        rec.set_tags({"weights": bundle.weights})
        clock.lap("train")

    # Calibration data is chosen and checked before anything is exported or paid for.
    precisions = _precisions(plan, track, data, bundle, rec)

    console.stage("export", ", ".join(c.name for c in bundle.components))
    onnx_dir = Path(s.paths.cache_dir) / "onnx"
    exports: dict[str, ExportResult] = {}
    for comp in bundle.components:
        samples = data.inputs[comp.name][: s.export.parity_samples]
        exp = cache.export(
            comp,
            samples,
            s.export.opset,
            s.export.parity_threshold,
            lambda comp=comp, samples=samples: export_component(
                comp,
                samples,
                onnx_dir,
                opset=s.export.opset,
                parity_threshold=s.export.parity_threshold,
                rewrites=s.export.rewrites,
            ),
            rewrites=s.export.rewrites,
        )
        exports[comp.name] = exp
        shape = "x".join(map(str, exp.input.shape))
        rec.set_tags(
            {
                f"onnx_sha256/{comp.name}": exp.sha256,
                f"onnx_input/{comp.name}": f"{exp.input.name} {shape} {exp.input.dtype}",
            }
        )
        if s.tracking.log_models:
            rec.log_model(
                comp.name, exp.path, exp.sha256, model_facts(s, comp.name, bundle.weights)
            )
        rec.log_metrics(
            {
                f"parity_cosine_min/{comp.name}": exp.parity_cosine_min,
                f"export_seconds/{comp.name}": exp.seconds,
            }
            | export_metrics(comp.name, exp),
            models=[comp.name],
        )
        rec.log_params(export_params(comp.name, exp))
        if s.tracking.log_onnx:
            rec.log_artifact(exp.path, "onnx")
    rec.set_tags(cache.tags())
    # Device hazards of every graph to compile, before any hub stage (export.lint).
    lint = DeviceLint.from_settings(s, work_dir)
    specs = {n: e.input for n, e in exports.items()}
    lint.check(rec, {n: ("export", e.path) for n, e in exports.items()}, specs)
    # ... and of every fp16 / quantized graph the hub makes, before it is compiled; and the
    # I/O of every model the hub compiled against the submission contract (io_contract).
    hub.graph_check = lambda name, label, path: lint.check(rec, {name: (label, path)}, specs)
    hub.compiled_check = lambda name, io, where: check_compiled(rec, lint, name, io, where)
    clock.lap("export")
    if s.precision.sensitivity or s.precision.exclude == "auto":
        from lpcvlab.deploy.precision.selective import selective_quantization

        console.stage("precision", "sensitivity sweep / exclude=auto")
        precisions = selective_quantization(s, track, data, exports, precisions, rec, work_dir)
        clock.lap("sensitivity")

    weights = bundle.weights
    del bundle, comp  # exported: a run waiting on the device holds no weights

    console.stage("compile, profile, infer", f"hub={s.hub.name}")
    pending = hub.start_components(
        [
            ComponentJob(exp, data.inputs[name], precision=precisions[name])
            for name, exp in exports.items()
        ]
    )
    try:
        if not pending.poll():
            yield pending  # the device wait: resumed when every job is done
    except BaseException:
        pending.stop()
        raise
    runs = pending.result()
    rec.set_tags(cache.tags())
    deployed = deployed_graphs(runs)  # the fp16 / quantized graphs deployed (checked once)
    lint.check(rec, deployed, specs)
    log_compiled_artifacts(rec, runs, log_files=s.tracking.log_models)
    if s.tracking.log_models:
        log_deployed_models(s, rec, runs, weights)
    reused = ""
    if cache.hits:
        stages: dict[str, list[str]] = {}
        for h in cache.hits:
            stages.setdefault(h.component, []).append(h.stage)
        sources = ", ".join(sorted({h.run_id for h in cache.hits}))
        reused = "; ".join(f"{c} {'/'.join(st)}" for c, st in stages.items())
        reused += f" (from run {sources})"
        console.stage("cache", f"reused {reused}")
    clock.lap("runtime")
    metrics: dict[str, float] = {}
    for name, crun in runs.items():
        measured = component_metrics(name, crun)
        rec.log_metrics(measured, models=[name])
        rec.log_params(component_params(name, crun))
        metrics |= measured
        assert crun.profile is not None
        rec.log_dict(crun.profile.raw, f"profiles/{name}.json")
        if crun.quantized is not None:
            quantized = quantized_metrics(name, crun)
            rec.log_metrics(quantized, models=[name])
            rec.log_params(quantized_params(name, crun))
            rec.set_tags(quantized_tags(name, crun))
            metrics |= quantized

    console.stage("metrics", s.track.name)
    outputs = {}
    for name, crun in runs.items():
        assert crun.inference is not None
        outputs[name] = crun.inference.outputs
    evaluation = track.evaluate(data, outputs, work_dir)
    rec.log_metrics(evaluation.metrics, models=list(exports), dataset="evaluation")
    rec.set_tags(evaluation.tags)
    for path in evaluation.artifacts:
        rec.log_artifact(path, "results")
    if evaluation.summary:
        rec.log_text(json.dumps(evaluation.summary, indent=2, default=str), "results/summary.json")
    metrics |= evaluation.metrics
    metrics |= {f"parity_cosine_min/{n}": e.parity_cosine_min for n, e in exports.items()}
    metrics |= reference.metrics()
    clock.lap("metrics")
    lowered = [n for n, p in precisions.items() if p.name != "fp32"]
    if lowered:
        fidelity = _fidelity(
            s, hub, cache, track, data, exports, outputs, evaluation, lowered, work_dir
        )
        rec.log_metrics(fidelity)
        rec.set_tags(cache.tags() | _reference_tag(cache))
        metrics |= fidelity
        clock.lap("fidelity")
    rec.log_metrics(clock.metrics())
    metrics |= clock.metrics()
    return PipelineResult(
        rec.run_id, metrics, exports, runs, evaluation, weights, cache_reused=reused
    )


def deployed_graphs(runs: dict[str, ComponentRun]) -> dict[str, tuple[str, Path]]:
    """The non-fp32 graphs deployed (``hub=local``'s, or AI Hub quantize jobs' downloaded)."""
    return {
        name: (run.quantized.precision, Path(run.quantized.model.path))
        for name, run in runs.items()
        if run.quantized is not None and run.quantized.model is not None
    }


def check_compiled(
    rec: RunRecorder, lint: DeviceLint, component: str, io: CompiledIO, where: str
) -> None:
    """A compiled model's I/O: recorded (``compiled_io/<component>``, what ``lpcvlab submit``
    checks), then checked against the submission contract by the device lint."""
    rec.set_tags({f"compiled_io/{component}": json.dumps(io.to_record(), separators=(",", ":"))})
    lint.check_compiled(rec, component, io, where)


def log_compiled_artifacts(
    rec: RunRecorder, runs: dict[str, ComponentRun], log_files: bool = True
) -> None:
    """What the hub built, where it says (AI Hub: each compile job's target model, ``.dlc`` /
    ``.bin``): ``deployed_sha256/<component>`` names that file, ``deployed_artifact/<component>``
    where it is logged (``deployed/<component>/``, with ``tracking.log_models``), beside the
    ONNX it was compiled from (``onnx_sha256/<component>``)."""
    for name, crun in runs.items():
        c = crun.compiled
        if c.artifact is None or c.artifact_sha256 is None:
            continue
        tags = {
            f"deployed_sha256/{name}": c.artifact_sha256,
            f"deployed_artifact/{name}": f"deployed/{name}/{c.artifact.name}",
        }
        if c.toolchain:
            tags[f"toolchain/{name}"] = c.toolchain
        rec.set_tags(tags)
        if log_files:
            rec.log_artifact(c.artifact, f"deployed/{name}")


def log_deployed_models(
    s: RunConfig, rec: RunRecorder, runs: dict[str, ComponentRun], weights: str
) -> None:
    """Each graph deployed in place of the fp32 export (fp16 / quantized ONNX, either hub) as
    the component's logged model, the fp32 export's model its parent; tags name both."""
    for name, crun in runs.items():
        q = crun.quantized
        if q is None or q.model is None:
            continue
        parent = rec.models.get(name, "")
        facts = model_facts(s, name, weights)
        extra = {"deployed_graph": q.precision, "parent_model_id": parent}
        facts = dataclasses.replace(facts, tags=facts.tags | extra)
        model_id = rec.log_model(name, Path(q.model.path), q.model.sha256, facts)
        # The hub's compiled file, where there is one, is what runs (log_compiled_artifacts).
        deployed = crun.compiled.artifact_sha256 or q.model.sha256
        rec.set_tags(
            {
                f"deployed_model/{name}": model_id,
                f"deployed_sha256/{name}": deployed,
                f"parent_model/{name}": parent,
            }
        )


def export_metrics(name: str, exp: ExportResult) -> dict[str, float]:
    """What each rewrite of the exported graph cost (cosine against PyTorch)."""
    return {f"rewrite_cosine_min/{name}/{r}": c for r, c in exp.rewrite_cosine_min.items()}


def export_params(name: str, exp: ExportResult) -> dict[str, str]:
    """The exported graph's operator histogram and each rewrite's sites (counts: params)."""
    ops = exp.op_counts or op_counts(exp.path)
    values = {f"onnx_ops/{name}/{op}": float(n) for op, n in ops.items()}
    values |= {f"rewrite_sites/{name}/{r}": float(n) for r, n in exp.rewrite_sites.items()}
    values |= {f"onnx_ops_plain/{name}/{op}": float(n) for op, n in exp.op_counts_plain.items()}
    return counts(values)


def quantized_metrics(name: str, run: ComponentRun) -> dict[str, float]:
    """How long making a non-fp32 component took."""
    q = run.quantized
    assert q is not None
    return {f"quantize_seconds/{name}": q.seconds}


def quantized_params(name: str, run: ComponentRun) -> dict[str, str]:
    """The operators of a non-fp32 component's graph (counts; its calibration size is logged
    with its calibration data, :func:`_precisions`)."""
    q = run.quantized
    assert q is not None
    values: dict[str, float] = {}
    if q.model is not None:
        ops = q.model.op_counts or op_counts(q.model.path)
        values |= {f"onnx_ops_{q.precision}/{name}/{op}": float(n) for op, n in ops.items()}
    return counts(values)


def quantized_tags(name: str, run: ComponentRun) -> dict[str, str]:
    q = run.quantized
    assert q is not None
    tags = {f"precision_method/{name}": q.method}
    if q.model is not None:
        tags[f"onnx_sha256/{name}/{q.precision}"] = q.model.sha256
    return tags


def _precisions(
    plan: PrecisionPlan, track: Track, data: TrackData, bundle: ModelBundle, rec: RunRecorder
) -> dict[str, ComponentPrecision]:
    """Each component's precision, with its calibration data chosen from the track's inputs
    and checked (a ConfigError naming the component and the setting otherwise)."""
    rec.set_tags(plan.tags([c.name for c in bundle.components]))
    hook = getattr(track, "calibration_inputs", None)
    out: dict[str, ComponentPrecision] = {}
    for comp in bundle.components:
        calibration = None
        if plan.needs_calibration(comp.name):
            n = plan.calibration_samples
            train = hook(data, comp.name, n) if hook is not None else None
            calibration = choose_calibration(
                comp.name, comp.input, n, data.inputs[comp.name], train
            )
            rec.set_tags(
                {
                    f"calibration/{comp.name}/source": calibration.source,
                    f"calibration/{comp.name}/sha256": calibration.sha256,
                }
            )
            rec.log_params(counts({f"calibration_samples/{comp.name}": len(calibration)}))
        out[comp.name] = ComponentPrecision(
            plan.of(comp.name), calibration, *plan.excluded(comp.name)
        )
    return out


REFERENCE = ".fp32"  # suffix of the fp32 reference's component names (cache tags)


def _fidelity(
    s: RunConfig,
    hub: Hub,
    cache: StageCache,
    track: Track,
    data: TrackData,
    exports: dict[str, ExportResult],
    outputs: dict[str, np.ndarray],
    evaluation: EvalResult,
    lowered: list[str],
    work_dir: Path,
) -> dict[str, float]:
    """Every non-fp32 component's outputs against the fp32 export's on the same inputs, and
    the track's objective computed from the fp32 outputs."""
    console.stage("fidelity", f"{', '.join(lowered)} against the fp32 export")
    if hub.records_jobs:  # the reference is never a paid job: this machine computes it
        local = build_hub(
            LocalHubConfig(), s.device, s.runtime, track=s.track.name, cache_dir=s.paths.cache_dir
        )
        hub = cache.wrap(local)
    jobs = [
        ComponentJob(
            dataclasses.replace(exports[n], component=n + REFERENCE),
            data.inputs[n],
            frozenset({INFERENCE}),
        )
        for n in lowered
    ]
    runs = hub.run_components(jobs)
    reference = {}
    for n in lowered:
        inference = runs[n + REFERENCE].inference
        assert inference is not None
        reference[n] = inference.outputs
    metrics: dict[str, float] = {}
    for n in lowered:
        metrics |= component_fidelity(n, reference[n], outputs[n], data.inputs[n])
    fp32_dir = work_dir / "fp32"
    fp32_dir.mkdir(parents=True, exist_ok=True)
    fp32 = track.evaluate(data, outputs | reference, fp32_dir)
    objective = s.track.objective
    metrics |= metric_fidelity(objective, evaluation.metrics[objective], fp32.metrics[objective])
    return metrics


def _reference_tag(cache: StageCache) -> dict[str, str]:
    """Where the fp32 reference outputs came from."""
    runs = {
        h.run_id for h in cache.hits if h.component.endswith(REFERENCE) and h.stage == INFERENCE
    }
    found = f"stage cache (run {', '.join(sorted(runs))})" if runs else "computed on this machine"
    return {"fidelity/reference": f"fp32 export, onnxruntime CPU; {found}"}


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


def _print_summary(summary: str, res: PipelineResult, uri: str, experiment: str) -> None:
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
