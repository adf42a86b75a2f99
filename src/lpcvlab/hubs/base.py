"""The hub protocol: where an exported model is compiled, profiled and run (the ``hub`` group).

``hub=local`` (ONNX Runtime on this machine) and ``hub=aihub`` (Qualcomm AI Hub) implement it, and
so does the stage cache (:class:`lpcvlab.hubs.cache.CachedHub`), which wraps either. The pipeline
hands a hub one :class:`ComponentJob` per network and receives one
:class:`~lpcvlab.types.ComponentRun` per network. A job names the stages it needs: the cache asks
the hub it wraps only for what it does not hold, and the hub alone decides how its stages run
(one after the other locally; every job submitted before any is waited on, remotely).

A remote hub's stages are mostly waiting on a service: :meth:`Hub.start_components` submits
them and returns at once with what is in flight (:class:`InFlight`: a non-blocking ``poll()``,
then ``result()``), so the caller decides how to wait -- one run blocks (:func:`wait`), a sweep
waits on the jobs of all its configs together. A hub with nothing to wait for returns
:class:`Done`. The pipeline is a generator that yields at that wait (:func:`drive` runs one to
the end, blocking).

A job also carries the component's precision
(:class:`~lpcvlab.deploy.precision.ComponentPrecision`):
a non-fp32 component is first *quantized* -- how is the hub's own (``hub=local`` emulates it with
ONNX Runtime, ``hub=aihub`` submits a quantize job, or compiles the fp32 export with the
runtime's fp16 options) -- and the model that comes out is what is compiled, profiled and run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from lpcvlab.deploy.precision import FP32, ComponentPrecision
from lpcvlab.types import (
    CompiledIO,
    CompileResult,
    ComponentRun,
    ExportResult,
    InferenceResult,
    JobEvent,
    ProfileResult,
    QuantizeResult,
)

JobListener = Callable[[JobEvent], None]
# (component, label, path): called with every graph a hub made on this machine (fp16, quantized)
# or downloaded, before it is compiled; raising stops the run before the compile is paid for.
GraphCheck = Callable[[str, str, Path], None]
# (component, compiled I/O, where: e.g. "compile job j123"): called with each compiled model's
# I/O as the hub reports it, before its profile and inference jobs; raising stops the run.
CompiledCheck = Callable[[str, CompiledIO, str], None]

QUANTIZE, COMPILE, PROFILE, INFERENCE = "quantize", "compile", "profile", "inference"
ALL_STAGES = frozenset({COMPILE, PROFILE, INFERENCE})


@dataclass
class ComponentJob:
    """One exported network, the inputs to run it on, and the stages wanted from the hub.

    ``inputs`` has shape ``(N, *exported.input.shape[1:])`` for models exported with batch 1:
    the hub feeds sample ``i`` as ``inputs[i:i+1]`` and returns outputs in the same order.
    Compiling is implied by the other stages; a stage left out comes back as None.
    ``precision`` is what the component is deployed in; ``quantized``, when given, is that
    precision's model already made (the stage cache's), which the hub then uses as it is.
    """

    exported: ExportResult
    inputs: np.ndarray
    stages: frozenset[str] = field(default=ALL_STAGES)
    precision: ComponentPrecision = FP32
    quantized: QuantizeResult | None = None

    @property
    def component(self) -> str:
        return self.exported.component


class InFlight(Protocol):
    """Components a hub is still computing (remote jobs submitted, not yet done).

    ``poll()`` looks once, without waiting, and returns True when everything is done; a failed
    job raises there. ``result()`` is then the runs, as ``run_components`` returns them.
    ``stop()`` gives up waiting (an interrupt, a failure elsewhere) and says what is left
    running. ``interval_s`` is how long to wait between two polls.
    """

    interval_s: float

    def poll(self) -> bool: ...

    def result(self) -> dict[str, ComponentRun]: ...

    def stop(self) -> None: ...


@dataclass
class Done:
    """What a hub that computes everything before it returns has in flight: nothing."""

    runs: dict[str, ComponentRun]
    interval_s: float = 0.0

    def poll(self) -> bool:
        return True

    def result(self) -> dict[str, ComponentRun]:
        return self.runs

    def stop(self) -> None:
        return None


def wait(inflight: InFlight) -> None:
    """Poll ``inflight`` until it is done (the blocking way to wait; a failure raises)."""
    while not inflight.poll():
        time.sleep(inflight.interval_s)


T = TypeVar("T")


def drive(steps: Generator[InFlight, None, T]) -> T:
    """Run a generator that yields at each device wait (:func:`lpcvlab.pipeline.run_steps`) to
    its end, blocking at each wait: its return value. An exception while waiting (a failed
    job, Ctrl-C) is thrown into the generator at its wait, so that it ends the way it would
    have had it been raised there (an MLflow run FAILED or KILLED)."""
    try:
        waiting = next(steps)
        while True:
            try:
                wait(waiting)
            except BaseException as exc:  # noqa: BLE001 - the generator decides, and re-raises
                waiting = steps.throw(exc)
                continue
            waiting = steps.send(None)
    except StopIteration as stop:
        return stop.value


@runtime_checkable
class Hub(Protocol):
    """``job_listener``, when the pipeline sets it, is called for every remote job as soon as its
    ID exists, so that a run that fails later still records the jobs it paid for.

    ``graph_check``, when set, sees every graph the hub is about to compile other than the
    export itself (an fp16 or quantized ONNX), as soon as it exists on this machine: the device
    hazard check (``export.lint``) of the deployed graph runs before its compile job.

    ``compiled_check``, when set, sees the I/O of each model the hub compiled as the hub
    reports it (AI Hub: the target model's TensorSpecs), before its profile and inference: the
    submission contract's check (``io_contract``). A hub that only runs the export as it is
    (``hub=local``) has nothing more to show than the export's own I/O, checked by the lint.

    ``records_jobs`` is True for a hub that keeps its own record of paid jobs (the AI Hub job
    ledger): that record alone answers "was this already paid for?", and the stage cache leaves
    such a hub's stages to it.
    """

    name: str
    job_listener: JobListener | None
    graph_check: GraphCheck | None
    compiled_check: CompiledCheck | None
    records_jobs: bool

    def preflight(self) -> None:
        """Fail fast, before any data or model work, when the hub cannot be used."""
        ...

    def identity(self) -> dict[str, Any]:
        """What determines this hub's compile and profile results (settings, versions, host),
        without secrets: part of the stage cache's keys."""
        ...

    def run_components(self, jobs: list[ComponentJob]) -> dict[str, ComponentRun]: ...

    def start_components(self, jobs: list[ComponentJob]) -> InFlight:
        """``run_components`` without the wait: submitted, and returned at once."""
        ...


class SequentialHub:
    """Mixin: compile -> profile -> infer, one component after the other, only what is asked."""

    job_listener: JobListener | None = None
    graph_check: GraphCheck | None = None
    compiled_check: CompiledCheck | None = None
    records_jobs = False

    def preflight(self) -> None:
        return None

    def quantize(self, exported: ExportResult, precision: ComponentPrecision) -> QuantizeResult:
        """``exported`` in ``precision``; its ``model`` is then compiled instead."""
        raise NotImplementedError(f"hub {type(self).__name__} cannot deploy {precision.name}")

    def compile(self, exported: ExportResult) -> CompileResult:
        raise NotImplementedError

    def profile(self, compiled: CompileResult) -> ProfileResult:
        raise NotImplementedError

    def infer(self, compiled: CompileResult, inputs: np.ndarray) -> InferenceResult:
        raise NotImplementedError

    def start_components(self, jobs: list[ComponentJob]) -> InFlight:
        """Nothing to wait for: the stages run here, now."""
        return Done(self.run_components(jobs))

    def run_components(self, jobs: list[ComponentJob]) -> dict[str, ComponentRun]:
        runs: dict[str, ComponentRun] = {}
        for job in jobs:
            quantized = job.quantized
            if quantized is None and job.precision.name != FP32.name:
                quantized = self.quantize(job.exported, job.precision)
            deployed = quantized.model if quantized is not None else None
            if deployed is not None and quantized is not None and self.graph_check is not None:
                self.graph_check(job.component, quantized.precision, Path(deployed.path))
            compiled = self.compile(deployed or job.exported)
            profile = self.profile(compiled) if PROFILE in job.stages else None
            inference = self.infer(compiled, job.inputs) if INFERENCE in job.stages else None
            runs[job.component] = ComponentRun(compiled, profile, inference, quantized)
        return runs
