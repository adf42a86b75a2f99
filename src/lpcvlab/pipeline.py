"""One run, start to end: data -> model -> (train) -> export -> hub -> metrics -> MLflow.

The config is read once, at the top (``run.py`` hands its loaded settings to :func:`run`; a
caller without them has them loaded here): :func:`run` checks the tracking store, builds the
track (with its backbone factory), the hub back-end and the precision plan, and hands each stage
those objects and its own settings. The pipeline owns the MLflow run and reads as the list of
stages :func:`_stages` runs, each a function of the previous stage's record; how a record is
written to MLflow is the recorder's (:class:`~lpcvlab.tracking.recorder.RunRecorder`).

:func:`run_steps` is the same run as a generator that yields at the device wait (what the hub
has in flight, :class:`~lpcvlab.hubs.base.InFlight`), so that a sweep can do the local work of
its next config, and wait on every config's AI Hub jobs together, while this run's MLflow run
stays open; :func:`run` drives it to the end, blocking. ``hub=local`` never yields.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Generator, Sequence
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
from lpcvlab.errors import Interrupted, ParityError
from lpcvlab.hubs import INFERENCE, ComponentJob, Hub, InFlight, build_hub, drive
from lpcvlab.hubs.cache import StageCache
from lpcvlab.objective import Objective, score
from lpcvlab.tracking.models import model_facts
from lpcvlab.tracking.naming import run_name, run_tags
from lpcvlab.tracking.recorder import RunRecorder, start_run, system_metrics_on
from lpcvlab.tracking.store import check_store, prune_store, resolve_uri
from lpcvlab.tracking.summary import PipelineResult, print_summary, results_text
from lpcvlab.tracking.views import ensure_table_view
from lpcvlab.tracks import Track, TrackData, build_track
from lpcvlab.training.launch import worker_rank
from lpcvlab.types import (
    CompiledIO,
    ComponentRun,
    EvalResult,
    ExportResult,
    ModelBundle,
    ReferenceParity,
)
from lpcvlab.util import console
from lpcvlab.util.seeding import seed_everything, thread_params

log = logging.getLogger(__name__)

__all__ = ["PipelineResult", "run", "run_steps"]


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


def run(
    cfg: DictConfig | RunConfig,
    work_dir: Path | None = None,
    hydra_dir: Path | None = None,
    extra_tags: dict[str, str] | None = None,
    name_overrides: Sequence[str] = (),
    settings: RunConfig | None = None,
) -> PipelineResult:
    """Run one configured job in its own MLflow run and return what it measured.

    ``extra_tags`` are added to the run's tags (e.g. ``reproduced_from``) without changing the
    config, so that a reproduction logs the same params as the run it reproduces;
    ``name_overrides`` are the overrides the run's name shows (:func:`run_name`); ``settings``
    are ``cfg`` loaded already (:func:`lpcvlab.config.load_settings`), so that a run loads its
    config once.
    """
    return drive(run_steps(cfg, work_dir, hydra_dir, extra_tags, name_overrides, settings))


def run_steps(
    cfg: DictConfig | RunConfig,
    work_dir: Path | None = None,
    hydra_dir: Path | None = None,
    extra_tags: dict[str, str] | None = None,
    name_overrides: Sequence[str] = (),
    settings: RunConfig | None = None,
) -> Generator[InFlight, None, PipelineResult]:
    """:func:`run` as a generator: it yields what the hub has in flight at the device wait, and
    is resumed once that is done (its ``poll()`` returned True). An exception thrown in at the
    wait (a failed job, Ctrl-C) ends the run as it would have ended there (FAILED, KILLED).
    Before the wait the model is released: a sweep holds each waiting run's data and exports,
    not its weights."""
    if settings is None:  # every value and combination, before anything else
        settings = load_settings(cfg)
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
                rec.log_config(resolved, thread_params())  # threads: results can depend on them
                result = yield from _stages(settings, track, precision, rec, work_dir)
                result.objective = score(
                    settings.track.objective, settings.budget, result.metrics, settings.fidelity
                )
                rec.log_objective(result.objective)
                result.metrics |= result.objective.metrics()
                result.experiment_id = rec.experiment_id
                summary = results_text(settings, result)
                rec.log_summary(summary)
            finally:
                rec.log_job_files(hydra_dir, work_dir)
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, run_id, settings, work_dir) from None
    print_summary(summary, result, rec.tracking_uri, experiment)
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
    """The run's stages in order, each a function of the records before it."""
    seed_everything(s.seed)
    clock = StageClock()
    hub, cache = open_hub(s, rec)  # credentials, network, device: before any data or model work
    data = load_data(s, track, rec, work_dir)
    clock.lap("data")
    bundle = build_model(s, track, rec, data)
    clock.lap("model")
    reference = check_reference(track, rec, bundle, data)
    clock.lap("reference")
    if s.train.name != "none":
        bundle = train(s, track, rec, bundle, data, work_dir)
        clock.lap("train")
    # Calibration data is chosen and checked before anything is exported or paid for.
    precisions = _precisions(plan, track, data, bundle, rec)
    exports = export_all(s, cache, rec, bundle, data)
    lint = check_graphs(s, hub, rec, exports, work_dir)
    clock.lap("export")
    if s.precision.sensitivity or s.precision.exclude == "auto":
        from lpcvlab.deploy.precision.selective import selective_quantization

        console.stage("precision", "sensitivity sweep / exclude=auto")
        precisions = selective_quantization(s, track, data, exports, precisions, rec, work_dir)
        clock.lap("sensitivity")
    weights = bundle.weights
    del bundle  # exported: a run waiting on the device holds no weights
    runs = yield from deploy(s, hub, cache, rec, exports, data, precisions, lint, weights)
    reused = cache_reuse(cache)
    clock.lap("runtime")
    metrics: dict[str, float] = {}
    for name, run in runs.items():
        metrics |= rec.log_component_run(name, run)
    evaluation = evaluate(s, track, rec, data, runs, work_dir)
    metrics |= evaluation.metrics
    metrics |= {f"parity_cosine_min/{n}": e.parity_cosine_min for n, e in exports.items()}
    metrics |= reference.metrics()
    clock.lap("metrics")
    lowered = [n for n, p in precisions.items() if p.name != "fp32"]
    if lowered:
        outputs = _outputs(runs)
        metrics |= _fidelity(
            s, hub, cache, rec, track, data, exports, outputs, evaluation, lowered, work_dir
        )
        clock.lap("fidelity")
    rec.log_metrics(clock.metrics())
    metrics |= clock.metrics()
    return PipelineResult(
        rec.run_id, metrics, exports, runs, evaluation, weights, cache_reused=reused
    )


def open_hub(s: RunConfig, rec: RunRecorder) -> tuple[Hub, StageCache]:
    """The hub, inside the run (credentials, network and device are checked before any data or
    model work, and a failure is recorded on the run), wrapped in the stage cache."""
    hub: Hub = build_hub(
        s.hub, s.device, s.runtime, track=s.track.name, cache_dir=s.paths.cache_dir
    )
    hub.job_listener = rec.on_job
    hub.preflight()
    cache = StageCache.from_settings(s.cache, rec.run_id, job_listener=rec.on_job)
    return cache.wrap(hub), cache


def load_data(s: RunConfig, track: Track, rec: RunRecorder, work_dir: Path) -> TrackData:
    console.stage("data", f"{s.data.name} (track={s.track.name})")
    data = track.load_data(work_dir, training=s.train.name != "none")
    rec.log_data(data.stats, data.datasets, data.reports)
    return data


def build_model(s: RunConfig, track: Track, rec: RunRecorder, data: TrackData) -> ModelBundle:
    """The backbone with its weights (seeded: the starting weights depend on the seed alone,
    not on the data), and what a model lever (an activation swap) costs."""
    console.stage("model", s.backbone.name)
    seed_everything(s.seed)
    bundle = track.build_model()
    rec.log_weights(bundle.weights, bundle.facts)
    if hasattr(track, "lever_metrics"):
        rec.log_metrics(track.lever_metrics(bundle, data))
    return bundle


def check_reference(
    track: Track, rec: RunRecorder, bundle: ModelBundle, data: TrackData
) -> ReferenceParity:
    """The model as loaded against the weights' authors' code, before anything changes it; a
    ParityError names what differs."""
    console.stage("reference", "the model as loaded against the weights' authors' code")
    reference = track.reference_parity(bundle, data)
    rec.log_reference(reference)
    failure = reference.failure()
    if failure:
        raise ParityError(failure)
    return reference


def train(
    s: RunConfig,
    track: Track,
    rec: RunRecorder,
    bundle: ModelBundle,
    data: TrackData,
    work_dir: Path,
) -> ModelBundle:
    console.stage("train", s.train.name)
    bundle = track.train(bundle, data, s.train, rec, work_dir)
    # Where the deployed weights came from: tag, description and logged models agree.
    bundle = dataclasses.replace(bundle, weights=f"finetuned:{bundle.weights}")
    rec.log_weights(bundle.weights)
    return bundle


def export_all(
    s: RunConfig, cache: StageCache, rec: RunRecorder, bundle: ModelBundle, data: TrackData
) -> dict[str, ExportResult]:
    """Every component to ONNX (or from the stage cache), checked against PyTorch."""
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
        facts = model_facts(s, comp.name, bundle.weights) if s.tracking.log_models else None
        rec.log_export(exp, facts, log_onnx=s.tracking.log_onnx)
    rec.set_tags(cache.tags())
    return exports


def check_graphs(
    s: RunConfig, hub: Hub, rec: RunRecorder, exports: dict[str, ExportResult], work_dir: Path
) -> DeviceLint:
    """Device hazards of every graph to compile, before any hub stage (``export.lint``); the
    hub shows the lint every fp16 / quantized graph it makes before compiling it, and the I/O
    of every model it compiled (the submission contract: ``io_contract``)."""
    lint = DeviceLint.from_settings(s, work_dir)
    specs = {n: e.input for n, e in exports.items()}
    lint.check(rec, {n: ("export", e.path) for n, e in exports.items()}, specs)
    hub.graph_check = lambda name, label, path: lint.check(rec, {name: (label, path)}, specs)

    def compiled(name: str, io: CompiledIO, where: str) -> None:
        rec.log_compiled_io(name, io)
        lint.check_compiled(rec, name, io, where)

    hub.compiled_check = compiled
    return lint


def deploy(
    s: RunConfig,
    hub: Hub,
    cache: StageCache,
    rec: RunRecorder,
    exports: dict[str, ExportResult],
    data: TrackData,
    precisions: dict[str, ComponentPrecision],
    lint: DeviceLint,
    weights: str,
) -> Generator[InFlight, None, dict[str, ComponentRun]]:
    """Compile, profile and run every component on the hub; yields once at the device wait
    (resumed when every job is done). The deployed graphs are checked and logged."""
    console.stage("compile, profile, infer", f"hub={s.hub.name}")
    pending = hub.start_components(
        [
            ComponentJob(exp, data.inputs[name], precision=precisions[name])
            for name, exp in exports.items()
        ]
    )
    try:
        if not pending.poll():
            yield pending
    except BaseException:
        pending.stop()
        raise
    runs = pending.result()
    rec.set_tags(cache.tags())
    specs = {n: e.input for n, e in exports.items()}
    lint.check(rec, deployed_graphs(runs), specs)  # the fp16 / quantized graphs (checked once)
    for name, run in runs.items():
        facts = model_facts(s, name, weights) if s.tracking.log_models else None
        rec.log_deployed(name, run, facts, log_files=s.tracking.log_models)
    return runs


def deployed_graphs(runs: dict[str, ComponentRun]) -> dict[str, tuple[str, Path]]:
    """The non-fp32 graphs deployed (``hub=local``'s, or AI Hub quantize jobs' downloaded)."""
    return {
        name: (run.quantized.precision, Path(run.quantized.model.path))
        for name, run in runs.items()
        if run.quantized is not None and run.quantized.model is not None
    }


def cache_reuse(cache: StageCache) -> str:
    """``"<component> <stage>/<stage>; ... (from run <id>)"``: what the stage cache gave."""
    if not cache.hits:
        return ""
    stages: dict[str, list[str]] = {}
    for h in cache.hits:
        stages.setdefault(h.component, []).append(h.stage)
    sources = ", ".join(sorted({h.run_id for h in cache.hits}))
    reused = "; ".join(f"{c} {'/'.join(st)}" for c, st in stages.items())
    reused += f" (from run {sources})"
    console.stage("cache", f"reused {reused}")
    return reused


def _outputs(runs: dict[str, ComponentRun]) -> dict[str, np.ndarray]:
    outputs = {}
    for name, run in runs.items():
        assert run.inference is not None
        outputs[name] = run.inference.outputs
    return outputs


def evaluate(
    s: RunConfig,
    track: Track,
    rec: RunRecorder,
    data: TrackData,
    runs: dict[str, ComponentRun],
    work_dir: Path,
) -> EvalResult:
    """The track's metrics on the device outputs."""
    console.stage("metrics", s.track.name)
    evaluation = track.evaluate(data, _outputs(runs), work_dir)
    rec.log_evaluation(evaluation, list(runs))
    return evaluation


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
            rec.log_calibration(comp.name, calibration)
        out[comp.name] = ComponentPrecision(
            plan.of(comp.name), calibration, *plan.excluded(comp.name)
        )
    return out


REFERENCE = ".fp32"  # suffix of the fp32 reference's component names (cache tags)


def _fidelity(
    s: RunConfig,
    hub: Hub,
    cache: StageCache,
    rec: RunRecorder,
    track: Track,
    data: TrackData,
    exports: dict[str, ExportResult],
    outputs: dict[str, np.ndarray],
    evaluation: EvalResult,
    lowered: list[str],
    work_dir: Path,
) -> dict[str, float]:
    """Every non-fp32 component's outputs against the fp32 export's on the same inputs, and
    the track's objective computed from the fp32 outputs (logged, and returned)."""
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
    cached = {
        h.run_id for h in cache.hits if h.component.endswith(REFERENCE) and h.stage == INFERENCE
    }
    rec.log_fidelity(metrics, sorted(cached))
    rec.set_tags(cache.tags())
    return metrics
