"""torch -> ONNX: checked with ``onnx.checker``, named by content hash, verified against PyTorch.

The hash names the file so that two runs that exported the same graph and weights share one
file (and, later, one compile job), and so that a logged hash identifies exactly what was
deployed. NPU-safe rewrites (``export.rewrites``, :mod:`lpcvlab.deploy.rewrites`) are applied to the
exported graph before it is checked and hashed; each one's cost is its parity, alone, against
the PyTorch model, and the parity that gates the export is the deployed (rewritten) graph's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lpcvlab.deploy.rewrites import op_counts, rewritten
from lpcvlab.errors import ParityError
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.types import Component, ExportResult
from lpcvlab.util.hashing import file_sha256
from lpcvlab.util.io import writing

log = logging.getLogger(__name__)


def export_onnx(
    component: Component,
    out_dir: Path,
    opset: int = 18,
    rewrite: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
) -> tuple[Path, str]:
    """Export one component with a fixed ``(1, ...)`` input, ``rewrite`` applied to the graph
    before it is checked and hashed; returns (path, sha256)."""
    spec = component.input
    module = component.module.eval()
    example = torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype))
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        return _export_onnx(component, module, example, out_dir, opset, rewrite)


def _export_onnx(
    component: Component,
    module: torch.nn.Module,
    example: torch.Tensor,
    out_dir: Path,
    opset: int,
    rewrite: Callable[[onnx.ModelProto], onnx.ModelProto] | None,
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
        if rewrite is not None:
            onnx.save_model(rewrite(onnx.load(str(tmp_path))), str(tmp_path))
        onnx.checker.check_model(str(tmp_path), full_check=True)
        digest = file_sha256(tmp_path)
        final = out_dir / f"{component.name}-{digest[:16]}.onnx"
        if not final.exists():
            shutil.move(str(tmp_path), final)
    return final, digest


def torch_outputs(component: Component, samples: np.ndarray) -> np.ndarray:
    """The PyTorch model's outputs, one sample at a time (batch 1, as exported)."""
    out = []
    with torch.no_grad():
        for i in range(len(samples)):
            x = samples[i : i + 1].astype(component.input.dtype)
            out.append(component.module(torch.from_numpy(x)).numpy())
    return np.concatenate(out)


def onnx_outputs(
    model: Path | onnx.ModelProto, component: Component, samples: np.ndarray
) -> np.ndarray:
    """ONNX Runtime's outputs of a file or an in-memory graph, one sample at a time."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name, dtype = component.input.name, component.input.dtype
    feeds = (samples[i : i + 1].astype(dtype) for i in range(len(samples)))
    return np.concatenate([session.run(None, {name: x})[0] for x in feeds])


def parity(component: Component, path: Path, samples: np.ndarray) -> float:
    """Minimum cosine between PyTorch and ONNX Runtime outputs over real input samples."""
    reference = torch_outputs(component, samples)
    return float(cosine_per_sample(reference, onnx_outputs(path, component, samples)).min())


class _Rewriter:
    """Applies ``export.rewrites`` to the exported graph, measuring each one alone against
    PyTorch first (its cost) and counting the sites it changed."""

    def __init__(self, component: Component, samples: np.ndarray, names: Sequence[str]) -> None:
        self.component = component
        self.samples = samples
        self.names = list(names)
        self.sites: dict[str, int] = {}
        self.cosine_min: dict[str, float] = {}
        self.plain_counts: dict[str, int] = {}

    def __call__(self, model: onnx.ModelProto) -> onnx.ModelProto:
        reference = torch_outputs(self.component, self.samples)
        self.plain_counts = op_counts(model)
        for name in self.names:
            alone, sites = rewritten(model, [name])
            self.sites[name] = sites[name]
            out = onnx_outputs(alone, self.component, self.samples)
            self.cosine_min[name] = float(cosine_per_sample(reference, out).min())
            log.info(
                "rewrite %s of %s: %d site(s), cosine min %.6f against PyTorch",
                name,
                self.component.name,
                self.sites[name],
                self.cosine_min[name],
            )
        return rewritten(model, self.names)[0]


def export_component(
    component: Component,
    samples: np.ndarray,
    out_dir: Path,
    opset: int = 18,
    parity_threshold: float = 0.999,
    rewrites: Sequence[str] = (),
) -> ExportResult:
    """Export, rewrite, check, hash and verify one component; fails loudly below
    ``parity_threshold`` (the deployed graph, rewrites included, against PyTorch)."""
    t0 = time.perf_counter()
    log.info("exporting %s to ONNX (opset %d) ...", component.name, opset)
    rewriter = _Rewriter(component, samples, rewrites) if rewrites else None
    path, digest = export_onnx(component, out_dir, opset=opset, rewrite=rewriter)
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
        rewrite_sites=rewriter.sites if rewriter else {},
        rewrite_cosine_min=rewriter.cosine_min if rewriter else {},
        op_counts=op_counts(path),
        op_counts_plain=rewriter.plain_counts if rewriter else {},
    )
    log.info(
        "exported %s in %.1f s (parity cosine min %.6f over %d samples)",
        component.name,
        result.seconds,
        cos_min,
        len(samples),
    )
    if not cos_min >= parity_threshold:
        raise ParityError(parity_message(result, parity_threshold))
    return result


def parity_message(exported: ExportResult, threshold: float, measured_by: str = "") -> str:
    """Why an export failed its parity check, and what to do (rewrites' costs named)."""
    by = f"; measured by run {measured_by}" if measured_by else ""
    costs = ", ".join(f"{k} alone {v:.6f}" for k, v in exported.rewrite_cosine_min.items())
    hint = (
        f" The rewrites cost: {costs}; drop one from export.rewrites, or lower "
        "export.parity_threshold."
        if costs
        else " Check for ops the exporter mistranslates, or lower export.parity_threshold."
    )
    return (
        f"{exported.component}: ONNX output disagrees with PyTorch (min cosine "
        f"{exported.parity_cosine_min:.6f} over {exported.parity_samples} real inputs, threshold "
        f"{threshold}{by}); the exported file is {exported.path}.{hint}"
    )
