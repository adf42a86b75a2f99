"""Layout rewrites of an exported ONNX graph for the NPU: token MatMuls as 1x1 convolutions, the
attention scale folded into the query projection, transposes removed (see
:mod:`lpcvlab.deploy.rewrites`, which registers them under ``export.rewrites``).

Each pass changes the graph in place and returns how many sites it changed. They read static
shapes from ONNX shape inference (the exported inputs are fixed ``(1, ...)``), never guess one,
and leave a site alone when a shape is unknown or a weight is not a constant. Dead code goes with
onnx_ir's ``RemoveUnusedNodesPass``; transpose pairs, identity transposes and Reshape chains with
onnxscript's rewrite rules (:data:`LAYOUT_RULES`); the rest is matched here, where no library
rule does it (measured: the same sites, op counts and bitwise ONNX Runtime outputs as the
hand-written rules they replaced, on clip_tiny and ViT-B/16 exports).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper, shape_inference
from onnx_ir.passes.common import IdentityEliminationPass, RemoveUnusedNodesPass
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import (
    no_op_transpose_rule,
    reshape_reshape_rule,
    transpose_transpose_rule,
)

# Ops that only move or select elements: a scalar factor commutes with them.
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Identity", "Flatten")


class GraphIndex:
    """One graph's producers, consumers, constants and (on first use) static shapes: what every
    pattern-matching pass here looks nodes up in."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.outputs = {o.name for o in model.graph.output}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._fresh = 0

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shapes from ONNX shape inference (computed once, when a pass first asks)."""
        if self._shapes is None:
            inferred = shape_inference.infer_shapes(self.model, data_prop=True)
            shapes: dict[str, tuple[int, ...]] = {}
            g = inferred.graph
            for v in [*g.value_info, *g.input, *g.output]:
                dims = v.type.tensor_type.shape.dim
                if v.type.tensor_type.HasField("shape") and all(
                    d.HasField("dim_value") for d in dims
                ):
                    shapes[v.name] = tuple(d.dim_value for d in dims)
            for name, init in self.inits.items():
                shapes[name] = tuple(init.dims)
            self._shapes = shapes
        return self._shapes

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        if value is None or value.size != 1 or value.dtype.kind != "f":
            return None
        return float(value.reshape(-1)[0])

    def only(self, name: str) -> onnx.NodeProto | None:
        """The single consumer of ``name`` (None if it has several or is a graph output)."""
        found = self.consumers.get(name, [])
        return found[0] if len(found) == 1 and name not in self.outputs else None

    def add_const(self, stem: str, value: np.ndarray) -> str:
        """A new initializer with a fresh name; returns the name."""
        while True:
            self._fresh += 1
            name = f"{stem}_{self._fresh}"
            if name not in self.inits and name not in self.producer:
                break
        init = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.model.graph.initializer.append(init)
        self.inits[name] = init
        return name


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _rebuild(
    model: onnx.ModelProto,
    replace: dict[int, list[onnx.NodeProto]],
    rename: dict[str, str],
) -> None:
    """Replace nodes (by ``id``; an empty list removes one), rename inputs, drop dead nodes and
    initializers, and forget stale shapes."""

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        nodes += replace.get(id(node), [node])
    for node in nodes:
        for i, name in enumerate(node.input):
            if name:
                node.input[i] = resolve(name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _through_ir(model, lambda m: RemoveUnusedNodesPass()(m).modified)
    del model.graph.value_info[:]


def _through_ir(model: onnx.ModelProto, run: Callable[[ir.Model], int]) -> int:
    """``run`` on the graph as an onnx_ir model, written back in place (its stale shapes dropped)
    when it changed something; what it returned (sites changed)."""
    ir_model = ir.from_proto(model)
    changed = run(ir_model)
    if changed:
        model.CopyFrom(ir.to_proto(ir_model))
        del model.graph.value_info[:]
    return changed


# --------------------------------------------------------------------------- matmul_conv1x1


def _projection(net: GraphIndex, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """(x, weight as (K, N)) of a MatMul/Gemm by a constant weight, else None."""
    if node.op_type == "MatMul":
        w = net.const(node.input[1])
        return (node.input[0], w) if w is not None and w.ndim == 2 else None
    if node.op_type == "Gemm" and not _attr(node, "transA", 0):
        w = net.const(node.input[1])
        if w is None or w.ndim != 2:
            return None
        w = w.T if _attr(node, "transB", 0) else w
        return node.input[0], w * np.float32(_attr(node, "alpha", 1.0))
    return None


def matmul_conv1x1(model: onnx.ModelProto) -> int:
    """Every MatMul/Gemm of activations ``(..., T, K)`` by a constant ``(K, N)`` as a 1x1 Conv
    on ``(1, K, 1, T)``, a following bias Add folded into it."""
    net = GraphIndex(model)
    replace: dict[int, list[onnx.NodeProto]] = {}
    sites = 0
    for node in list(model.graph.node):
        found = _projection(net, node)
        if found is None or id(node) in replace:
            continue
        x, w = found
        shape = net.shapes.get(x)
        if shape is None or len(shape) < 1 or shape[-1] != w.shape[0] or w.dtype.kind != "f":
            continue
        k, n = w.shape
        m = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        bias = np.zeros(n, dtype=w.dtype)
        out = node.output[0]
        taken = [node]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = net.const(node.input[2])
            if c is None or c.size != n:
                continue
            bias = bias + np.float32(_attr(node, "beta", 1.0)) * c.reshape(-1)
        add = net.only(out)
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = net.const(other)
            if b is not None and b.size == n and b.shape[-1:] == (n,):
                bias = bias + b.reshape(-1)
                out = add.output[0]
                taken.append(add)
        stem = node.name or f"conv1x1_{sites}"
        weight = net.add_const(f"{stem}_conv_w", w.T.reshape(n, k, 1, 1).astype(w.dtype))
        bias_name = net.add_const(f"{stem}_conv_b", bias.astype(w.dtype))
        to4 = net.add_const(f"{stem}_in_shape", np.array([1, 1, m, k], dtype=np.int64))
        back = net.add_const(f"{stem}_out_shape", np.array([*shape[:-1], n], dtype=np.int64))
        t = f"{stem}_conv"
        replace[id(node)] = [
            helper.make_node("Reshape", [x, to4], [f"{t}_r"], f"{t}_reshape_in"),
            helper.make_node("Transpose", [f"{t}_r"], [f"{t}_x"], f"{t}_nchw", perm=[0, 3, 1, 2]),
            helper.make_node(
                "Conv", [f"{t}_x", weight, bias_name], [f"{t}_y"], t, kernel_shape=[1, 1]
            ),
            helper.make_node("Transpose", [f"{t}_y"], [f"{t}_t"], f"{t}_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"{t}_t", back], [out], f"{t}_reshape_out"),
        ]
        for extra in taken[1:]:
            replace[id(extra)] = []
        sites += 1
    if sites:
        _rebuild(model, replace, {})
    return sites


# --------------------------------------------------------------------------- fold_attention_scale


def _layout(node: onnx.NodeProto, net: GraphIndex, x: np.ndarray) -> np.ndarray | None:
    """A layout-only op applied to an index array (None: not one, or its parameters unknown)."""
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Transpose":
        perm = _attr(node, "perm")
        return np.transpose(x, perm) if perm is not None else x.T
    if op == "Flatten":
        axis = _attr(node, "axis", 1) % max(x.ndim, 1)
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    if op == "Reshape":
        shape = net.const(node.input[1])
        if shape is None:
            return None
        dims = [
            x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else int(d)
            for i, d in enumerate(shape.tolist())
        ]
        return x.reshape(dims)
    if op in ("Squeeze", "Unsqueeze"):
        axes = net.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        axes = _attr(node, "axes") if axes is None else axes.tolist()
        if op == "Unsqueeze":
            return np.expand_dims(x, tuple(axes)) if axes is not None else None
        return np.squeeze(x, tuple(axes)) if axes is not None else np.squeeze(x)
    if op == "Gather":
        idx = net.const(node.input[1])
        return None if idx is None else np.take(x, idx, axis=_attr(node, "axis", 0))
    return None


def _query_projection(net: GraphIndex, q: str) -> tuple[onnx.NodeProto, str, int] | None:
    """(projection node, the tensor it writes, its channel axis): ``q`` traced back through
    layout-only ops to a MatMul(+Add)/Gemm/Conv by constant weights."""
    name = q
    for _ in range(16):
        node = net.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Add":  # a bias after a MatMul
            for i, j in ((0, 1), (1, 0)):
                inner = net.producer.get(node.input[i])
                if (
                    inner is not None
                    and inner.op_type == "MatMul"
                    and net.const(node.input[j]) is not None
                    and _projection(net, inner) is not None
                    and net.only(inner.output[0]) is node
                ):
                    return node, name, -1
            return None
        if node.op_type in ("MatMul", "Gemm") and _projection(net, node) is not None:
            return node, name, -1
        if node.op_type == "Conv" and net.const(node.input[1]) is not None:
            return node, name, 1
        if node.op_type not in LAYOUT_OPS:
            return None
        name = node.input[0]
    return None


def _channels_reaching(
    net: GraphIndex, start: str, axis: int, target: str
) -> tuple[set[int], list[set[int]]] | None:
    """The channels of ``start`` that reach ``target`` through layout-only ops, and those of
    every other branch that reads ``start`` (None if a branch cannot be followed)."""
    shape = net.shapes.get(start)
    if shape is None:
        return None
    probe = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    channel = np.unravel_index(probe, shape)[axis % len(shape)]
    hit: set[int] | None = None
    others: list[set[int]] = []
    todo = [(start, probe)]
    while todo:
        name, value = todo.pop()
        if name == target:
            hit = set(np.unique(channel.reshape(-1)[value.reshape(-1)]).tolist())
            continue
        readers = net.consumers.get(name, [])
        if name in net.outputs:
            others.append(set(np.unique(channel.reshape(-1)[value.reshape(-1)]).tolist()))
        for node in readers:
            moved = _layout(node, net, value) if node.input[0] == name else None
            if moved is None:
                others.append(set(np.unique(channel.reshape(-1)[value.reshape(-1)]).tolist()))
            else:
                todo.append((node.output[0], moved))
    return (hit, others) if hit is not None else None


def _scale_channels(
    net: GraphIndex, proj: onnx.NodeProto, channels: set[int], factor: float
) -> dict[int, list[onnx.NodeProto]]:
    """Copies of the projection's weight and bias with ``channels`` scaled by ``factor``."""
    cols = np.array(sorted(channels), dtype=np.int64)
    new = onnx.NodeProto()
    new.CopyFrom(proj)
    replaced = {id(proj): [new]}
    if proj.op_type == "Add":
        mat = net.producer[proj.input[0]] if proj.input[0] in net.producer else None
        if mat is None or mat.op_type != "MatMul":
            mat, bias_at = net.producer[proj.input[1]], 0
        else:
            bias_at = 1
        b = net.const(proj.input[bias_at]).copy()
        b[..., cols] *= np.float32(factor)
        new.input[bias_at] = net.add_const(f"{proj.name}_scaled_b", b)
        w = net.const(mat.input[1]).copy()
        w[:, cols] *= np.float32(factor)
        new_mat = onnx.NodeProto()
        new_mat.CopyFrom(mat)
        new_mat.input[1] = net.add_const(f"{mat.name}_scaled_w", w)
        replaced[id(mat)] = [new_mat]
        return replaced
    w = net.const(proj.input[1]).copy()
    if proj.op_type == "MatMul":
        w[:, cols] *= np.float32(factor)
    elif proj.op_type == "Gemm":
        if _attr(proj, "transB", 0):
            w[cols] *= np.float32(factor)
        else:
            w[:, cols] *= np.float32(factor)
    else:  # Conv: output channels first
        w[cols] *= np.float32(factor)
    new.input[1] = net.add_const(f"{proj.name or 'proj'}_scaled_w", w)
    if len(proj.input) > 2 and proj.input[2]:
        b = net.const(proj.input[2])
        if b is not None:
            b = b.copy()
            b[..., cols] *= np.float32(factor)
            new.input[2] = net.add_const(f"{proj.name or 'proj'}_scaled_b", b)
    return replaced


def _scale_of(net: GraphIndex, node: onnx.NodeProto | None, through: str) -> float | None:
    """The factor a scalar Mul/Div applies to ``through``, else None."""
    if node is None or node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    if node.op_type == "Div":
        s = net.scalar(node.input[1]) if node.input[0] == through else None
        return 1.0 / s if s else None
    other = node.input[1] if node.input[0] == through else node.input[0]
    return net.scalar(other)


def _reaches_softmax(net: GraphIndex, name: str) -> bool:
    node = net.only(name)
    if node is not None and node.op_type in ("Add", "Where"):  # an attention mask
        node = net.only(node.output[0])
    return node is not None and node.op_type == "Softmax"


def fold_attention_scale(model: onnx.ModelProto) -> int:
    """Fold the scalar scale of each attention's ``Q K^T`` into the query projection (or, when
    the query cannot be traced to constant weights, into one Mul on Q)."""
    net = GraphIndex(model)
    replace: dict[int, list[onnx.NodeProto]] = {}
    rename: dict[str, str] = {}
    sites = 0
    for scores in list(model.graph.node):
        if scores.op_type != "MatMul" or _projection(net, scores) is not None:
            continue
        factor, removed, inputs = 1.0, [], list(scores.input)
        for i, name in enumerate(scores.input):
            node = net.producer.get(name)
            if node is not None and net.only(name) is scores:
                dyn = [x for x in node.input if net.const(x) is None]
                s = _scale_of(net, node, dyn[0]) if len(dyn) == 1 else None
                if s is not None:
                    factor *= s
                    removed.append(node)
                    inputs[i] = dyn[0]
        out = scores.output[0]
        after = net.only(out)
        s = _scale_of(net, after, out)
        if s is not None:
            factor *= s
            removed.append(after)
            out = after.output[0]
        if not removed or not _reaches_softmax(net, out):
            continue
        if any(id(n) in replace for n in [scores, *removed]):
            continue
        q = inputs[0]
        found = _query_projection(net, q)
        reach = _channels_reaching(net, found[1], found[2], q) if found is not None else None
        new_scores = onnx.NodeProto()
        new_scores.CopyFrom(scores)
        del new_scores.input[:]
        new_scores.input.extend(inputs)
        if reach is not None and all(not (reach[0] & other) for other in reach[1]):
            proj = found[0]
            if any(id(n) in replace for n in (proj, net.producer.get(proj.input[0]))):
                continue
            replace |= _scale_channels(net, proj, reach[0], factor)
            replace[id(scores)] = [new_scores]
        else:  # one Mul on Q instead of two
            k = net.add_const("attention_scale", np.array(factor, dtype=np.float32))
            mul = helper.make_node("Mul", [q, k], [f"{q}_scaled"], f"{scores.name}_scale")
            new_scores.input[0] = f"{q}_scaled"
            replace[id(scores)] = [mul, new_scores]
        for node in removed:
            replace[id(node)] = []
        if out != scores.output[0]:
            rename[out] = scores.output[0]
            if out in net.outputs:
                continue
        sites += 1
    if sites:
        _rebuild(model, replace, rename)
    return sites


# --------------------------------------------------------------------------- drop_transposes


def _perm(node: onnx.NodeProto, rank: int) -> list[int]:
    perm = _attr(node, "perm")
    return list(perm) if perm is not None else list(reversed(range(rank)))


def _only_unit_axes_move(shape: Iterable[int], perm: list[int]) -> bool:
    """True when the transpose keeps the order of every axis longer than 1 (a Reshape)."""
    shape = list(shape)
    big = [p for p in perm if shape[p] != 1]
    return big == sorted(big)


# onnxscript's own rules: identity permutations, transpose pairs (cancelled, or composed into
# one), Reshape chains (into the last one). What they leave is the Identity of a cancelled pair.
LAYOUT_RULES = RewriteRuleSet(
    [no_op_transpose_rule, transpose_transpose_rule, reshape_reshape_rule]
)


def _layout_rules(model: ir.Model) -> int:
    """:data:`LAYOUT_RULES` once, then the Identity nodes and dead code they leave removed."""
    changed = LAYOUT_RULES.apply_to_model(model)
    if changed:
        IdentityEliminationPass()(model)
        RemoveUnusedNodesPass()(model)
    return changed


def _drop_once(model: onnx.ModelProto) -> int:
    """What :data:`LAYOUT_RULES` lacks: transposes of constants (folded into them) and of axes
    of size 1 only (a Reshape), and Reshapes that change no shape."""
    net = GraphIndex(model)
    replace: dict[int, list[onnx.NodeProto]] = {}
    rename: dict[str, str] = {}
    changed = 0

    def bypass(node: onnx.NodeProto, to: str) -> bool:
        if node.output[0] in net.outputs:
            return False
        rename[node.output[0]] = to
        replace[id(node)] = []
        return True

    for node in model.graph.node:
        if id(node) in replace:
            continue
        src = node.input[0] if node.input else ""
        prev = net.producer.get(src)
        if prev is not None and id(prev) in replace:
            continue  # one change per chain per round
        shape_in = net.shapes.get(src)
        shape_out = net.shapes.get(node.output[0]) if node.output else None
        if node.op_type == "Transpose":
            value = net.const(src)
            if value is not None:  # absorbed into the constant
                folded = net.add_const(f"{src}_t", np.transpose(value, _perm(node, value.ndim)))
                changed += bypass(node, folded)
                continue
            if shape_in is None:
                continue
            perm = _perm(node, len(shape_in))
            if _only_unit_axes_move(shape_in, perm) and shape_out is not None:
                target = net.add_const(f"{node.name}_shape", np.array(shape_out, dtype=np.int64))
                replace[id(node)] = [
                    helper.make_node("Reshape", [src, target], list(node.output), node.name)
                ]
                changed += 1
        elif node.op_type == "Reshape" and shape_out is not None:
            if shape_in == shape_out:
                changed += bypass(node, src)
    if changed:
        _rebuild(model, replace, rename)
    return changed


ELEMENTWISE = (
    "Add", "Sub", "Mul", "Div", "Pow", "Erf", "Sigmoid", "Relu", "Tanh", "Neg", "Abs", "Sqrt",
    "Exp", "Clip", "Identity",
)  # fmt: skip


def _layout_chain_back(net: GraphIndex, name: str) -> list[onnx.NodeProto]:
    """The layout-only ops (outermost last) that produced ``name``, up to 4, each read once."""
    chain: list[onnx.NodeProto] = []
    while len(chain) < 4:
        node = net.producer.get(name)
        if node is None or node.op_type not in LAYOUT_OPS or net.only(node.input[0]) is not node:
            break
        chain.insert(0, node)
        name = node.input[0]
    return chain


def _cancel_around_elementwise(model: onnx.ModelProto) -> int:
    """A layout change, elementwise ops by scalars, then its inverse (a GELU between two 1x1
    convolutions): the elementwise ops run on the original layout and both changes go."""
    net = GraphIndex(model)
    replace: dict[int, list[onnx.NodeProto]] = {}
    rename: dict[str, str] = {}
    done = 0
    for entry in model.graph.node:
        if entry.op_type not in LAYOUT_OPS or id(entry) in replace:
            continue
        x = entry.output[0]
        readers = net.consumers.get(x, [])
        if not readers or x in net.outputs or any(r.op_type not in ELEMENTWISE for r in readers):
            continue
        region, exits, ok, todo = {}, [], True, list(readers)
        while todo and ok:
            node = todo.pop()
            if id(node) in region:
                continue
            region[id(node)] = node
            for i in node.input:
                if i != x and net.producer.get(i) not in region.values() and net.scalar(i) is None:
                    if net.producer.get(i) is None or net.producer[i].op_type not in ELEMENTWISE:
                        ok = False
            out = node.output[0]
            if out in net.outputs:
                ok = False
            for reader in net.consumers.get(out, []):
                if reader.op_type in ELEMENTWISE:
                    todo.append(reader)
                else:
                    exits.append((out, reader))
        # every region input is x, a scalar or a region output (checked again now it is whole)
        inside = {o for n in region.values() for o in n.output}
        if not ok or any(
            i != x and i not in inside and net.scalar(i) is None
            for n in region.values()
            for i in n.input
        ):
            continue
        if len(exits) != 1 or exits[0][1].op_type not in LAYOUT_OPS:
            continue
        back = _layout_chain_back(net, x)
        source = back[0].input[0] if back else None
        shape = net.shapes.get(source) if source else None
        if not back or shape is None:
            continue
        probe = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        value = probe
        for node in back:
            value = _layout(node, net, value)
            if value is None:
                break
        if value is None:
            continue
        y, node = exits[0]
        for _ in range(4):  # the inverse chain after the region
            if node is None or node.op_type not in LAYOUT_OPS:
                break
            value = _layout(node, net, value)
            if value is None:
                break
            if value.shape == probe.shape and np.array_equal(value, probe):
                if node.output[0] in net.outputs:
                    break
                for n in region.values():
                    new = onnx.NodeProto()
                    new.CopyFrom(n)
                    for i, name in enumerate(new.input):
                        if name == x:
                            new.input[i] = source
                    replace[id(n)] = [new]
                rename[node.output[0]] = y
                done += 1
                break
            node = net.only(node.output[0])
    if done:
        _rebuild(model, replace, rename)
    return done


def drop_transposes(model: onnx.ModelProto) -> int:
    """Remove what only moves data and can go: cancelling or composable transposes (directly or
    around elementwise ops by scalars), transposes of constants and of axes of size 1, chained or
    identity Reshapes; the sites changed."""
    total = 0
    for _ in range(64):  # each round shortens the graph; a fixed point comes fast
        changed = (
            _through_ir(model, _layout_rules)
            or _drop_once(model)
            or _cancel_around_elementwise(model)
        )
        if not changed:
            break
        total += changed
    return total
