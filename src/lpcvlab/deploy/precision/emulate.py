"""Deployment precisions emulated on this machine with ONNX Runtime (``hub=local``).

So that the accuracy cost of a precision can be estimated before paying for device time:

- **w8a8 / w8a16**: static QDQ quantization with ONNX Runtime's recipe for Qualcomm's HTP
  (``get_qnn_qdq_config``: the operators QNN quantizes and the data types it takes): int8
  symmetric weights (AI Hub's quantize job takes ``weights_dtype=INT8``), uint8 or uint16
  asymmetric activations, per-tensor, MinMax ranges from the component's calibration data. ONNX
  Runtime runs the QDQ graph with int8 kernels where it has them and quantize-dequantize around
  float kernels elsewhere, so the numbers are those of the quantized model.
- **fp16**: every float weight and activation converted to float16 (ONNX Runtime's float16
  converter), float32 inputs and outputs kept so the same tensors go in; ONNX Runtime's CPU
  provider computes in fp16 where it has an fp16 kernel and inserts casts around the others
  (fp16-rounded values, fp32 arithmetic). The NPU's fp16 accumulates differently: this
  estimates the storage error, not the device's bit pattern.

The emulated model is written next to the export, named by its content hash like the export.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from lpcvlab.deploy.precision.plan import ComponentPrecision
from lpcvlab.deploy.rewrites import op_counts
from lpcvlab.errors import RuntimeStageError
from lpcvlab.types import ExportResult, QuantizeResult
from lpcvlab.util.hashing import file_sha256
from lpcvlab.util.io import writing

log = logging.getLogger(__name__)

# Calibrate in ranges of at most this many samples, so that only their intermediate outputs are
# held in memory at once (a ViT-B/16 or an R(2+1)D-18 holds hundreds of MB per sample).
CALIB_BATCH = 8

METHODS = {
    "fp16": (
        "onnxruntime float16 conversion (weights and activations fp16, fp32 I/O); CPU computes "
        "fp16 where it has a kernel, fp32 between casts elsewhere"
    ),
    "w8a16": (
        "onnxruntime static QDQ, QNN HTP recipe: int8 symmetric weights, uint16 activations, "
        "per-tensor MinMax"
    ),
    "w8a8": (
        "onnxruntime static QDQ, QNN HTP recipe: int8 symmetric weights, uint8 activations, "
        "per-tensor MinMax"
    ),
}


def emulate(exported: ExportResult, precision: ComponentPrecision) -> QuantizeResult:
    """``exported`` converted to ``precision`` as an ONNX file next to it (its name carries the
    precision and the content hash), with what was done and the resulting operator counts."""
    if precision.name not in METHODS:
        raise RuntimeStageError(f"{exported.component}: no emulation of {precision.name!r}")
    t0 = time.perf_counter()
    source = Path(exported.path)
    out_dir = source.parent
    with writing(out_dir), tempfile.TemporaryDirectory(dir=out_dir, prefix=".emulate-") as tmp:
        tmp_path = Path(tmp) / f"{exported.component}.onnx"
        if precision.name == "fp16":
            _to_fp16(source, tmp_path)
        else:
            _quantize(exported, precision, tmp_path)
        onnx.checker.check_model(str(tmp_path))
        digest = file_sha256(tmp_path)
        final = out_dir / f"{exported.component}.{precision.name}-{digest[:16]}.onnx"
        if not final.exists():
            shutil.move(str(tmp_path), final)
    cal = precision.calibration
    model = dataclasses.replace(
        exported,
        path=final,
        sha256=digest,
        parity_cosine_min=float("nan"),  # measured against fp32 by the fidelity gate instead
        parity_samples=0,
        seconds=time.perf_counter() - t0,
        rewrite_sites={},
        rewrite_cosine_min={},
        op_counts=op_counts(final),
    )
    log.info("%s: emulated %s in %s", exported.component, precision.name, final.name)
    return QuantizeResult(
        component=exported.component,
        precision=precision.name,
        method=METHODS[precision.name],
        seconds=model.seconds,
        model=model,
        calibration_samples=len(cal) if cal is not None else 0,
        calibration_sha256=cal.sha256 if cal is not None else None,
        calibration_source=cal.source if cal is not None else None,
    )


def _to_fp16(source: Path, target: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    _sort_nodes(model.graph)  # the converter appends the input casts at the end
    onnx.save_model(model, str(target))


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order the nodes so that each comes after the nodes producing its inputs (Kahn)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    waiting = [{i for i in n.input if i not in available} for n in nodes]
    consumers: dict[str, list[int]] = {}
    for k, needs in enumerate(waiting):
        for name in needs:
            consumers.setdefault(name, []).append(k)
    ready = [k for k, needs in enumerate(waiting) if not needs]
    ordered = []
    while ready:
        k = ready.pop(0)
        ordered.append(nodes[k])
        for out in nodes[k].output:
            for j in consumers.get(out, []):
                waiting[j].discard(out)
                if not waiting[j]:
                    ready.append(j)
    if len(ordered) != len(nodes):
        raise RuntimeStageError(f"graph {graph.name!r} has a cycle or an undefined input")
    del graph.node[:]
    graph.node.extend(ordered)


class _Reader:
    """ONNX Runtime's calibration data reader: one sample at a time, in ranges of at most
    :data:`CALIB_BATCH` samples (``CalibStridedMinMax``), with a progress bar."""

    def __init__(self, name: str, samples: np.ndarray, desc: str) -> None:
        self._name = name
        self._samples = samples
        self._next = self._end = 0
        self._bar = tqdm(total=len(samples), desc=desc, unit="sample", leave=False)

    def __len__(self) -> int:
        return len(self._samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self._samples))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        i = self._next
        self._next += 1
        self._bar.update(1)
        return {self._name: self._samples[i : i + 1]}

    def close(self) -> None:
        self._bar.close()

    @property
    def stride(self) -> int:
        """The largest range size up to :data:`CALIB_BATCH` that divides the sample count."""
        n = len(self._samples)
        return max(k for k in range(1, min(CALIB_BATCH, n) + 1) if n % k == 0)


def _quantize(exported: ExportResult, precision: ComponentPrecision, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    cal = precision.calibration
    if cal is None:
        raise RuntimeStageError(f"{exported.component}: {precision.name} needs calibration data")
    activations = QuantType.QUInt16 if precision.name == "w8a16" else QuantType.QUInt8
    reader = _Reader(
        exported.input.name, cal.samples, f"calibrate {exported.component} {precision.name}"
    )
    keep_types = set(precision.exclude_op_types)
    op_types = None
    if keep_types:  # quantize every op type of the graph but the excluded ones
        graph = onnx.load(str(exported.path), load_external_data=False).graph
        op_types = sorted({n.op_type for n in graph.node} - keep_types)
    config = get_qnn_qdq_config(
        str(exported.path),
        reader,
        activation_type=activations,
        weight_type=QuantType.QInt8,
        weight_symmetric=True,
        op_types_to_quantize=op_types,
        nodes_to_exclude=list(precision.exclude_nodes) or None,
    )
    config.extra_options["CalibStridedMinMax"] = reader.stride
    try:
        quantize(str(exported.path), str(target), config)
    except Exception as exc:  # onnxruntime's quantizer raises untyped errors
        raise RuntimeStageError(
            f"{exported.component}: ONNX Runtime could not quantize {exported.path} to "
            f"{precision.name}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        reader.close()
