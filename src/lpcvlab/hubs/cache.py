"""The stage cache: the one memo layer, reusing export, quantize, compile, profile and inference
results.

Every record is keyed by a content hash of everything that determines it, never by a config
name, so a hit is the same result the stage would compute again:

- export: the component's weights (a hash of its ``state_dict``), its module structure and the
  code/versions of the classes in it, the input spec, opset, ``export.rewrites`` and their code,
  exporter code and torch/onnx versions, and the parity samples (the record carries the parity
  cosine).
- quantize (a non-fp32 component): the ONNX file's sha256, the precision, the calibration data's
  hash, the emulation code and ONNX Runtime's version.
- compile / profile: the ONNX file's sha256, the component's precision (and calibration hash),
  the resolved ``hub``, ``device`` and ``runtime`` configs (secrets dropped), the runtime's code
  and client versions and, for ``hub=local``, the host (a latency is a property of the machine
  that measured it).
- inference: the compile/profile key plus a hash of the input tensors (streamed from disk for
  inputs that live there, the same digest as the stacked array's).

Hashing weights needs the model built, which is cheap next to exporting, profiling and running
it; a key from config names alone would silently go stale after fine-tuning or a code change.
Records are JSON files under ``cache.dir`` (each result record serialises itself:
``to_record``/``from_record`` in :mod:`lpcvlab.types`); inference outputs sit beside them as
``.npy``. Each record names the MLflow run that produced it, and a run that reuses it is tagged
``cache/<component>/<stage>_from=<run_id>``.

:class:`CachedHub` wraps any hub and implements the same protocol: it asks the hub it wraps only
for the stages it does not hold, so the order in which stages run is the wrapped hub's alone.
A hub that keeps its own record of paid remote jobs (``records_jobs``: the AI Hub job ledger)
is passed through untouched: for remote jobs the ledger is the one store that answers "was this
already paid for?" (it also knows jobs still in flight), and the stage cache keeps local work.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpcvlab.config.schema import CacheConfig
from lpcvlab.deploy.export import parity_message
from lpcvlab.deploy.precision import ComponentPrecision
from lpcvlab.errors import ParityError
from lpcvlab.hubs.base import (
    COMPILE,
    INFERENCE,
    PROFILE,
    QUANTIZE,
    CompiledCheck,
    ComponentJob,
    Done,
    GraphCheck,
    Hub,
    InFlight,
    JobListener,
)
from lpcvlab.types import (
    CompileResult,
    Component,
    ComponentRun,
    ExportResult,
    InferenceResult,
    JobEvent,
    ProfileResult,
    QuantizeResult,
)
from lpcvlab.util.hashing import array_sha256, state_dict_digest
from lpcvlab.util.io import atomic_save_npy, atomic_write_text, load_cached_npy
from lpcvlab.util.secrets import is_secret_key

log = logging.getLogger(__name__)

# Bump when the meaning of a record changes: older records then simply stop matching.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class CacheHit:
    """One stage of one component that was reused instead of computed."""

    component: str
    stage: str
    key: str
    run_id: str


@dataclass(frozen=True)
class StageRecord:
    """A stored stage result: what produced it (``run_id``) and the result itself (``data``)."""

    stage: str
    key: str
    component: str
    run_id: str
    created: str
    data: dict[str, Any]


# ----------------------------------------------------------------------------- hashing


def _sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def source_digest(module_name: str) -> str:
    """sha256 of a module's source file, found without importing it ("absent" if none)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return "absent"
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


@functools.cache
def package_version(name: str) -> str:
    mod = sys.modules.get(name)
    version = getattr(mod, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def module_code_identity(module: Any) -> dict[str, str]:
    """Which code runs in ``module``: source hashes of lpcvlab classes, versions of the rest."""
    out: dict[str, str] = {}
    for sub in module.modules():
        mod_name = type(sub).__module__
        top = mod_name.split(".")[0]
        if top == "lpcvlab":
            out[mod_name] = source_digest(mod_name)
        else:
            out[top] = package_version(top)
    return out


def export_key(
    component: Component, samples: np.ndarray, opset: int, rewrites: Sequence[str] = ()
) -> str:
    """Everything that determines an ONNX file and its parity against PyTorch."""
    module = component.module
    return _sha256_json(
        {
            "format": CACHE_FORMAT,
            "stage": "export",
            "component": component.name,
            "input": component.input.to_record(),
            "output_name": component.output_name,
            "opset": opset,
            "weights": state_dict_digest(module),
            "structure": hashlib.sha256(repr(module).encode()).hexdigest(),
            "code": module_code_identity(module),
            "exporter": source_digest("lpcvlab.deploy.export"),
            "rewrites": [*rewrites, source_digest("lpcvlab.deploy.rewrites")] if rewrites else [],
            "versions": {
                p: package_version(p) for p in ("torch", "onnx", "onnxscript", "onnxruntime")
            },
            "parity_samples": array_sha256(samples),
        }
    )


def runtime_key(
    onnx_sha256: str,
    identity: dict[str, Any],
    hub_module: str,
    precision: ComponentPrecision | None = None,
) -> str:
    """Everything that determines a compiled model and its profile (shared by both stages):
    the ONNX file, the precision it is deployed in (and its calibration data), the hub's
    identity (settings, target, versions, host; secrets dropped) and the code of the hub that
    runs it."""
    modules = [hub_module, "lpcvlab.hubs.base", "lpcvlab.hubs.profile"]
    key: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "stage": "runtime",
        "onnx_sha256": onnx_sha256,
        "hub": _without_secrets(identity),
    }
    if precision is not None and precision.name != "fp32":
        key["precision"] = precision.key()
        modules.append(EMULATION_MODULE)
    key["code"] = {m: source_digest(m) for m in modules}
    return _sha256_json(key)


EMULATION_MODULE = "lpcvlab.deploy.precision.emulate"


def quantize_key(onnx_sha256: str, precision: ComponentPrecision, hub_module: str) -> str:
    """Everything that determines a quantized (or fp16) model made on this machine."""
    return _sha256_json(
        {
            "format": CACHE_FORMAT,
            "stage": "quantize",
            "onnx_sha256": onnx_sha256,
            "precision": precision.key(),
            "code": {m: source_digest(m) for m in (hub_module, EMULATION_MODULE)},
            "versions": {p: package_version(p) for p in ("onnx", "onnxruntime")},
        }
    )


def _without_secrets(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_secrets(v) for k, v in node.items() if not is_secret_key(str(k))}
    if isinstance(node, list | tuple):
        return [_without_secrets(v) for v in node]
    return node


def inputs_sha256(inputs: Any) -> str:
    """``array_sha256`` of a job's inputs; inputs read lazily from disk (Track 2's
    :class:`~lpcvlab.data.clips.CachedClips`) hash themselves batch by batch to the same
    digest, without being held in memory whole."""
    content = getattr(inputs, "content_sha256", None)
    return content() if callable(content) else array_sha256(inputs)


def inference_key(runtime_key_: str, inputs: np.ndarray) -> str:
    return _sha256_json(
        {"format": CACHE_FORMAT, "runtime": runtime_key_, "inputs": inputs_sha256(inputs)}
    )


# ----------------------------------------------------------------------------- store


class RecordStore:
    """JSON records under ``root/<stage>/<key>.json``, written atomically (parallel jobs)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: str, suffix: str = ".json") -> Path:
        return self.root / stage / f"{key}{suffix}"

    def get(self, stage: str, key: str) -> StageRecord | None:
        path = self.path(stage, key)
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return StageRecord(**raw)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable cache record %s (%s)", path, exc)
            return None

    def put(self, record: StageRecord) -> Path:
        path = self.path(record.stage, record.key)
        return atomic_write_text(path, json.dumps(asdict(record), indent=1, default=str))

    def put_array(self, stage: str, key: str, array: np.ndarray) -> Path:
        return atomic_save_npy(self.path(stage, key, ".npy"), array)

    def get_array(self, stage: str, key: str) -> np.ndarray | None:
        path = self.path(stage, key, ".npy")
        if not path.is_file():
            return None
        arr = load_cached_npy(path)
        if arr is None:
            log.warning("ignoring unreadable cached outputs %s", path)
        return arr


# ----------------------------------------------------------------------------- the cache


@dataclass
class StageCache:
    """One run's view of the store: what it reused, the keys it used, where records go.

    A disabled cache (``store`` None) computes everything and stores nothing. ``reuse`` names the
    stages that may be read from the store; results are stored whenever the cache is enabled, so
    dropping ``profile`` from ``cache.stages`` re-measures and refreshes it.
    """

    store: RecordStore | None
    run_id: str
    reuse: frozenset[str] = frozenset(CacheConfig().stages)
    job_listener: JobListener | None = None
    hits: list[CacheHit] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # "<component>/<stage>" -> key

    @classmethod
    def from_settings(
        cls, settings: CacheConfig, run_id: str, job_listener: JobListener | None = None
    ) -> StageCache:
        if not settings.enabled:
            return cls(None, run_id, frozenset(), job_listener)
        return cls(
            RecordStore(Path(settings.dir)), run_id, frozenset(settings.stages), job_listener
        )

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def export(
        self,
        component: Component,
        samples: np.ndarray,
        opset: int,
        parity_threshold: float,
        compute: Callable[[], ExportResult],
        rewrites: Sequence[str] = (),
    ) -> ExportResult:
        """The cached export of ``component`` when its key matches and the file is still there,
        else ``compute()`` (which exports and checks parity), stored for the next run."""
        if self.store is None:
            return compute()
        key = export_key(component, samples, opset, rewrites)
        self.keys[f"{component.name}/export"] = key
        rec = self.store.get("export", key) if "export" in self.reuse else None
        cached = ExportResult.from_record(component.name, rec.data) if rec is not None else None
        if rec is not None and cached is None:
            log.info("cache: export record %s points at a missing or changed file", key[:12])
        if cached is not None and rec is not None:
            self._hit(component.name, "export", rec)
            if not cached.parity_cosine_min >= parity_threshold:
                raise ParityError(parity_message(cached, parity_threshold, rec.run_id))
            return cached
        result = compute()
        self.put("export", key, component.name, result.to_record())
        return result

    def wrap(self, hub: Hub) -> Hub:
        """``hub`` behind this cache; a hub that records its own paid jobs is left as it is."""
        if self.store is None or hub.records_jobs:
            return hub
        return CachedHub(hub, self)

    def tags(self) -> dict[str, str]:
        """``cache/<component>/<stage>_from`` for each reused stage, and every key used."""
        tags = {f"cache/{h.component}/{h.stage}_from": h.run_id for h in self.hits}
        tags |= {f"cache/{k}_key": v[:16] for k, v in self.keys.items()}
        if self.enabled:
            tags["cache/hits"] = str(len(self.hits))
        return tags

    def put(self, stage: str, key: str, component: str, data: dict[str, Any]) -> None:
        assert self.store is not None
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.store.put(StageRecord(stage, key, component, self.run_id, created, data))

    def get(self, stage: str, key: str) -> StageRecord | None:
        if self.store is None or stage not in self.reuse:
            return None
        return self.store.get(stage, key)

    def _hit(self, component: str, stage: str, rec: StageRecord) -> None:
        self.hits.append(CacheHit(component, stage, rec.key, rec.run_id))
        log.info(
            "cache: reusing %s of %s from run %s (key %s)",
            stage,
            component,
            rec.run_id,
            rec.key[:12],
        )
        job_id = rec.data.get("job_id")
        if job_id and self.job_listener is not None:
            self.job_listener(
                JobEvent(component, stage, str(job_id), rec.data.get("job_url"), "CACHED")
            )


@dataclass(eq=False)
class _Plan:
    """What the store already holds for one component before the hub is asked for anything."""

    job: ComponentJob
    runtime_key: str
    inference_key: str
    quantize_key: str | None = None  # a non-fp32 component's
    quantize: StageRecord | None = None
    quantized: QuantizeResult | None = None
    compile: StageRecord | None = None
    profile: StageRecord | None = None
    inference: StageRecord | None = None
    outputs: np.ndarray | None = None

    def wanted_missing(self) -> bool:
        """A stage the job asks for has no usable record."""
        stages = self.job.stages
        return (PROFILE in stages and self.profile is None) or (
            INFERENCE in stages and self.outputs is None
        )

    @property
    def missing(self) -> frozenset[str]:
        """Stages the hub must run (compiling is implied by the others)."""
        need = set()
        if PROFILE in self.job.stages and self.profile is None:
            need.add(PROFILE)
        if INFERENCE in self.job.stages and self.outputs is None:
            need.add(INFERENCE)
        if self.compile is None:
            need.add(COMPILE)
        return frozenset(need)


class CachedHub:
    """A hub behind the stage cache: the same protocol, asking the wrapped hub only for what the
    store does not hold (nothing at all when every stage of every component is cached)."""

    records_jobs = False

    def __init__(self, inner: Hub, cache: StageCache) -> None:
        self.inner = inner
        self.cache = cache
        self.name = inner.name

    @property
    def job_listener(self) -> JobListener | None:
        return self.inner.job_listener

    @job_listener.setter
    def job_listener(self, listener: JobListener | None) -> None:
        self.inner.job_listener = listener

    @property
    def graph_check(self) -> GraphCheck | None:
        return self.inner.graph_check

    @graph_check.setter
    def graph_check(self, check: GraphCheck | None) -> None:
        self.inner.graph_check = check

    @property
    def compiled_check(self) -> CompiledCheck | None:
        return self.inner.compiled_check

    @compiled_check.setter
    def compiled_check(self, check: CompiledCheck | None) -> None:
        self.inner.compiled_check = check

    def preflight(self) -> None:
        self.inner.preflight()

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def start_components(self, jobs: list[ComponentJob]) -> InFlight:
        """The cache wraps hubs that compute here (a hub with remote jobs keeps its own record
        and is not wrapped): done when it returns."""
        return Done(self.run_components(jobs))

    def run_components(self, jobs: list[ComponentJob]) -> dict[str, ComponentRun]:
        plans = [self._plan(job) for job in jobs]
        todo = [p for p in plans if p.missing]
        for p in todo:
            if p.quantized is not None:  # the hub compiles the stored model instead
                self._reuse_quantize(p)
        fresh = (
            self.inner.run_components(
                [
                    ComponentJob(
                        p.job.exported,
                        p.job.inputs,
                        p.missing | {COMPILE},
                        p.job.precision,
                        p.quantized,
                    )
                    for p in todo
                ]
            )
            if todo
            else {}
        )
        runs: dict[str, ComponentRun] = {}
        for p in plans:
            name = p.job.component
            got = fresh.get(name)
            if got is not None:
                self._store(p, got)
            if got is not None:
                compiled, quantized = got.compiled, got.quantized
            else:
                compiled = self._reuse_compile(p)
                quantized = self._reuse_quantize(p) if p.quantized is not None else None
            profile = got.profile if got is not None and got.profile is not None else None
            inference = got.inference if got is not None and got.inference is not None else None
            if profile is None and PROFILE in p.job.stages:
                profile = self._reuse_profile(p)
            if inference is None and INFERENCE in p.job.stages:
                inference = self._reuse_inference(p)
            runs[name] = ComponentRun(compiled, profile, inference, quantized)
        return runs

    # -- internals --------------------------------------------------------------------

    def _plan(self, job: ComponentJob) -> _Plan:
        name = job.component
        module = type(self.inner).__module__
        rkey = runtime_key(job.exported.sha256, self.inner.identity(), module, job.precision)
        ikey = inference_key(rkey, job.inputs)
        self.cache.keys |= {
            f"{name}/compile": rkey,
            f"{name}/profile": rkey,
            f"{name}/inference": ikey,
        }
        plan = _Plan(job, rkey, ikey)
        if job.precision.name != "fp32":
            plan.quantize_key = quantize_key(job.exported.sha256, job.precision, module)
            self.cache.keys[f"{name}/quantize"] = plan.quantize_key
            plan.quantize = self.cache.get("quantize", plan.quantize_key)
            if plan.quantize is not None:
                plan.quantized = QuantizeResult.from_record(name, plan.quantize.data)
        plan.compile = self.cache.get("compile", rkey)
        plan.profile = self.cache.get("profile", rkey)
        rec = self.cache.get("inference", ikey)
        if rec is not None and self.cache.store is not None:
            outputs = self.cache.store.get_array("inference", ikey)
            if outputs is not None and len(outputs) == len(job.inputs):
                plan.inference, plan.outputs = rec, outputs
        if plan.wanted_missing() or (plan.quantize_key and plan.quantized is None):
            plan.compile = None  # the hub compiles (and quantizes) again to run what is missing
        return plan

    def _reuse_quantize(self, p: _Plan) -> QuantizeResult | None:
        assert p.quantize is not None
        self.cache._hit(p.job.component, "quantize", p.quantize)
        return p.quantized

    def _reuse_compile(self, p: _Plan) -> CompileResult:
        assert p.compile is not None
        self.cache._hit(p.job.component, "compile", p.compile)
        exported = p.quantized.model if p.quantized and p.quantized.model else p.job.exported
        return CompileResult.from_record(exported, p.compile.data)

    def _reuse_profile(self, p: _Plan) -> ProfileResult:
        assert p.profile is not None
        self.cache._hit(p.job.component, "profile", p.profile)
        return ProfileResult.from_record(p.job.component, p.profile.data)

    def _reuse_inference(self, p: _Plan) -> InferenceResult:
        assert p.inference is not None and p.outputs is not None
        self.cache._hit(p.job.component, "inference", p.inference)
        return InferenceResult.from_record(p.job.component, p.inference.data, p.outputs)

    def _store(self, p: _Plan, run: ComponentRun) -> None:
        name = p.job.component
        if run.quantized is not None and run.quantized is not p.quantized and p.quantize_key:
            self.cache.put(QUANTIZE, p.quantize_key, name, run.quantized.to_record())
        self.cache.put("compile", p.runtime_key, name, run.compiled.to_record())
        if run.profile is not None:
            self.cache.put("profile", p.runtime_key, name, run.profile.to_record())
        if run.inference is not None:
            assert self.cache.store is not None
            outputs = np.asarray(run.inference.outputs)
            self.cache.store.put_array("inference", p.inference_key, outputs)
            self.cache.put("inference", p.inference_key, name, run.inference.to_record())
