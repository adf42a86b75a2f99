"""ONNX Runtime on this machine (``hub=local``): the default hub, needs no account.

It writes its profile in the shape AI Hub's ``ProfileJob.download_profile()`` returns
(``execution_summary.estimated_inference_time`` in µs, ``inference_memory_peak_range`` in bytes,
``execution_detail[]`` with a ``compute_unit`` per layer), so both runtimes feed the same parser.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import platform
import statistics
import threading
import time
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from tqdm.auto import tqdm

from lpcvlab.config.schema import DeviceConfig, LocalHubConfig, RuntimeConfig
from lpcvlab.deploy.precision import ComponentPrecision
from lpcvlab.errors import RuntimeStageError
from lpcvlab.hubs.base import SequentialHub
from lpcvlab.hubs.profile import parse_profile
from lpcvlab.types import (
    CompileResult,
    ExportResult,
    InferenceResult,
    ProfileResult,
    QuantizeResult,
    TensorSpec,
)

log = logging.getLogger(__name__)

READ_BATCH = 16  # samples read from the inputs at a time by infer()


class _PeakRss:
    """Samples this process's resident memory in a thread; peak above a baseline, in bytes."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def peak_now(self) -> int:
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)


class LocalHub(SequentialHub):
    """Compile = an ONNX Runtime session; profile = timed runs; infer = the dataset, in order.

    ``device`` and ``runtime`` are recorded as the target; what is measured is this machine.
    """

    name = "local"

    def __init__(
        self,
        settings: LocalHubConfig | None = None,
        device: DeviceConfig | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> None:
        self.settings = settings or LocalHubConfig()
        self.device = device.name if device is not None else "host_cpu"
        self.runtime = runtime.name if runtime is not None else "onnx"
        self.warmup_iterations = int(self.settings.warmup_iterations)
        self.profile_iterations = int(self.settings.profile_iterations)
        self.intra_op_threads = self.settings.intra_op_threads

    def identity(self) -> dict[str, Any]:
        """Settings, target names, ONNX Runtime's version and this machine: a latency is a
        property of the machine that measured it."""
        return {
            "hub": dataclasses.asdict(self.settings),
            "device": self.device,
            "runtime": self.runtime,
            "onnxruntime": ort.__version__,
            "host": {
                "machine": platform.machine(),
                "processor": platform.processor(),
                "node": platform.node(),
                "cpus": psutil.cpu_count(logical=True),
            },
        }

    def quantize(self, exported: ExportResult, precision: ComponentPrecision) -> QuantizeResult:
        """The precision emulated with ONNX Runtime (:mod:`lpcvlab.deploy.precision.emulate`):
        a QDQ or fp16 ONNX file next to the export, then compiled, profiled and run like any
        model."""
        from lpcvlab.deploy.precision.emulate import emulate

        return emulate(exported, precision)

    def compile(self, exported: ExportResult) -> CompileResult:
        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        try:
            session = ort.InferenceSession(
                str(exported.path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeStageError(
                f"ONNX Runtime could not load {exported.path} ({exported.component}): {exc}"
            ) from exc
        return CompileResult(
            component=exported.component,
            runtime="onnxruntime",
            device=self.device,
            handle=session,
            exported=exported,
        )

    def profile(self, compiled: CompileResult) -> ProfileResult:
        """Timed runs in a fresh process, so memory is the model's own and not what this
        process's allocator kept from earlier stages."""
        exported = compiled.exported
        log.info(
            "profiling %s: %d warm-up + %d timed runs in a fresh process",
            compiled.component,
            self.warmup_iterations,
            self.profile_iterations,
        )
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            stats = pool.apply(
                _profile_in_child,
                (
                    str(exported.path),
                    exported.input,
                    self.warmup_iterations,
                    self.profile_iterations,
                    self.intra_op_threads,
                ),
            )
        times_us = stats["times_us"]
        raw = {
            "execution_summary": {
                "estimated_inference_time": int(round(statistics.median(times_us))),
                "all_inference_times": [int(round(t)) for t in times_us],
                "inference_memory_peak_range": [stats["load_bytes"], stats["peak_bytes"]],
                "warmup_iterations": self.warmup_iterations,
                "measured_on": "host_cpu (onnxruntime CPUExecutionProvider)",
            },
            "execution_detail": _execution_detail(exported.path),
        }
        return parse_profile(compiled.component, raw)

    def infer(self, compiled: CompileResult, inputs: np.ndarray) -> InferenceResult:
        """Every sample, one at a time as the device takes them, read ``READ_BATCH`` at a time:
        inputs that stream from disk (Track 2's cached clips) are never held whole."""
        session = compiled.handle
        spec = compiled.exported.input
        t0 = time.perf_counter()
        outputs: list[np.ndarray] = []
        bar = tqdm(total=len(inputs), desc=f"infer {compiled.component}", unit="sample")
        for a in range(0, len(inputs), READ_BATCH):
            block = inputs[a : a + READ_BATCH]
            for i in range(len(block)):
                feed = {spec.name: np.ascontiguousarray(block[i : i + 1], dtype=spec.dtype)}
                outputs.append(session.run(None, feed)[0])
                bar.update(1)
        bar.close()
        stacked = np.concatenate(outputs, axis=0) if outputs else np.empty((0,))
        return InferenceResult(compiled.component, stacked, time.perf_counter() - t0)


def _profile_in_child(
    path: str, spec: TensorSpec, warmup: int, iterations: int, threads: int | None
) -> dict[str, Any]:
    """Load, warm up and time one model; memory above this fresh process's baseline."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    rng = np.random.default_rng(0)
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        sample = rng.integers(0, 1000, size=spec.shape).astype(spec.dtype)
    else:
        sample = rng.random(spec.shape, dtype=np.float32).astype(spec.dtype)
    feed = {spec.name: sample}
    with _PeakRss() as mem:
        session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        load_bytes = mem.peak_now() - mem.baseline
        for _ in range(warmup):
            session.run(None, feed)
        times_us: list[float] = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            session.run(None, feed)
            times_us.append((time.perf_counter() - t0) * 1e6)
    return {"times_us": times_us, "load_bytes": max(0, load_bytes), "peak_bytes": mem.delta}


def _execution_detail(path: Any) -> list[dict[str, Any]]:
    """One entry per graph node, all on the CPU: the layer list AI Hub reports, locally."""
    model = onnx.load(str(path), load_external_data=False)
    return [
        {"name": node.name or f"{node.op_type}_{i}", "type": node.op_type, "compute_unit": "CPU"}
        for i, node in enumerate(model.graph.node)
    ]
