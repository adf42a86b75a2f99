"""The runtime protocol: where an exported model is compiled, profiled and run.

``hub=local`` (ONNX Runtime on this machine) and ``hub=aihub`` (Qualcomm AI Hub) both implement
it. The pipeline hands a runtime one :class:`ComponentJob` per network and receives one
:class:`~lpcvlab.types.ComponentRun` per network; a remote runtime is free to submit every job
before waiting on any (``run_components``), a local one runs them in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from lpcvlab.types import (
    CompileResult,
    ComponentRun,
    ExportResult,
    InferenceResult,
    JobEvent,
    ProfileResult,
)

JobListener = Callable[[JobEvent], None]


@dataclass
class ComponentJob:
    """One exported network and the inputs to run it on, stacked along the batch axis.

    ``inputs`` has shape ``(N, *exported.input.shape[1:])`` for models exported with batch 1:
    the runtime feeds sample ``i`` as ``inputs[i:i+1]`` and returns outputs in the same order.
    """

    exported: ExportResult
    inputs: np.ndarray


@runtime_checkable
class Runtime(Protocol):
    """``job_listener``, when the pipeline sets it, is called for every remote job as soon as its
    ID exists, so that a run that fails later still records the jobs it paid for."""

    name: str
    job_listener: JobListener | None

    def compile(self, exported: ExportResult) -> CompileResult: ...

    def profile(self, compiled: CompileResult) -> ProfileResult: ...

    def infer(self, compiled: CompileResult, inputs: np.ndarray) -> InferenceResult: ...

    def run_components(self, jobs: list[ComponentJob]) -> dict[str, ComponentRun]: ...


class SequentialRuntime:
    """Mixin: compile -> profile -> infer, one component after the other."""

    job_listener: JobListener | None = None

    def run_components(self, jobs: list[ComponentJob]) -> dict[str, ComponentRun]:
        runs: dict[str, ComponentRun] = {}
        for job in jobs:
            compiled = self.compile(job.exported)  # type: ignore[attr-defined]
            profile = self.profile(compiled)  # type: ignore[attr-defined]
            inference = self.infer(compiled, job.inputs)  # type: ignore[attr-defined]
            runs[job.exported.component] = ComponentRun(compiled, profile, inference)
        return runs
