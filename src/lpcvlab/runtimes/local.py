"""ONNX Runtime on this machine: the default runtime, needs no account.

It writes its profile in the shape AI Hub's ``ProfileJob.download_profile()`` returns
(``execution_summary.estimated_inference_time`` in µs, ``inference_memory_peak_range`` in bytes,
``execution_detail[]`` with a ``compute_unit`` per layer), so both runtimes feed the same parser.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from tqdm.auto import tqdm

from lpcvlab.errors import RuntimeStageError
from lpcvlab.profile import parse_profile
from lpcvlab.runtimes.base import SequentialRuntime
from lpcvlab.types import CompileResult, ExportResult, InferenceResult, ProfileResult

log = logging.getLogger(__name__)


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

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)


class LocalRuntime(SequentialRuntime):
    """Compile = an ONNX Runtime session; profile = timed runs; infer = the dataset, in order."""

    name = "local"

    def __init__(
        self,
        device: str = "host_cpu",
        warmup_iterations: int = 3,
        profile_iterations: int = 20,
        intra_op_threads: int | None = None,
    ) -> None:
        if profile_iterations < 1:
            raise ValueError("hub.profile_iterations must be >= 1")
        self.device = device
        self.warmup_iterations = warmup_iterations
        self.profile_iterations = profile_iterations
        self.intra_op_threads = intra_op_threads
        self._load_bytes: dict[str, int] = {}

    def compile(self, exported: ExportResult) -> CompileResult:
        opts = ort.SessionOptions()
        if self.intra_op_threads:
            opts.intra_op_num_threads = int(self.intra_op_threads)
        try:
            with _PeakRss() as mem:
                session = ort.InferenceSession(
                    str(exported.path), sess_options=opts, providers=["CPUExecutionProvider"]
                )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeStageError(
                f"ONNX Runtime could not load {exported.path} ({exported.component}): {exc}"
            ) from exc
        self._load_bytes[exported.component] = mem.delta
        return CompileResult(
            component=exported.component,
            runtime="onnxruntime",
            device=self.device,
            handle=session,
            exported=exported,
        )

    def _feed(self, compiled: CompileResult, sample: np.ndarray) -> dict[str, np.ndarray]:
        spec = compiled.exported.input
        return {spec.name: np.ascontiguousarray(sample, dtype=spec.dtype)}

    def profile(self, compiled: CompileResult) -> ProfileResult:
        spec = compiled.exported.input
        rng = np.random.default_rng(0)
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            sample = rng.integers(0, 1000, size=spec.shape)
        else:
            sample = rng.random(spec.shape, dtype=np.float32)
        feed = self._feed(compiled, sample)
        session = compiled.handle
        for _ in range(self.warmup_iterations):
            session.run(None, feed)
        times_us: list[float] = []
        with _PeakRss() as mem:
            for _ in tqdm(
                range(self.profile_iterations),
                desc=f"profile {compiled.component}",
                leave=False,
                unit="it",
            ):
                t0 = time.perf_counter()
                session.run(None, feed)
                times_us.append((time.perf_counter() - t0) * 1e6)
        low = self._load_bytes.get(compiled.component, 0)
        raw = {
            "execution_summary": {
                "estimated_inference_time": int(round(statistics.median(times_us))),
                "all_inference_times": [int(round(t)) for t in times_us],
                "inference_memory_peak_range": [int(min(low, mem.delta)), int(max(low, mem.delta))],
                "warmup_iterations": self.warmup_iterations,
                "measured_on": "host_cpu (onnxruntime CPUExecutionProvider)",
            },
            "execution_detail": _execution_detail(compiled.exported.path),
        }
        return parse_profile(compiled.component, raw)

    def infer(self, compiled: CompileResult, inputs: np.ndarray) -> InferenceResult:
        session = compiled.handle
        t0 = time.perf_counter()
        outputs: list[np.ndarray] = []
        for i in tqdm(range(len(inputs)), desc=f"infer {compiled.component}", unit="sample"):
            outputs.append(session.run(None, self._feed(compiled, inputs[i : i + 1]))[0])
        stacked = np.concatenate(outputs, axis=0) if outputs else np.empty((0,))
        return InferenceResult(compiled.component, stacked, time.perf_counter() - t0)


def _execution_detail(path: Any) -> list[dict[str, Any]]:
    """One entry per graph node, all on the CPU: the layer list AI Hub reports, locally."""
    model = onnx.load(str(path), load_external_data=False)
    return [
        {"name": node.name or f"{node.op_type}_{i}", "type": node.op_type, "compute_unit": "CPU"}
        for i, node in enumerate(model.graph.node)
    ]
