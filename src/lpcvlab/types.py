"""The small result records that flow from one stage to the next.

data -> model -> (train) -> export -> compile -> profile -> infer -> metrics: each stage takes the
previous stage's record and returns its own; nothing reaches back up the chain. The records the
stage cache stores (``to_record`` / ``from_record``) are converted by pydantic over these same
dataclasses; what is not a field of the JSON (a file's size, a live handle) is added or left
out by hand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

T = TypeVar("T")


@functools.cache
def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter  # on the first record, not when the module is imported

    return TypeAdapter(cls)


def _dump(obj: Any, *leave_out: str) -> dict[str, Any]:
    """``obj``'s fields in order as JSON values (pydantic's ``dump_python(mode="json")``),
    ``leave_out`` left out: what a record holds."""
    return _adapter(type(obj)).dump_python(obj, mode="json", exclude=set(leave_out))


def _load(cls: type[T], record: dict[str, Any], **given: Any) -> T:
    """A ``cls`` from its record, each field converted to its type and checked by pydantic;
    ``given``: the fields the record leaves out."""
    return _adapter(cls).validate_python({**record, **given})


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input as the deployed model sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "int64"
    # True when the exported graph already takes channels last (e.g. (1,16,112,112,3)); a
    # runtime must then not move the channel axis again.
    channel_last: bool = False

    def to_record(self) -> dict[str, Any]:
        return _dump(self)

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> TensorSpec:
        return _load(cls, d)


INTEGER_DTYPES = frozenset({"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64"})


@dataclass(frozen=True)
class DeviceTensor:
    """One input or output of a compiled model as the hub reports it (AI Hub: the target model's
    ``TensorSpec``). ``scale`` / ``zero_point`` describe quantized I/O: the float value of an
    integer ``q`` is ``(q - zero_point) * scale``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        """Integer I/O that stands for float values (a scale was given)."""
        return self.scale is not None and self.dtype in INTEGER_DTYPES

    def describe(self) -> str:
        """``image 1x3x224x224 uint8 (scale 0.00392, zero point 0)``."""
        text = f"{self.name} {'x'.join(map(str, self.shape))} {self.dtype}"
        if self.scale is not None:
            text += f" (scale {self.scale:.6g}, zero point {self.zero_point})"
        return text

    def to_record(self) -> dict[str, Any]:
        return _dump(self)

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> DeviceTensor:
        return _load(cls, d)


@dataclass(frozen=True)
class CompiledIO:
    """The inputs and outputs of a compiled model, as the device takes and gives them."""

    inputs: tuple[DeviceTensor, ...]
    outputs: tuple[DeviceTensor, ...]

    def to_record(self) -> dict[str, Any]:
        return _dump(self)

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> CompiledIO:
        return _load(cls, d)


class TensorRule(Protocol):
    """One tensor of a submission contract (``track.contract``; duck-typed here so that this
    module needs no config import)."""

    name: str
    dtype: str
    shape: Any  # a list of ints, or None: not fixed by the rules


class ComponentRule(Protocol):
    input: TensorRule
    output: TensorRule


@dataclass(frozen=True)
class IOMismatch:
    """Where a compiled model's I/O breaks the submission contract."""

    tensor: str  # "input image", "output output_0"
    expected: str
    got: str

    def line(self) -> str:
        return f"{self.tensor}: expected {self.expected}, got {self.got}"


def _expected(rule: TensorRule, quantized_io: bool) -> str:
    shape = "x".join(map(str, rule.shape)) + " " if rule.shape is not None else ""
    quantized = " (or quantized I/O)" if quantized_io else ""
    return f"{rule.name} {shape}{rule.dtype}{quantized}"


def io_mismatches(rule: ComponentRule, io: CompiledIO, quantized_io: bool) -> list[IOMismatch]:
    """How ``io`` differs from one component's contract: the input's name, shape and dtype, the
    output's name and dtype; integer I/O with a scale passes a float rule only when the contract
    allows quantized I/O (``quantized_io``)."""
    found: list[IOMismatch] = []
    for kind, want, have in (("input", rule.input, io.inputs), ("output", rule.output, io.outputs)):
        expected = _expected(want, quantized_io)
        named = [t for t in have if t.name == want.name]
        if not named:
            got = ", ".join(t.describe() for t in have) or "none"
            found.append(IOMismatch(f"{kind} {want.name}", expected, f"{kind}s {got}"))
            continue
        t = named[0]
        shape_ok = want.shape is None or tuple(int(d) for d in want.shape) == tuple(t.shape)
        dtype_ok = t.dtype == want.dtype or (quantized_io and t.quantized)
        if not (shape_ok and dtype_ok):
            found.append(IOMismatch(f"{kind} {want.name}", expected, t.describe()))
    if len(io.inputs) > 1:
        extra = ", ".join(t.name for t in io.inputs if t.name != rule.input.name)
        found.append(IOMismatch("inputs", f"only {rule.input.name}", f"also {extra}"))
    return found


@dataclass(frozen=True)
class DatasetRecord:
    """One split a run read, as MLflow shows it among the run's inputs.

    ``sha256`` is the content hash of the files read (computed where the data stage reads them),
    so two runs on the same data show the same digest whatever their preprocessing.
    """

    name: str  # e.g. "demo_retrieval", "qevd/val"
    context: str  # "evaluation" | "training" | "calibration"
    source: str  # the data root, or "demo" for generated data
    sha256: str
    profile: dict[str, Any] = field(default_factory=dict)  # counts: images, texts, videos...

    @property
    def digest(self) -> str:
        """MLflow's digest column holds at most 36 characters: the hash's first 16, as the
        exported ONNX files are named."""
        return self.sha256[:16]


@dataclass
class Component:
    """One deployable network of a track (e.g. ``image_encoder``), ready for export.

    ``module`` is the export wrapper: it takes exactly the tensor the device receives and carries
    any normalisation in its graph.
    """

    name: str
    module: Any  # torch.nn.Module
    input: TensorSpec
    output_name: str = "output_0"


@dataclass
class ModelBundle:
    """What a track's model factory returns; ``facts`` are what the weights are and expect as
    the run applies them (activation, normalisation), logged as params and tags."""

    components: list[Component]
    weights: str  # pretrained tag, a file path, or "random"
    model: Any = None  # the full torch model (for training); None when not trainable
    facts: dict[str, str] = field(default_factory=dict)


@dataclass
class ReferenceParity:
    """The model as loaded, in lpcvlab's export wrappers, against the weights' authors' code
    (``reference``) on the organisers' input: the minimum cosine per component, and for each
    component that fails, what differs (activation, normalisation, weights)."""

    reference: str
    cosine_min: dict[str, float]
    samples: int
    differences: dict[str, list[str]] = field(default_factory=dict)
    threshold: float = 0.9999

    def metrics(self) -> dict[str, float]:
        return {f"reference_cosine_min/{c}": v for c, v in self.cosine_min.items()}

    def failure(self) -> str | None:
        """One line naming each failing component and what differs; None when all pass."""
        if not self.differences:
            return None
        parts = [
            f"{c}: cosine {self.cosine_min[c]:.6f} (under {self.threshold} fails) against "
            f"{self.reference}; {'; '.join(d)}"
            for c, d in self.differences.items()
        ]
        return "reference parity failed: " + " | ".join(parts)


@dataclass
class ExportResult:
    component: str
    path: Path
    sha256: str
    input: TensorSpec
    output_name: str
    parity_cosine_min: float
    parity_samples: int
    seconds: float
    # export.rewrites: sites each one changed, and its min cosine alone against PyTorch
    rewrite_sites: dict[str, int] = field(default_factory=dict)
    rewrite_cosine_min: dict[str, float] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)  # nodes per operator type
    op_counts_plain: dict[str, int] = field(default_factory=dict)  # before export.rewrites

    def to_record(self) -> dict[str, Any]:
        """JSON-ready; the file's size lets a reader notice a replaced file."""
        path = Path(self.path).resolve()
        return {"path": str(path), "size": path.stat().st_size, **_dump(self, "component", "path")}

    @classmethod
    def from_record(cls, component: str, d: dict[str, Any]) -> ExportResult | None:
        """None when the recorded file is gone or has another size than when it was recorded."""
        path = Path(d["path"])
        if not path.is_file() or path.stat().st_size != int(d["size"]):
            return None
        return _load(cls, d, component=component, path=path)


@dataclass
class QuantizeResult:
    """How a non-fp32 component was turned into the model that is deployed.

    ``model`` is the quantized (or fp16) ONNX file deployed in place of the export, when it
    exists on this machine: ``hub=local``'s emulation, or the model an AI Hub quantize job
    (``job_id``) made, downloaded. None for fp16 on AI Hub, which compiles the fp32 export."""

    component: str
    precision: str  # fp16 | w8a16 | w8a8
    method: str  # how: e.g. "onnxruntime static QDQ (QNN recipe) ..." or "AI Hub quantize job"
    seconds: float
    model: ExportResult | None = None
    calibration_samples: int = 0
    calibration_sha256: str | None = None
    calibration_source: str | None = None
    job_id: str | None = None
    job_url: str | None = None

    def to_record(self) -> dict[str, Any]:
        record = _dump(self, "component")
        record["model"] = self.model.to_record() if self.model is not None else None
        return record

    @classmethod
    def from_record(cls, component: str, d: dict[str, Any]) -> QuantizeResult | None:
        """None when the recorded model file is gone or was replaced."""
        model = None
        if d.get("model") is not None:
            model = ExportResult.from_record(component, d["model"])
            if model is None:
                return None
        return _load(cls, d, component=component, model=model)


@dataclass
class CompileResult:
    component: str
    runtime: str
    device: str
    handle: Any  # runtime-specific: an onnxruntime session, an AI Hub target model, ...
    exported: ExportResult
    job_id: str | None = None
    job_url: str | None = None
    # What the hub built, where it reports it (AI Hub): the compiled model's I/O, its file (the
    # target model's .dlc / .bin, downloaded) with its sha256, and the toolchain version.
    io: CompiledIO | None = None
    artifact: Path | None = None
    artifact_sha256: str | None = None
    toolchain: str | None = None

    def to_record(self) -> dict[str, Any]:
        """Everything but the handle (a live session or remote model is not data) and the
        export (recorded on its own)."""
        return _dump(self, "component", "handle", "exported")

    @classmethod
    def from_record(cls, exported: ExportResult, d: dict[str, Any]) -> CompileResult:
        return _load(cls, d, component=exported.component, handle=None, exported=exported)


@dataclass
class ProfileResult:
    """Latency and memory of one compiled component, AI Hub's ``execution_summary`` shape in raw."""

    component: str
    latency_ms: float
    peak_memory_mb: tuple[float, float]  # (low, high)
    compute_units: dict[str, int]  # layers per compute unit: {"CPU": 12, "NPU": 300}
    raw: dict[str, Any]
    job_id: str | None = None
    job_url: str | None = None

    def to_record(self) -> dict[str, Any]:
        record = _dump(self, "component")
        record["raw"] = self.raw  # as the hub gave it (JSON mode would write an inf as null)
        return record

    @classmethod
    def from_record(cls, component: str, d: dict[str, Any]) -> ProfileResult:
        return _load(cls, d, component=component)


@dataclass
class InferenceResult:
    component: str
    outputs: np.ndarray  # (N, ...) in input order
    seconds: float
    job_id: str | None = None
    job_url: str | None = None
    # Runtime-specific scores, logged as "<name>/<component>" (e.g. device_parity_cosine_min).
    metrics: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """Everything but the outputs, which are stored beside the record as an array."""
        outputs = np.asarray(self.outputs)
        return {
            "seconds": self.seconds,
            "metrics": self.metrics,
            "shape": list(outputs.shape),
            "dtype": str(outputs.dtype),
            "job_id": self.job_id,
            "job_url": self.job_url,
        }

    @classmethod
    def from_record(cls, component: str, d: dict[str, Any], outputs: np.ndarray) -> InferenceResult:
        return cls(
            component=component,
            outputs=outputs,
            seconds=float(d["seconds"]),
            job_id=d.get("job_id"),
            job_url=d.get("job_url"),
            metrics={str(k): float(v) for k, v in d.get("metrics", {}).items()},
        )


@dataclass(frozen=True)
class JobEvent:
    """A remote job came into being or changed state; the pipeline records it as it happens."""

    component: str
    # "quantize" | "compile" | "profile" | "inference" | "upload" | "target_model" (compiled)
    kind: str
    job_id: str
    url: str | None = None
    status: str | None = None  # e.g. "SUBMITTED", "SUCCESS", "FAILED: <reason>", "REUSED"


@dataclass
class ComponentRun:
    """Everything a hub produced for one component; a stage that was not asked for is None
    (``quantized`` is None for a component deployed in fp32)."""

    compiled: CompileResult
    profile: ProfileResult | None
    inference: InferenceResult | None
    quantized: QuantizeResult | None = None


class RunLog(Protocol):
    """What a stage may record while it runs (the pipeline's MLflow recorder)."""

    run_id: str
    tracking_uri: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


@dataclass
class EvalResult:
    """A track's scores: metrics for MLflow and the terminal, plus files to keep as artifacts."""

    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # set on the run (e.g. scorer versions)
    notes: list[str] = field(default_factory=list)  # lines the results table adds
