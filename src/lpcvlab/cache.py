"""Stage cache: reuse export, compile, profile and inference results across runs.

Every record is keyed by a content hash of everything that determines it, never by a config
name, so a hit is the same result the stage would compute again:

- export: the component's weights (a hash of its ``state_dict``), its module structure and the
  code/versions of the classes in it, the input spec, opset, exporter code and torch/onnx
  versions, and the parity samples (the record carries the parity cosine).
- compile / profile: the ONNX file's sha256, the resolved ``hub``, ``device`` and ``runtime``
  configs (secrets dropped), the runtime's code and client versions and, for ``hub=local``,
  the host (a latency is a property of the machine that measured it).
- inference: the compile/profile key plus a hash of the input tensors.

Hashing weights needs the model built, which is cheap next to exporting, profiling and running
it; a key from config names alone would silently go stale after fine-tuning or a code change.
Records are JSON files under ``cache.dir``; inference outputs sit beside them as ``.npy``. Each
record names the MLflow run that produced it, and a run that reuses it is tagged
``cache/<component>/<stage>_from=<run_id>``.
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
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpcvlab.errors import ConfigError, ParityError
from lpcvlab.hashing import array_sha256
from lpcvlab.runtimes.base import ComponentJob, JobListener, Runtime
from lpcvlab.types import (
    CompileResult,
    Component,
    ComponentRun,
    ExportResult,
    InferenceResult,
    JobEvent,
    ProfileResult,
    TensorSpec,
)

log = logging.getLogger(__name__)

STAGES = ("export", "compile", "profile", "inference")
# Bump when the meaning of a record changes: older records then simply stop matching.
CACHE_FORMAT = 1


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


def state_dict_digest(module: Any) -> str:
    """sha256 of every parameter and buffer: names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


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


def export_key(component: Component, samples: np.ndarray, opset: int) -> str:
    """Everything that determines an ONNX file and its parity against PyTorch."""
    module = component.module
    return _sha256_json(
        {
            "format": CACHE_FORMAT,
            "stage": "export",
            "component": component.name,
            "input": [component.input.name, list(component.input.shape), component.input.dtype],
            "output_name": component.output_name,
            "opset": opset,
            "weights": state_dict_digest(module),
            "structure": hashlib.sha256(repr(module).encode()).hexdigest(),
            "code": module_code_identity(module),
            "exporter": source_digest("lpcvlab.export"),
            "versions": {
                p: package_version(p) for p in ("torch", "onnx", "onnxscript", "onnxruntime")
            },
            "parity_samples": array_sha256(samples),
        }
    )


_RUNTIME_PACKAGES = {"local": ("onnxruntime", "onnx"), "aihub": ("qai-hub",)}


def _plain_config(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from lpcvlab.tracking import is_secret_key

    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: _plain_config(v) for k, v in node.items() if not is_secret_key(str(k))}
    if isinstance(node, list | tuple):
        return [_plain_config(v) for v in node]
    return node


def runtime_key(onnx_sha256: str, cfg: Any) -> str:
    """Everything that determines a compiled model and its profile (shared by both stages)."""
    hub = str(cfg.hub.name)
    identity: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "stage": "runtime",
        "onnx_sha256": onnx_sha256,
        "hub": _plain_config(cfg.hub),
        "device": _plain_config(cfg.device),
        "runtime": _plain_config(cfg.runtime),
        "code": {
            m: source_digest(m)
            for m in (f"lpcvlab.runtimes.{hub}", "lpcvlab.runtimes.base", "lpcvlab.profile")
        },
        "versions": {p: package_version(p) for p in _RUNTIME_PACKAGES.get(hub, ())},
    }
    if hub == "local":  # measured on this machine: another host's latency is not this one's
        identity["host"] = [
            platform.node(),
            platform.machine(),
            platform.processor(),
            os.cpu_count(),
        ]
    return _sha256_json(identity)


def inference_key(runtime_key_: str, inputs: np.ndarray) -> str:
    return _sha256_json(
        {"format": CACHE_FORMAT, "runtime": runtime_key_, "inputs": array_sha256(inputs)}
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
        _atomic_write(
            path, lambda p: p.write_text(json.dumps(record.__dict__, indent=1, default=str))
        )
        return path

    def put_array(self, stage: str, key: str, array: np.ndarray) -> Path:
        path = self.path(stage, key, ".npy")

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
                np.save(f, array, allow_pickle=False)

        _atomic_write(path, write)
        return path

    def get_array(self, stage: str, key: str) -> np.ndarray | None:
        path = self.path(stage, key, ".npy")
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable cached outputs %s (%s)", path, exc)
            return None


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the cache


@dataclass(eq=False)
class _Plan:
    """What is already known for one component before the runtime is asked for anything."""

    job: ComponentJob
    runtime_key: str
    inference_key: str
    compile: StageRecord | None = None
    profile: StageRecord | None = None
    inference: StageRecord | None = None
    outputs: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.job.exported.component


@dataclass
class StageCache:
    """Reuses stage results for one run; a disabled cache computes everything and stores nothing.

    ``reuse`` names the stages that may be read from the cache; results are stored whenever the
    cache is enabled, so dropping ``profile`` from ``cache.stages`` re-measures and refreshes it.
    """

    store: RecordStore | None
    run_id: str
    reuse: frozenset[str] = frozenset(STAGES)
    job_listener: JobListener | None = None
    hits: list[CacheHit] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # "<component>/<stage>" -> key

    @classmethod
    def from_config(
        cls, cfg: Any, run_id: str, job_listener: JobListener | None = None
    ) -> StageCache:
        """Reads ``cache.enabled``, ``cache.dir`` and ``cache.stages`` (absent = disabled)."""
        section = cfg.get("cache")
        if section is None or not section.get("enabled", False):
            return cls(None, run_id, frozenset(), job_listener)
        stages = [str(s) for s in section.get("stages") or []]
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ConfigError(
                f"cache.stages has unknown stage(s) {unknown}; choose from {list(STAGES)}"
            )
        if not section.get("dir"):
            raise ConfigError("cache.enabled=true needs cache.dir (where stage records are kept)")
        return cls(RecordStore(Path(str(section.dir))), run_id, frozenset(stages), job_listener)

    @property
    def enabled(self) -> bool:
        return self.store is not None

    # -- export ----------------------------------------------------------------------

    def export(
        self,
        component: Component,
        samples: np.ndarray,
        opset: int,
        parity_threshold: float,
        compute: Callable[[], ExportResult],
    ) -> ExportResult:
        """The cached export of ``component`` when its key matches and the file is still there,
        else ``compute()`` (which exports and checks parity), stored for the next run."""
        if self.store is None:
            return compute()
        key = export_key(component, samples, opset)
        self.keys[f"{component.name}/export"] = key
        rec = self.store.get("export", key) if "export" in self.reuse else None
        cached = _export_from_record(rec) if rec is not None else None
        if cached is not None and rec is not None:
            self._hit(component.name, "export", rec)
            if not cached.parity_cosine_min >= parity_threshold:
                raise ParityError(
                    f"{component.name}: ONNX output disagrees with PyTorch (min cosine "
                    f"{cached.parity_cosine_min:.6f} over {cached.parity_samples} real inputs, "
                    f"threshold {parity_threshold}; measured by run {rec.run_id}); the exported "
                    f"file is {cached.path}. Check for ops the exporter mistranslates, or lower "
                    "export.parity_threshold."
                )
            return cached
        result = compute()
        self._put(
            "export",
            key,
            component.name,
            {
                "path": str(Path(result.path).resolve()),
                "size": Path(result.path).stat().st_size,
                "sha256": result.sha256,
                "input": [result.input.name, list(result.input.shape), result.input.dtype],
                "output_name": result.output_name,
                "parity_cosine_min": result.parity_cosine_min,
                "parity_samples": result.parity_samples,
                "seconds": result.seconds,
            },
        )
        return result

    # -- compile, profile, inference --------------------------------------------------

    def run_components(
        self, cfg: Any, jobs: list[ComponentJob], make_runtime: Callable[[], Runtime]
    ) -> dict[str, ComponentRun]:
        """Reuse what is cached per component and stage; run the rest on the runtime.

        The runtime is asked for only when something has to run (a fully cached ``hub=aihub``
        run makes no network request). Components that need all three stages go through
        ``run_components`` together, so a remote runtime can submit them at once.
        """
        if self.store is None:
            return make_runtime().run_components(jobs)
        plans = [self._plan(cfg, job) for job in jobs]
        runs: dict[str, ComponentRun] = {}
        full = [p for p in plans if p.profile is None and p.outputs is None]
        partial = [p for p in plans if p not in full and not _complete(p)]  # eq=False: identity
        runtime = make_runtime() if full or partial else None
        if full:
            assert runtime is not None
            fresh = runtime.run_components([p.job for p in full])
            for p in full:
                runs[p.name] = fresh[p.name]
                self._store_run(p, fresh[p.name], compiled=True, profiled=True, inferred=True)
        for p in partial:
            assert runtime is not None
            compiled = runtime.compile(p.job.exported)
            profile = runtime.profile(compiled) if p.profile is None else None
            inference = runtime.infer(compiled, p.job.inputs) if p.outputs is None else None
            run = ComponentRun(
                compiled,
                profile if profile is not None else self._reuse_profile(p),
                inference if inference is not None else self._reuse_inference(p),
            )
            runs[p.name] = run
            self._store_run(
                p, run, compiled=True, profiled=profile is not None, inferred=inference is not None
            )
        for p in plans:
            if _complete(p):
                runs[p.name] = ComponentRun(
                    self._reuse_compile(p), self._reuse_profile(p), self._reuse_inference(p)
                )
        return {job.exported.component: runs[job.exported.component] for job in jobs}

    def tags(self) -> dict[str, str]:
        """``cache/<component>/<stage>_from`` for each reused stage, and every key used."""
        tags = {f"cache/{h.component}/{h.stage}_from": h.run_id for h in self.hits}
        tags |= {f"cache/{k}_key": v[:16] for k, v in self.keys.items()}
        if self.enabled:
            tags["cache/hits"] = str(len(self.hits))
        return tags

    # -- internals --------------------------------------------------------------------

    def _plan(self, cfg: Any, job: ComponentJob) -> _Plan:
        assert self.store is not None
        name = job.exported.component
        rkey = runtime_key(job.exported.sha256, cfg)
        ikey = inference_key(rkey, job.inputs)
        self.keys |= {f"{name}/compile": rkey, f"{name}/profile": rkey, f"{name}/inference": ikey}
        plan = _Plan(job, rkey, ikey)
        if "compile" in self.reuse:
            plan.compile = self.store.get("compile", rkey)
        if "profile" in self.reuse:
            plan.profile = self.store.get("profile", rkey)
        if "inference" in self.reuse:
            rec = self.store.get("inference", ikey)
            outputs = self.store.get_array("inference", ikey) if rec is not None else None
            if rec is not None and outputs is not None and len(outputs) == len(job.inputs):
                plan.inference, plan.outputs = rec, outputs
        return plan

    def _reuse_compile(self, p: _Plan) -> CompileResult:
        assert p.compile is not None
        d = p.compile.data
        self._hit(p.name, "compile", p.compile)
        return CompileResult(
            component=p.name,
            runtime=str(d["runtime"]),
            device=str(d["device"]),
            handle=None,  # nothing to run: every stage that needs the handle is cached too
            exported=p.job.exported,
            job_id=d.get("job_id"),
            job_url=d.get("job_url"),
        )

    def _reuse_profile(self, p: _Plan) -> ProfileResult:
        assert p.profile is not None
        d = p.profile.data
        self._hit(p.name, "profile", p.profile)
        low, high = d["peak_memory_mb"]
        return ProfileResult(
            component=p.name,
            latency_ms=float(d["latency_ms"]),
            peak_memory_mb=(float(low), float(high)),
            compute_units={str(k): int(v) for k, v in d["compute_units"].items()},
            raw=d["raw"],
            job_id=d.get("job_id"),
            job_url=d.get("job_url"),
        )

    def _reuse_inference(self, p: _Plan) -> InferenceResult:
        assert p.inference is not None and p.outputs is not None
        d = p.inference.data
        self._hit(p.name, "inference", p.inference)
        return InferenceResult(
            component=p.name,
            outputs=p.outputs,
            seconds=float(d["seconds"]),
            job_id=d.get("job_id"),
            job_url=d.get("job_url"),
            metrics={str(k): float(v) for k, v in d.get("metrics", {}).items()},
        )

    def _store_run(
        self, p: _Plan, run: ComponentRun, *, compiled: bool, profiled: bool, inferred: bool
    ) -> None:
        c, prof, inf = run.compiled, run.profile, run.inference
        if compiled:
            self._put(
                "compile",
                p.runtime_key,
                p.name,
                {
                    "runtime": c.runtime,
                    "device": c.device,
                    "job_id": c.job_id,
                    "job_url": c.job_url,
                },
            )
        if profiled:
            self._put(
                "profile",
                p.runtime_key,
                p.name,
                {
                    "latency_ms": prof.latency_ms,
                    "peak_memory_mb": list(prof.peak_memory_mb),
                    "compute_units": prof.compute_units,
                    "raw": prof.raw,
                    "job_id": prof.job_id,
                    "job_url": prof.job_url,
                },
            )
        if inferred:
            assert self.store is not None
            outputs = np.asarray(inf.outputs)
            self.store.put_array("inference", p.inference_key, outputs)
            self._put(
                "inference",
                p.inference_key,
                p.name,
                {
                    "seconds": inf.seconds,
                    "metrics": inf.metrics,
                    "shape": list(outputs.shape),
                    "dtype": str(outputs.dtype),
                    "job_id": inf.job_id,
                    "job_url": inf.job_url,
                },
            )

    def _put(self, stage: str, key: str, component: str, data: dict[str, Any]) -> None:
        assert self.store is not None
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.store.put(StageRecord(stage, key, component, self.run_id, created, data))

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


def _complete(p: _Plan) -> bool:
    return p.compile is not None and p.profile is not None and p.outputs is not None


def _export_from_record(rec: StageRecord) -> ExportResult | None:
    """The record as an ExportResult, or None when its ONNX file is gone or was replaced."""
    d = rec.data
    path = Path(d["path"])
    if not path.is_file() or path.stat().st_size != int(d["size"]):
        log.info("cache: export record %s points at a missing or changed %s", rec.key[:12], path)
        return None
    name, shape, dtype = d["input"]
    return ExportResult(
        component=rec.component,
        path=path,
        sha256=str(d["sha256"]),
        input=TensorSpec(str(name), tuple(int(s) for s in shape), str(dtype)),
        output_name=str(d["output_name"]),
        parity_cosine_min=float(d["parity_cosine_min"]),
        parity_samples=int(d["parity_samples"]),
        seconds=float(d["seconds"]),
    )
