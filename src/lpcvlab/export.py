"""torch -> ONNX: checked with ``onnx.checker``, named by content hash, verified against PyTorch.

The hash names the file so that two runs that exported the same graph and weights share one
file (and, later, one compile job), and so that a logged hash identifies exactly what was
deployed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lpcvlab.errors import ParityError
from lpcvlab.hashing import file_sha256
from lpcvlab.io import writing
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.types import Component, ExportResult

log = logging.getLogger(__name__)


def export_onnx(component: Component, out_dir: Path, opset: int = 18) -> tuple[Path, str]:
    """Export one component with a fixed ``(1, ...)`` input; returns (path, sha256)."""
    spec = component.input
    module = component.module.eval()
    example = torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype))
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        return _export_onnx(component, module, example, out_dir, opset)


def _export_onnx(
    component: Component, module: torch.nn.Module, example: torch.Tensor, out_dir: Path, opset: int
) -> tuple[Path, str]:
    spec = component.input
    # The temporary folder goes whatever happens, Ctrl-C and SIGTERM included.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp_path = Path(tmp) / f"{component.name}.onnx"
        chatter = io.StringIO()  # the exporter prints its own step list; keep it for debug
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(tmp_path),
                input_names=[spec.name],
                output_names=[component.output_name],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        log.debug("torch.onnx.export said:\n%s", chatter.getvalue())
        onnx.checker.check_model(str(tmp_path), full_check=True)
        digest = file_sha256(tmp_path)
        final = out_dir / f"{component.name}-{digest[:16]}.onnx"
        if not final.exists():
            shutil.move(str(tmp_path), final)
    return final, digest


def parity(component: Component, path: Path, samples: np.ndarray) -> float:
    """Minimum cosine between PyTorch and ONNX Runtime outputs over real input samples."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch_out, onnx_out = [], []
    with torch.no_grad():
        for i in range(len(samples)):
            x = samples[i : i + 1].astype(component.input.dtype)
            torch_out.append(component.module(torch.from_numpy(x)).numpy())
            onnx_out.append(session.run(None, {component.input.name: x})[0])
    return float(cosine_per_sample(np.concatenate(torch_out), np.concatenate(onnx_out)).min())


def export_component(
    component: Component,
    samples: np.ndarray,
    out_dir: Path,
    opset: int = 18,
    parity_threshold: float = 0.999,
) -> ExportResult:
    """Export, check, hash and verify one component; fails loudly below ``parity_threshold``."""
    t0 = time.perf_counter()
    log.info("exporting %s to ONNX (opset %d)", component.name, opset)
    path, digest = export_onnx(component, out_dir, opset=opset)
    cos_min = parity(component, path, samples)
    result = ExportResult(
        component=component.name,
        path=path,
        sha256=digest,
        input=component.input,
        output_name=component.output_name,
        parity_cosine_min=cos_min,
        parity_samples=len(samples),
        seconds=time.perf_counter() - t0,
    )
    if not cos_min >= parity_threshold:
        raise ParityError(
            f"{component.name}: ONNX output disagrees with PyTorch (min cosine {cos_min:.6f} over "
            f"{len(samples)} real inputs, threshold {parity_threshold}); the exported file is "
            f"{path}. Check for ops the exporter mistranslates, or lower export.parity_threshold."
        )
    return result
