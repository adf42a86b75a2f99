"""The small result records that flow from one stage to the next.

data -> model -> (train) -> export -> compile -> profile -> infer -> metrics: each stage takes the
previous stage's record and returns its own; nothing reaches back up the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input as the deployed model sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "int64"
    # True when the exported graph already takes channels last (e.g. (1,16,112,112,3)); a
    # runtime must then not move the channel axis again.
    channel_last: bool = False


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
    """What a track's model factory returns."""

    components: list[Component]
    weights: str  # pretrained tag, a file path, or "random"
    model: Any = None  # the full torch model (for training); None when not trainable


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


@dataclass
class CompileResult:
    component: str
    runtime: str
    device: str
    handle: Any  # runtime-specific: an onnxruntime session, an AI Hub target model, ...
    exported: ExportResult
    job_id: str | None = None
    job_url: str | None = None


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


@dataclass
class InferenceResult:
    component: str
    outputs: np.ndarray  # (N, ...) in input order
    seconds: float
    job_id: str | None = None
    job_url: str | None = None
    # Runtime-specific scores, logged as "<name>/<component>" (e.g. device_parity_cosine_min).
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobEvent:
    """A remote job came into being or changed state; the pipeline records it as it happens."""

    component: str
    kind: str  # "compile" | "profile" | "inference" | "upload"
    job_id: str
    url: str | None = None
    status: str | None = None  # e.g. "SUBMITTED", "SUCCESS", "FAILED: <reason>", "REUSED"


@dataclass
class ComponentRun:
    """Everything a runtime produced for one component."""

    compiled: CompileResult
    profile: ProfileResult
    inference: InferenceResult


@dataclass
class EvalResult:
    """A track's scores: metrics for MLflow and the terminal, plus files to keep as artifacts."""

    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
