"""Device outputs against the exported model run on this machine (ONNX Runtime).

A hub whose compiled model is not the exported ONNX file itself (AI Hub's compiled model on a
device; later, a quantized or fp16 emulation on this machine) reports how far its outputs are from
the host's over the first samples: ``device_parity_cosine_min`` and ``device_parity_psnr``.
"""

from __future__ import annotations

import logging

import numpy as np

from lpcvlab.errors import RuntimeStageError
from lpcvlab.metrics import cosine_per_sample, psnr
from lpcvlab.types import ExportResult

log = logging.getLogger(__name__)


def host_outputs(exported: ExportResult, inputs: np.ndarray, n: int) -> np.ndarray:
    """The exported model's outputs for the first ``n`` samples, one at a time (batch 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    spec = exported.input
    feeds = (np.ascontiguousarray(inputs[i : i + 1], spec.dtype) for i in range(n))
    return np.concatenate([session.run(None, {spec.name: x})[0] for x in feeds], axis=0)


def device_parity(
    exported: ExportResult, inputs: np.ndarray, outputs: np.ndarray, samples: int, where: str
) -> dict[str, float]:
    """Cosine (min over samples) and PSNR of ``outputs`` against the host's, first ``samples``."""
    n = min(int(samples), len(inputs), len(outputs))
    if n <= 0:
        return {}
    ref = host_outputs(exported, inputs, n)
    dev = np.asarray(outputs[:n])
    if ref.size != dev.size:
        raise RuntimeStageError(
            f"{exported.component}: outputs on {where} {dev.shape} do not match ONNX Runtime's "
            f"{ref.shape} on the same {n} inputs"
        )
    ref2, dev2 = ref.reshape(n, -1), dev.reshape(n, -1)
    cos_min = float(cosine_per_sample(ref2, dev2).min())
    db = psnr(ref2, dev2)
    log.info(
        "%s on %s vs ONNX Runtime over %d samples: cosine min %.6f, PSNR %.1f dB",
        exported.component,
        where,
        n,
        cos_min,
        db,
    )
    return {"device_parity_cosine_min": cos_min, "device_parity_psnr": db}
