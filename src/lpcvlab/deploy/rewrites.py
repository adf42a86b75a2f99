"""NPU-safe rewrites of an exported ONNX graph, and the graph's operator histogram.

Rewrites work on the ONNX graph rather than on the PyTorch modules: they catch every occurrence
whatever code produced it, for every backbone, and what they change is exactly what is deployed.
Each is measured against the original PyTorch model by the exporter
(:func:`lpcvlab.deploy.export.export_component`: ``rewrite_cosine_min/<component>/<rewrite>``).
The GELU without ``Erf`` is not one of them: ``backbone.activation=gelu_sigmoid`` swaps it into
the model (:func:`lpcvlab.models.clip.swap_activation`), so training adapts to it and the
reference parity measures it.

- ``finite_mask``: ``-inf`` in float constants (the additive causal mask of CLIP's text encoder)
  becomes ``-100``. An infinite value has no fp16 encoding and makes a calibrated int8/int16
  range useless: measured on ``clip_tiny``, the w8a8 text encoder falls to cosine 0.14 against
  fp32 with the ``-inf`` mask and stays at 0.99 with it finite. ``e^-100`` is still zero next
  to any attention weight whose logits differ by less than ~80.
- ``matmul_conv1x1``: a MatMul (or Gemm) of a token sequence ``(..., T, K)`` by a constant
  ``(K, N)`` weight becomes a 1x1 ``Conv`` on ``(1, K, 1, T)`` (channels first, the tokens along
  the width), its bias folded in: the layout the Hexagon NPU runs convolutions in, and the form
  the strongest 2026 Track 1 entry deployed. Exact up to float rounding.
- ``fold_attention_scale``: the ``1/sqrt(d)`` of scaled dot-product attention (exported as two
  scalar Muls, on Q and on K^T, or one on the scores) folded into the query projection's weights
  and bias, when the query traces back through layout-only ops to a constant projection; else
  merged into one Mul on Q. Exact up to rounding.
- ``drop_transposes``: transpose pairs that cancel (or compose into one), transposes that only
  move axes of size 1 (a free Reshape), transposes of constants (folded into the weights), and
  Reshape chains merged. Exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lpcvlab.deploy.graph_passes import (
    drop_transposes,
    fold_attention_scale,
    matmul_conv1x1,
)

MASK_VALUE = -100.0


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """How many nodes of each operator type the graph has (``domain::op`` outside ONNX's)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return dict(
        sorted(
            Counter(
                f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                for n in model.graph.node
            ).items()
        )
    )


def finite_mask(model: onnx.ModelProto) -> int:
    """Replace ``-inf`` in float constants by :data:`MASK_VALUE`; returns the tensors changed."""
    changed = 0
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute]
    for tensor in tensors:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        array = numpy_helper.to_array(tensor)
        if np.isneginf(array).any():
            fixed = np.where(np.isneginf(array), MASK_VALUE, array).astype(array.dtype)
            tensor.CopyFrom(numpy_helper.from_array(fixed, tensor.name))
            changed += 1
    return changed


REWRITES: dict[str, Callable[[onnx.ModelProto], int]] = {
    "finite_mask": finite_mask,
    "matmul_conv1x1": matmul_conv1x1,
    "fold_attention_scale": fold_attention_scale,
    "drop_transposes": drop_transposes,
}


def apply_rewrites(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, int]:
    """Apply the named rewrites in order, in place; how many sites each one changed."""
    return {name: REWRITES[name](model) for name in names}


def rewritten(model: onnx.ModelProto, names: Sequence[str]) -> tuple[onnx.ModelProto, dict]:
    """A rewritten copy of ``model`` and the sites each rewrite changed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, apply_rewrites(copy, names)
