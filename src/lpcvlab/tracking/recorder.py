"""MLflow run ownership: one Hydra job = one run; params, tags, metrics and artifacts.

The store defaults to ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts``;
``tracking.uri=`` or ``MLFLOW_TRACKING_URI`` points at a shared server instead
(:mod:`~lpcvlab.tracking.store` checks it before any work). Secrets never reach params, tags or
artifacts: keys that name a token, secret, password or key are dropped.

Runs always end: FINISHED, FAILED (``error`` tag, ``error.txt``) or KILLED (Ctrl-C or SIGTERM,
``error`` tag naming the signal).

:class:`RunRecorder` writes one run, and knows how each stage's record is written
(:meth:`~RunRecorder.log_export`, :meth:`~RunRecorder.log_component_run`, ...): the pipeline
hands it records, never metric names. Beyond params, metrics and tags a run uses MLflow's own
records, so that its page reads well: the data it read as dataset inputs, each exported
component as a logged model in the ONNX flavour (:mod:`~lpcvlab.tracking.models`), metrics
linked to those models and datasets, AI Hub job IDs as model tags as the jobs appear
(:meth:`RunRecorder.on_job`), the results table as the run's description
(:meth:`RunRecorder.set_note`), source tags with the command line, and MLflow's system metrics
while it runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from lpcvlab.config.schema import RunConfig, TrackingConfig
from lpcvlab.deploy.precision import Calibration
from lpcvlab.deploy.rewrites import op_counts
from lpcvlab.errors import Interrupted
from lpcvlab.objective import Objective
from lpcvlab.tracking.models import ModelFacts, log_onnx_model
from lpcvlab.tracking.naming import COMMAND_TAG, command_line
from lpcvlab.tracking.store import RetryingClient, get_experiment_id, process_tags, resolve_uri
from lpcvlab.types import (
    CompiledIO,
    ComponentRun,
    DatasetRecord,
    EvalResult,
    ExportResult,
    JobEvent,
    ReferenceParity,
)
from lpcvlab.util.secrets import is_secret_key

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "LPCVLAB_PARENT_RUN_ID"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI (markdown)
_MAX_PARAM = 6000
_BATCH = 100


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay one value; secret keys are dropped."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if is_secret_key(str(k)):
                continue
            out.update(flatten(v, key))
    else:
        out[prefix] = json.dumps(tree) if isinstance(tree, list | tuple) else str(tree)
    return out


def counts(values: dict[str, float]) -> dict[str, str]:
    """Values that never change during a run (data sizes, layers per compute unit, operator
    counts), as params: the run's charts then open on what it measured, not on one-point bars."""
    return {k: str(int(v)) if float(v).is_integer() else f"{v:g}" for k, v in values.items()}


def system_metrics_on(s: RunConfig) -> bool:
    """MLflow's system metrics: ``tracking.system_metrics``, or on when the run trains."""
    if s.tracking.system_metrics is not None:
        return bool(s.tracking.system_metrics)
    return s.train.name != "none"


class RunRecorder:
    """Writes into one MLflow run; handed to tracks as their :class:`RunLog`."""

    def __init__(
        self, client: MlflowClient, run_id: str, tracking_uri: str, experiment_id: str = ""
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.models: dict[str, str] = {}  # component -> MLflow logged model ID
        self.datasets: dict[str, DatasetRecord] = {}  # context -> dataset
        self._deployment: dict[str, str] = {}  # AI Hub device and runtime, for model tags
        self._qairt: dict[str, str] = {}  # component -> QAIRT version its compiled model reports

    def log_params(self, params: dict[str, str]) -> None:
        items = [
            Param(k, v if len(v) <= _MAX_PARAM else v[: _MAX_PARAM - 3] + "...")
            for k, v in params.items()
            if not is_secret_key(k)
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_metrics(
        self,
        metrics: dict[str, float],
        step: int | None = None,
        *,
        models: Sequence[str] = (),
        dataset: str | None = None,
    ) -> None:
        """Log ``metrics``; with ``models`` (component names) they are also linked to those
        components' logged models, and with ``dataset`` (a context such as ``evaluation``) to
        the dataset they were measured on, as the model's page shows them."""
        now = int(time.time() * 1000)
        ids = [self.models[c] for c in models if c in self.models] or [None]
        data = self.datasets.get(dataset or "")
        name, digest = (data.name, data.digest) if data and ids != [None] else (None, None)
        items = [
            Metric(k, float(v), now, step or 0, m, dataset_name=name, dataset_digest=digest)
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
            for m in ids
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        """The data the run read, as MLflow dataset inputs (name, source, digest, context)."""
        inputs = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.digest,
                    source_type="local",
                    source=json.dumps({"uri": d.source}),
                    profile=json.dumps(d.profile | {"sha256": d.sha256}),
                ),
                tags=[InputTag("mlflow.data.context", d.context)],
            )
            for d in datasets
        ]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)
        self.datasets |= {d.context: d for d in datasets}

    def log_model(
        self, component: str, path: Path, sha256: str, facts: ModelFacts | None = None
    ) -> str:
        """Log an exported component as this run's MLflow model (see :func:`log_onnx_model`);
        the AI Hub deployment (device and runtime) is set on the model with its compile job."""
        facts = facts or ModelFacts()
        model_id, reused = log_onnx_model(
            self.client, self.run_id, self.experiment_id, component, path, sha256, facts
        )
        self.models[component] = model_id
        self._deployment = dict(facts.deployment)
        how = "linked the logged model" if reused else "logged as model"
        log.info("MLflow: %s %s %s", component, how, model_id)
        return model_id

    def set_note(self, markdown: str) -> None:
        """The run's description in the MLflow UI."""
        self.set_tags({NOTE_TAG: markdown})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    # ------------------------------------------------------------ each stage's record

    def log_config(self, resolved: Any, extra_params: dict[str, str]) -> None:
        """The resolved config: flattened as params (with ``extra_params``: the thread counts)
        and whole as ``config.yaml``, what ``lpcvlab reproduce`` re-runs."""
        from omegaconf import OmegaConf

        self.log_params(flatten(OmegaConf.to_container(resolved, resolve=True)) | extra_params)
        self.log_text(OmegaConf.to_yaml(resolved, resolve=True), "config.yaml")

    def log_objective(self, objective: Objective) -> None:
        """What the run returns to a sweeper, and the verdicts behind it (budget, fidelity)."""
        self.log_metrics(objective.metrics())
        self.set_tags(objective.tags())

    def log_summary(self, text: str) -> None:
        """The results table as the run's description."""
        self.set_note(f"```text\n{text}\n```\n")

    def log_job_files(self, hydra_dir: Path | None, work_dir: Path) -> None:
        """Hydra's ``.hydra`` folder and the job's log files, whatever the run's end."""
        if hydra_dir is not None and hydra_dir.is_dir():
            self.log_artifact(hydra_dir, ".hydra")
        for logfile in work_dir.glob("*.log"):
            self.log_artifact(logfile)

    def log_reference(self, reference: ReferenceParity) -> None:
        """The model as loaded against its weights' authors' code (``reference_cosine_min/*``)."""
        self.log_metrics(reference.metrics())
        self.set_tags({"reference": reference.reference[:5000]})

    def log_calibration(self, component: str, calibration: Calibration) -> None:
        """Where a quantized component's calibration data came from, its hash and size."""
        self.set_tags(
            {
                f"calibration/{component}/source": calibration.source,
                f"calibration/{component}/sha256": calibration.sha256,
            }
        )
        self.log_params(counts({f"calibration_samples/{component}": len(calibration)}))

    def log_fidelity(self, metrics: dict[str, float], cached_from: Sequence[str]) -> None:
        """The non-fp32 components against the fp32 export, and where the fp32 outputs came
        from (``cached_from``: the runs whose stage cache gave them; none: computed here)."""
        self.log_metrics(metrics)
        found = (
            f"stage cache (run {', '.join(cached_from)})"
            if cached_from
            else "computed on this machine"
        )
        self.set_tags({"fidelity/reference": f"fp32 export, onnxruntime CPU; {found}"})

    def log_data(
        self, stats: dict[str, float], datasets: Sequence[DatasetRecord], reports: Sequence[Path]
    ) -> None:
        """What the data stage read: its sizes (params), the datasets, the reports of skips."""
        self.log_params(counts({f"data/{k}": v for k, v in stats.items()}))
        self.log_datasets(datasets)
        for report in reports:
            self.log_artifact(report, "data")

    def log_weights(self, weights: str, facts: dict[str, str] | None = None) -> None:
        """Where the weights came from (tag ``weights``) and the activation and normalisation
        they are run with (tags and params)."""
        self.set_tags({"weights": weights} | (facts or {}))
        if facts:
            self.log_params(facts)

    def log_export(self, exp: ExportResult, facts: ModelFacts | None, log_onnx: bool) -> None:
        """An exported component: its hash and input (tags), its logged model (``facts``: None
        with ``tracking.log_models=false``), parity and rewrite costs (metrics), its operator
        histogram (params)."""
        name = exp.component
        shape = "x".join(map(str, exp.input.shape))
        self.set_tags(
            {
                f"onnx_sha256/{name}": exp.sha256,
                f"onnx_input/{name}": f"{exp.input.name} {shape} {exp.input.dtype}",
            }
        )
        if facts is not None:
            self.log_model(name, exp.path, exp.sha256, facts)
        metrics = {f"parity_cosine_min/{name}": exp.parity_cosine_min}
        metrics[f"export_seconds/{name}"] = exp.seconds
        metrics |= {f"rewrite_cosine_min/{name}/{r}": c for r, c in exp.rewrite_cosine_min.items()}
        self.log_metrics(metrics, models=[name])
        ops = exp.op_counts or op_counts(exp.path)
        values = {f"onnx_ops/{name}/{op}": float(n) for op, n in ops.items()}
        values |= {f"rewrite_sites/{name}/{r}": float(n) for r, n in exp.rewrite_sites.items()}
        values |= {f"onnx_ops_plain/{name}/{op}": float(n) for op, n in exp.op_counts_plain.items()}
        self.log_params(counts(values))
        if log_onnx:
            self.log_artifact(exp.path, "onnx")

    def log_compiled_io(self, component: str, io: CompiledIO) -> None:
        """A compiled model's I/O as the hub reports it (``compiled_io/<component>``): what
        ``lpcvlab submit`` checks against the submission contract."""
        record = json.dumps(io.to_record(), separators=(",", ":"))
        self.set_tags({f"compiled_io/{component}": record})

    def log_component_run(self, name: str, run: ComponentRun) -> dict[str, float]:
        """A component's device measurements (latency, memory, inference metrics; layers per
        compute unit as params; the raw profile) and, when it is not fp32, how its graph was
        made; returns the metrics."""
        prof, inf = run.profile, run.inference
        assert prof is not None and inf is not None
        metrics = {
            f"latency_ms/{name}": prof.latency_ms,
            f"peak_memory_mb/{name}": prof.peak_memory_mb[1],
            f"peak_memory_mb_low/{name}": prof.peak_memory_mb[0],
            f"inference_seconds/{name}": inf.seconds,
        }
        metrics |= {f"{k}/{name}": v for k, v in inf.metrics.items()}
        units = prof.compute_units
        self.log_params(
            counts({f"compute_units/{name}/{u.lower()}": float(n) for u, n in units.items()})
        )
        self.log_dict(prof.raw, f"profiles/{name}.json")
        q = run.quantized
        if q is not None:
            metrics[f"quantize_seconds/{name}"] = q.seconds
            tags = {f"precision_method/{name}": q.method}
            if q.model is not None:
                ops = q.model.op_counts or op_counts(q.model.path)
                kind = f"onnx_ops_{q.precision}/{name}"
                self.log_params(counts({f"{kind}/{op}": float(n) for op, n in ops.items()}))
                tags[f"onnx_sha256/{name}/{q.precision}"] = q.model.sha256
            self.set_tags(tags)
        self.log_metrics(metrics, models=[name])
        return metrics

    def log_deployed(
        self, name: str, run: ComponentRun, facts: ModelFacts | None, log_files: bool
    ) -> None:
        """What the hub deployed for a component: the file it built (AI Hub: the compile job's
        ``.dlc`` / ``.bin``; ``deployed_sha256/<name>`` names it, logged under ``deployed/``
        with ``tracking.log_models``), and a graph deployed in place of the fp32 export (fp16 /
        quantized ONNX) as the component's logged model, the export's model its parent
        (``facts``: None with ``tracking.log_models=false``)."""
        c = run.compiled
        if c.artifact is not None and c.artifact_sha256 is not None:
            tags = {
                f"deployed_sha256/{name}": c.artifact_sha256,
                f"deployed_artifact/{name}": f"deployed/{name}/{c.artifact.name}",
            }
            if c.toolchain:
                tags[f"toolchain/{name}"] = c.toolchain
            self.set_tags(tags)
            if log_files:
                self.log_artifact(c.artifact, f"deployed/{name}")
        q = run.quantized
        if facts is None or q is None or q.model is None:
            return
        parent = self.models.get(name, "")
        extra = {"deployed_graph": q.precision, "parent_model_id": parent}
        facts = dataclasses.replace(facts, tags=facts.tags | extra)
        model_id = self.log_model(name, Path(q.model.path), q.model.sha256, facts)
        self.set_tags(
            {
                f"deployed_model/{name}": model_id,
                # The hub's compiled file, where there is one, is what runs.
                f"deployed_sha256/{name}": c.artifact_sha256 or q.model.sha256,
                f"parent_model/{name}": parent,
            }
        )

    def log_evaluation(self, evaluation: EvalResult, components: Sequence[str]) -> None:
        """The track's scores (linked to the components' models and the evaluation data), its
        tags, per-sample results and summary."""
        self.log_metrics(evaluation.metrics, models=list(components), dataset="evaluation")
        self.set_tags(evaluation.tags)
        for path in evaluation.artifacts:
            self.log_artifact(path, "results")
        if evaluation.summary:
            text = json.dumps(evaluation.summary, indent=2, default=str)
            self.log_text(text, "results/summary.json")

    def on_job(self, event: JobEvent) -> None:
        """Record a remote job the moment it exists, so a later failure cannot lose it."""
        base = f"aihub/{event.component}/{event.kind}_job"
        tags = {base: event.job_id}
        if event.url:
            tags[f"{base}_url"] = event.url
        if event.status and event.status.startswith("SHARED with "):
            # Sharing is the LPCVC submission step: kept apart from the job's state.
            tags[f"{base}_shared_with"] = event.status.removeprefix("SHARED with ")
        elif event.status:
            tags[f"{base}_status"] = event.status
        if event.kind == "target_model":  # a model, not a job
            tags = {f"aihub/{event.component}/target_model": event.job_id}
        if event.kind == "qairt_version":  # what the compiled model reports it was built with
            self._qairt[event.component] = str(event.status)
            tags = {
                f"aihub/{event.component}/qairt_version": str(event.status),
                "aihub/qairt_version": ", ".join(sorted(set(self._qairt.values()))),
            }
        self.set_tags(tags)
        self._tag_model(event)

    def _tag_model(self, event: JobEvent) -> None:
        """The AI Hub facts of a component's logged model, as they become known."""
        model_id = self.models.get(event.component)
        if model_id is None:
            return
        tags: dict[str, str] = {}
        if event.kind == "compile":
            tags = self._deployment | {"aihub.compile_job": event.job_id}
            if event.url:
                tags["aihub.compile_job_url"] = event.url
            if event.status and event.status.startswith("SHARED with "):
                tags["aihub.shared_with"] = event.status.removeprefix("SHARED with ")
        elif event.kind == "target_model":
            tags = {"aihub.target_model": event.job_id}
        elif event.kind == "qairt_version":
            tags = {"aihub.qairt_version": str(event.status)}
        if tags:
            self.client.set_logged_model_tags(model_id, tags)


@contextmanager
def start_run(
    tracking: TrackingConfig,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[RunRecorder]:
    """Open a run (with MLflow's source and git tags, as ``mlflow.start_run`` gives them, nested
    under ``parent_run_id`` or the sweep's parent); it ends FINISHED, FAILED (with
    ``error.txt``) or KILLED (Ctrl-C or SIGTERM). ``system_metrics`` starts MLflow's own
    sampler (``system/*`` metrics every ``tracking.system_metrics_interval_s``) for the run's
    lifetime. The command line is a tag unless ``tags`` names it already.

    The run is made and ended through the client, never as MLflow's process-wide "active run":
    a sweep on AI Hub keeps one run per config open while their jobs are waited on together,
    and ending one must not end another."""
    from mlflow.tracking.context.registry import resolve_tags

    uri = resolve_uri(str(tracking.uri))
    client: Any = RetryingClient(MlflowClient(tracking_uri=uri))
    exp_id = get_experiment_id(client, experiment, tracking.artifact_root)
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    mlflow.set_tracking_uri(uri)  # for what logs through MLflow's module-level functions
    all_tags = {COMMAND_TAG: command_line()} | dict(tags) | process_tags()
    all_tags = {k: str(v) for k, v in resolve_tags(all_tags).items()}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    created = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    rec = RunRecorder(client, created.info.run_id, uri, exp_id)
    monitor = None
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = getattr(tracking, "system_metrics_interval_s", None) or 10.0
        monitor = SystemMetricsMonitor(
            rec.run_id, sampling_interval=float(interval), tracking_uri=uri
        )
        monitor.start()
    status = "FAILED"
    try:
        yield rec
        status = "FINISHED"
    except KeyboardInterrupt as exc:
        how = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        rec.set_tags({"error": f"interrupted ({how})"})
        status = "KILLED"
        raise
    except BaseException as exc:
        rec.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "error.txt"
            p.write_text("".join(traceback.format_exception(exc)))
            rec.log_artifact(p)
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        client.set_terminated(rec.run_id, status=status)
