"""Submission candidates in MLflow's model registry: ``lpcvlab register RUN_ID [--name NAME]``.

Each component of a FINISHED run (its ONNX logged model) becomes a version of the registered
model ``<name>-<component>`` (``lpcvc-track1-image_encoder``, ``lpcvc-track1-text_encoder``,
``lpcvc-track2-video_classifier``): one registered model per deployable file, so that its versions
compare like with like and an alias such as ``submitted`` points at one file. The version's tags
are what the organisers' submission form asks for: the run's accuracy metrics, the component's
latency and peak memory, precision, device, runtime, the AI Hub compile job and target model, and
whom the compile job was shared with (``hub.share_with``). The run is tagged
``registered/<component>``. Registering a run again returns its existing versions.

A component deployed in another precision than fp32 registers its deployed graph (the run's
``deployed_model/<component>``: the fp16 / quantized ONNX of hub=local, the AI Hub quantize job's
model on hub=aihub), not the fp32 export; the version's ``deployed_sha256`` tag names what runs
(on hub=aihub the compile job's ``.dlc`` / ``.bin``) and ``parent_model`` its fp32 parent. An fp16
component on hub=aihub registers its fp32 export, the ONNX AI Hub compiled in fp16. The version's
description says where its latency was measured (device and profile job, or the host CPU) and
with which weights.

A run logged with ``tracking.log_models=false`` has no logged models: its ONNX files are logged
now from the export cache when they are still there (same sha256), else the command says so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from lpcvlab.errors import LpcvlabError
from lpcvlab.tracking.models import (
    COMPONENT_TAG,
    ONNX_SHA_TAG,
    ModelFacts,
    find_onnx_model,
    log_onnx_model,
)
from lpcvlab.tracking.runstore import RunInfo, get_run
from lpcvlab.tracking.views import ui_link
from lpcvlab.util.hashing import file_sha256

DEFAULT_NAMES = {"retrieval": "lpcvc-track1", "video": "lpcvc-track2"}
# Accuracy metrics of both tracks; those the run has become version tags.
ACCURACY = ("recall_at_10", "recall_at_5", "recall_at_1", "top1", "top5", "clip_top1", "clip_top5")


class RegisterError(LpcvlabError):
    """A run that cannot be registered as it is."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    component: str
    model_id: str
    existed: bool  # the run was registered before: its version is returned, not a new one

    def line(self) -> str:
        how = "already registered as" if self.existed else "registered as"
        return f"{self.component}: {how} {self.name} version {self.version} ({self.model_id})"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_registry_name(name: str, source: str | None = None) -> str:
    """``name`` when it can prefix a registered model's name, else a :class:`RegisterError`
    saying what one looks like: it goes into MLflow's search filters, where a quote would break
    the query (and MLflow itself refuses ``/`` and ``:``)."""
    if _NAME.fullmatch(name) is None:
        raise RegisterError(
            f"{source + ' ' if source else ''}{name!r} cannot name a registered model: expected "
            "letters, digits, '.', '_' and '-', starting with a letter or digit (lpcvc-track1)"
        )
    return name


def registry_name(run: RunInfo, name: str | None = None) -> str:
    """``name``, else the run's ``tracking.registry_name``, else ``lpcvc-track1``/``-track2``."""
    configured = run.params.get("tracking.registry_name")
    if name:
        return check_registry_name(name)
    if configured not in (None, "", "None", "null"):
        return check_registry_name(str(configured), "tracking.registry_name")
    return DEFAULT_NAMES.get(run.tags.get("track", ""), "lpcvc")


def components(run: RunInfo) -> dict[str, str]:
    """Component -> ONNX sha256 of what the run exported (its ``onnx_sha256/<component>``; not
    the ``onnx_sha256/<component>/<precision>`` of a deployed graph)."""
    prefix = f"{ONNX_SHA_TAG}/"
    return {
        k[len(prefix) :]: v
        for k, v in sorted(run.tags.items())
        if k.startswith(prefix) and "/" not in k[len(prefix) :]
    }


def check_registrable(run: RunInfo) -> None:
    """A FINISHED run with exported components, or one line saying what to do."""
    if run.status == "RUNNING":
        raise RegisterError(f"run {run.run_id} is still RUNNING; register it once it has FINISHED")
    if run.status != "FINISHED":
        why = f" ({run.tags['error'].splitlines()[0][:200]})" if run.tags.get("error") else ""
        raise RegisterError(
            f"run {run.run_id} is {run.status}{why}; only a FINISHED run can be registered: "
            "fix what stopped it, run it again and register the new run"
        )
    if not components(run):
        raise RegisterError(
            f"run {run.run_id} has no exported components (no onnx_sha256/<component> tags); "
            "register a run made by `python run.py`"
        )


def version_tags(run: RunInfo, component: str) -> dict[str, str]:
    """What the submission form asks for, from the run's metrics, params and tags."""
    m, t, p = run.metrics, run.tags, run.params
    tags = {
        "run_id": run.run_id,
        "run_name": run.name,
        "component": component,
        "track": t.get("track"),
        "backbone": t.get("backbone"),
        "preprocess": t.get("preprocess"),
        "weights": t.get("weights"),
        # What the component is deployed in (precision=mixed names one per component).
        "precision": t.get(f"precision/{component}") or p.get("precision.name") or "fp32",
        "device": p.get("device.aihub_name") or t.get("device"),
        "runtime": p.get("runtime.target_runtime") or t.get("runtime"),
        "hub": t.get("hub"),
        "measured_on": t.get("measured_on"),
        ONNX_SHA_TAG: t.get(f"{ONNX_SHA_TAG}/{component}"),
        "deployed_sha256": t.get(f"deployed_sha256/{component}"),
        "deployed_artifact": t.get(f"deployed_artifact/{component}"),
        "parent_model": t.get(f"parent_model/{component}"),
        "latency_ms": _number(m.get(f"latency_ms/{component}")),
        "latency_measured_on": latency_measured_on(run, component),
        "aihub.qairt_version": t.get(f"aihub/{component}/qairt_version"),
        "peak_memory_mb": _number(m.get(f"peak_memory_mb/{component}")),
        "latency_ms_total": _number(m.get("latency_ms/total")),
        "aihub.compile_job": t.get(f"aihub/{component}/compile_job"),
        "aihub.compile_job_url": t.get(f"aihub/{component}/compile_job_url"),
        "aihub.target_model": t.get(f"aihub/{component}/target_model"),
        "shared_with": t.get(f"aihub/{component}/compile_job_shared_with"),
    }
    tags |= {k: _number(m.get(k)) for k in ACCURACY}
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}


def _number(value: float | None) -> str | None:
    return None if value is None or math.isnan(value) else f"{value:.6g}"


def latency_measured_on(run: RunInfo, component: str) -> str:
    """Where ``latency_ms/<component>`` was measured: the device and the AI Hub profile job, or
    this machine's CPU (``hub=local`` records the device only as its target)."""
    t, p = run.tags, run.params
    device = p.get("device.aihub_name") or t.get("device", "?")
    runtime = p.get("runtime.target_runtime") or t.get("runtime", "?")
    if t.get("hub") == "aihub":
        job = t.get(f"aihub/{component}/profile_job")
        return f"{device} ({runtime}), AI Hub profile job {job}" if job else f"{device} ({runtime})"
    return f"host CPU, not a device (hub={t.get('hub', '?')}; target {device}, {runtime})"


def _description(run: RunInfo, component: str, tags: dict[str, str]) -> str:
    scores = ", ".join(f"{k} {tags[k]}" for k in ACCURACY if k in tags)
    text = (
        f"{component} of run [{run.name or run.run_id}]({ui_link(run.experiment_id, run.run_id)})"
        f": {scores}; {tags.get('latency_ms', '?')} ms measured on "
        f"{tags['latency_measured_on']}; precision {tags['precision']}; weights "
        f"{tags.get('weights', '?')}"
    )
    if "aihub.compile_job" in tags:
        text += f"; AI Hub compile job {tags['aihub.compile_job']}"
    if "shared_with" in tags:
        text += f", shared with {tags['shared_with']}"
    return text


def deployed_models(run: RunInfo) -> dict[str, str]:
    """Component -> logged model of the graph deployed in place of the fp32 export (the run's
    ``deployed_model/<component>``; none for an fp32 component)."""
    prefix = "deployed_model/"
    return {k[len(prefix) :]: v for k, v in run.tags.items() if k.startswith(prefix) and v}


def run_models(client: Any, run: RunInfo) -> dict[str, str]:
    """Component -> logged model ID of the models the run output, matched by sha256."""
    wanted = {sha: comp for comp, sha in components(run).items()}
    outputs = client.get_run(run.run_id).outputs
    found: dict[str, str] = {}
    for out in getattr(outputs, "model_outputs", None) or []:
        model = client.get_logged_model(out.model_id)
        comp = wanted.get((model.tags or {}).get(ONNX_SHA_TAG, ""))
        if comp is not None and (model.tags or {}).get(COMPONENT_TAG, comp) == comp:
            found[comp] = model.model_id
    return found


def _model_for(client: Any, run: RunInfo, component: str, sha256: str) -> str:
    """The logged model of a component the run did not log: one logged by another run with the
    same file, linked, else the export cache's file, logged now."""
    existing = find_onnx_model(client, run.experiment_id, sha256)
    if existing is not None:
        client.log_outputs(run.run_id, [_output(existing.model_id)])
        return existing.model_id
    cache = Path(run.params.get("paths.cache_dir", ".cache/lpcvlab"))
    path = cache / "onnx" / f"{component}-{sha256[:16]}.onnx"
    if not path.is_file() or file_sha256(path) != sha256:
        raise RegisterError(
            f"run {run.run_id} has no logged model for {component} (it ran with "
            f"tracking.log_models=false) and its ONNX file {path} is gone; run it again with "
            "tracking.log_models=true and register the new run"
        )
    facts = ModelFacts(tags={"track": run.tags.get("track", "")})
    model_id, _ = log_onnx_model(
        client, run.run_id, run.experiment_id, component, path, sha256, facts
    )
    return model_id


def _output(model_id: str) -> Any:
    from mlflow.entities import LoggedModelOutput

    return LoggedModelOutput(model_id, step=0)


def register_run(client: Any, run_id: str, name: str | None = None) -> list[RegisteredVersion]:
    """Register each component of a FINISHED run as a version of ``<name>-<component>``."""
    import mlflow

    # MLflow's registry store resolves a ``models:/<id>`` source with a client of the global
    # tracking URI, not of the one it was handed: point it at this store.
    mlflow.set_tracking_uri(str(client.tracking_uri))
    run = get_run(client, run_id)
    check_registrable(run)
    base = registry_name(run, name)
    models = run_models(client, run) | deployed_models(run)
    out = []
    for component, sha256 in components(run).items():
        model_id = models.get(component) or _model_for(client, run, component, sha256)
        reg = f"{base}-{component}"
        _ensure_registered_model(client, reg, run, component)
        done = client.search_model_versions(f"name = '{reg}' and run_id = '{run.run_id}'")
        if done:
            version = max(done, key=lambda v: int(v.version))
            link_version(client, model_id, reg, str(version.version))  # one registered before
            out.append(RegisteredVersion(reg, str(version.version), component, model_id, True))
            continue
        tags = version_tags(run, component)
        version = client.create_model_version(
            reg,
            source=f"models:/{model_id}",
            run_id=run.run_id,
            tags=tags,
            description=_description(run, component, tags),
            model_id=model_id,
        )
        link_version(client, model_id, reg, str(version.version))
        out.append(RegisteredVersion(reg, str(version.version), component, model_id, False))
    client.log_batch(run.run_id, tags=_run_tags(out))
    return out


def link_version(client: Any, model_id: str, name: str, version: str) -> None:
    """Link the logged model to its registered version, as ``mlflow.register_model`` does: the
    model's ``mlflow.modelVersions`` tag (a JSON list of name and version) is what its page and
    the run's "Registered" column read. (The version links the model by its source,
    ``models:/<model ID>``.)

    ``mlflow.register_model("models:/<id>")`` would take the version's run from the model's
    source run: a file shared by several runs (one text encoder, two sweep children) would then
    give every run's version the first run's ID, so the version is made by ``create_model_version``
    with this run's ID, and the link added here."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model = client.get_logged_model(model_id)
    linked = json.loads((model.tags or {}).get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": version}
    if entry in linked:
        return
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def _run_tags(versions: list[RegisteredVersion]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(f"registered/{v.component}", f"{v.name} v{v.version}") for v in versions]


def _ensure_registered_model(client: Any, name: str, run: RunInfo, component: str) -> None:
    try:
        client.create_registered_model(
            name,
            tags={"component": component, "track": run.tags.get("track", "")},
            description=(
                f"LPCVC submission candidates: the {component} of track={run.tags.get('track')} "
                "runs, one version per registered run (lpcvlab register)."
            ),
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
