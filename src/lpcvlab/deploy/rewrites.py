"""NPU-safe rewrites of an exported ONNX graph, and the graph's operator histogram.

Rewrites work on the ONNX graph rather than on the PyTorch modules: they catch every occurrence
whatever code produced it (an ``nn.GELU`` module, a functional ``F.gelu`` inside a timm block,
a mask buffer built by open_clip), for every backbone, and what they change is exactly what is
deployed. Each is measured against the original PyTorch model by the exporter
(:func:`lpcvlab.deploy.export.export_component`: ``rewrite_cosine_min/<component>/<rewrite>``).

- ``gelu_sigmoid``: erf-GELU ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (and the ``Gelu`` operator of
  opset 20) becomes ``x * sigmoid(1.702 x)``. ``Erf`` is not supported on the NPU in the
  toolchains the public LPCVC 2026 entries used; the best Track 1 entry deployed this form.
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

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lpcvlab.deploy.graph_passes import (
    GraphIndex,
    drop_transposes,
    fold_attention_scale,
    matmul_conv1x1,
)

MASK_VALUE = -100.0
GELU_SIGMOID_SCALE = 1.702


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


def _gelu_sites(g: GraphIndex) -> list[tuple[str, str, list[onnx.NodeProto]]]:
    """(x, output, nodes to remove) for each erf-GELU (and opset-20 ``Gelu``) in the graph."""
    sites = []
    for node in g.model.graph.node:
        if node.op_type == "Gelu":
            approx = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "")
            if approx in ("", "none"):
                sites.append((node.input[0], node.output[0], [node]))
            continue
        if node.op_type != "Erf":
            continue
        scaled = g.producer.get(node.input[0])
        if scaled is None or len(g.consumers.get(node.input[0], [])) != 1:
            continue
        if scaled.op_type == "Div" and g.is_const(scaled.input[1], math.sqrt(2.0)):
            x = scaled.input[0]
        elif scaled.op_type == "Mul":
            x = next(
                (g.other(scaled, c) for c in scaled.input if g.is_const(c, 1 / math.sqrt(2.0))),
                None,
            )
        else:
            continue
        plus = g.only_consumer(node.output[0], "Add")
        if x is None or plus is None or not g.is_const(g.other(plus, node.output[0]), 1.0):
            continue
        found = _gelu_tail(g, x, plus.output[0])
        if found is not None:
            out, tail = found
            sites.append((x, out, [scaled, node, plus, *tail]))
    return sites


def _gelu_tail(g: GraphIndex, x: str, one_plus: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """``0.5 * x * (1 + erf)`` in any association order: (its output, the nodes it takes)."""
    first = g.only_consumer(one_plus, "Mul")
    operand = g.other(first, one_plus) if first is not None else None
    if first is None or operand is None:
        return None
    if g.is_const(operand, 0.5) or operand == x:  # (0.5 * a) * x  or  (x * a) * 0.5
        second = g.only_consumer(first.output[0], "Mul")
        rest = g.other(second, first.output[0]) if second is not None else None
        ok = rest == x if operand != x else g.is_const(rest, 0.5)
        return (second.output[0], [first, second]) if second is not None and ok else None
    half = g.producer.get(operand)  # (x * 0.5) * a
    if half is None or half.op_type != "Mul" or len(g.consumers.get(operand, [])) != 1:
        return None
    return (first.output[0], [half, first]) if g.is_const(g.other(half, x), 0.5) else None


def gelu_sigmoid(model: onnx.ModelProto) -> int:
    """Replace every erf-GELU by ``x * sigmoid(1.702 x)``; returns how many were replaced."""
    g = GraphIndex(model)
    sites = _gelu_sites(g)
    if not sites:
        return 0
    scale = "gelu_sigmoid_scale"
    model.graph.initializer.append(
        numpy_helper.from_array(np.array(GELU_SIGMOID_SCALE, dtype=np.float32), scale)
    )
    removed: set[int] = set()
    insert_at: dict[int, list[onnx.NodeProto]] = {}
    nodes = list(model.graph.node)
    index = {id(n): i for i, n in enumerate(nodes)}
    for k, (x, out, old) in enumerate(sites):
        removed |= {id(n) for n in old}
        first = min(index[id(n)] for n in old)
        insert_at[first] = [
            helper.make_node("Mul", [x, scale], [f"gelu_sigmoid_{k}_z"], f"gelu_sigmoid_{k}_mul"),
            helper.make_node(
                "Sigmoid", [f"gelu_sigmoid_{k}_z"], [f"gelu_sigmoid_{k}_s"], f"gelu_sigmoid_{k}_sig"
            ),
            helper.make_node("Mul", [x, f"gelu_sigmoid_{k}_s"], [out], f"gelu_sigmoid_{k}_out"),
        ]
    kept: list[onnx.NodeProto] = []
    for i, node in enumerate(nodes):
        kept += insert_at.get(i, [])
        if id(node) not in removed:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unused_constants(model)
    return len(sites)


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
    "gelu_sigmoid": gelu_sigmoid,
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


def _drop_unused_constants(model: onnx.ModelProto) -> None:
    """Initializers and Constant nodes nothing reads any more (after a rewrite removed nodes)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
