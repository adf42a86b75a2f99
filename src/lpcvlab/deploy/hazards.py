"""The hazard check: what in a graph would fail (or degrade) on the NPU, found on this machine.

Every graph that will be compiled -- the export, and the quantized or fp16 graph made for it
(on ``hub=aihub`` the fp16 conversion made here only for this check) -- is checked against
:data:`RULES` for the run's device, runtime, precision and track before any hub stage
(``export.lint``: ``error`` stops the run before any AI Hub job is created, ``warn`` prints and
logs, ``off`` skips). The submission contract (``track.contract``) is checked twice: on the
export's I/O as the compile options will make it, and on ``hub=aihub`` on each compiled model's
I/O as AI Hub reports it (:meth:`DeviceLint.check_compiled`, after the compile job, before its
profile and inference). Each rule has an ID, a one-line reason, the fix,
and where it comes from (the comment above it: release notes, AI Hub Models (AIHM), the QAIRT
documentation, or a public LPCVC 2026 entry that hit it). Where a source is uncertain the entry
says so.

A finding is a :class:`Hazard` (the graph will fail or silently degrade) or, for what entries
reported as risky without a failure, a note (``level="note"``): notes are printed and logged in
``lint/<component>.json`` but never stop a run and are not counted in ``lint_hazards/<component>``
nor named in the ``lint/<component>`` tag.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from lpcvlab.config.schema import LINT_MODES, AIHubConfig, RunConfig
from lpcvlab.errors import ConfigError
from lpcvlab.types import CompiledIO, DeviceTensor, RunLog, TensorSpec, io_mismatches
from lpcvlab.util import console

__all__ = [
    "LINT_MODES",
    "RULES",
    "DeviceLint",
    "Hazard",
    "LintReport",
    "Target",
    "check_graph",
    "lint_component",
]
ERROR, NOTE = "error", "note"
SEQ_LEN_MAX = 1024  # see the seq_len rule: a guard, not a published limit
SEQ_LEN_MIN_PRIME = 11  # primes below this are too short to tile at all (never seen failing)
SEQ_LEN_RISKY = frozenset({196})
# Prime lengths known to compile and run on the NPU, so not flagged: 197 is ViT-B/16 at 224 (14x14
# patches + class token), the organisers' LPCVC 2026 Track 1 baseline, profiled on XR2 Gen 2
# (Proxy) at 29.3 ms for its image encoder. Only 257 is a documented crash; other primes stay
# flagged as untested.
SEQ_LEN_ON_DEVICE = frozenset({197})
SIZE_LIMIT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Rule:
    """One known NPU hazard: what it is, why it matters, what to do."""

    id: str
    reason: str
    fix: str
    source: str
    level: str = ERROR


# The rule table. Sources, one comment per rule (the same text is in ``Rule.source``).
RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        # Public LPCVC 2026 Track 1 entry ching00001/lpcvc2026-track1 (export_onnx.py,
        # npu_utils.py): exact GELU (Erf) failed to compile on QAIRT 2.42, 2.43 and 2.45; its
        # tanh-GELU ran ~6x slower; x*sigmoid(1.702x) compiled. Erf is also absent from ONNX
        # Runtime's QNN EP op builders (see QNN_HTP_OPS).
        Rule(
            "erf",
            "Erf (exact GELU) fails to compile on recent QAIRT releases",
            "backbone.activation=gelu_sigmoid",
            "ching00001/lpcvc2026-track1 (QAIRT 2.42/2.43/2.45); ONNX Runtime QNN EP op list",
        ),
        # Same entry: a 257-token attention (16x16 patches + class token, a prime) crashed the
        # NPU's tiling. The upper limit is NOT published anywhere we found: SEQ_LEN_MAX is a
        # guard chosen above every LPCVC graph (uncertain).
        Rule(
            "seq_len",
            "an attention sequence length that is prime (257 crashed the NPU's tiling; 197, the "
            f"organisers' ViT-B/16, runs) or over {SEQ_LEN_MAX} tokens",
            "change the token count (image size / patch size, or drop/add a token) to a "
            "composite length",
            "ching00001/lpcvc2026-track1 (257 crashed); the length limit is a guess (uncertain)",
        ),
        # Same entry: 196 tokens (14x14 patches, no class token) reported as risky, no failure.
        Rule(
            "seq_len_risky",
            "an attention sequence length reported as risky on the NPU (196)",
            "profile it on a device before relying on it",
            "ching00001/lpcvc2026-track1 (196 reported risky, not a failure)",
            level=NOTE,
        ),
        # LPCVC 2026 official samples and AI Hub: int64 I/O compiles with --truncate_64bit_io
        # (int32 on the device); the organisers' Track 1 compile options carry it.
        Rule(
            "int64_io",
            "a 64-bit integer graph input or output without --truncate_64bit_io",
            "add --truncate_64bit_io to runtime.compile_options (conf/runtime/<name>.yaml) or "
            "hub.extra_compile_options",
            "LPCVC 2026 Track 1 sample compile options; AI Hub compile options documentation",
        ),
        # ONNX ops outside QNN_HTP_OPS (the op list below, with its source).
        Rule(
            "unsupported_op",
            "an operator outside the QNN HTP op set (no HTP implementation to compile to)",
            "replace the operator in the model or with an export.rewrites pass, or pick "
            "runtime=onnx (the ONNX Runtime QNN EP falls back to the CPU)",
            "ONNX Runtime QNN EP op builders (op_builder_factory.cc) and QAIRT 'Supported ONNX "
            "Ops' (80-63442-10); the two lists differ in places (uncertain at the margin)",
        ),
        # AI Hub compiles fixed shapes: a dimension without a value cannot be tiled. lpcvlab
        # exports a fixed (1, ...) input, so this catches hand-made or edited graphs.
        Rule(
            "dynamic_shape",
            "a graph input or output with a dimension that has no fixed value",
            "export with fixed shapes (lpcvlab's export does) or fix the dimension with "
            "onnx.tools.update_model_dims",
            "AI Hub compile jobs take fixed input_specs; QNN graphs are static",
        ),
        # ONNX protobuf files cannot exceed 2 GiB (external data must hold the weights), and a
        # TFLite flatbuffer cannot exceed 2 GiB in total.
        Rule(
            "size",
            "a graph over the 2 GiB protobuf limit, or over the 2 GiB flatbuffer limit on tflite",
            "save the weights as external data (one .data file), or pick a QNN runtime",
            "protobuf / flatbuffer 2 GiB limits (onnx external-data documentation, TFLite)",
        ),
        # Public Track 1 entry AmanPandey28/lpcv2026 (docs/EXPERIMENTS.md): W8A16 compiled but
        # failed at run time with MODEL_GRAPH_ERROR, after the host fidelity looked fine (image
        # cosine 0.81 measured afterwards). Its runtime is not recorded; qnn_dlc is assumed as
        # Track 1's official runtime (uncertain).
        Rule(
            "w8a16_runtime",
            "w8a16 compiled but failed on the device at run time (MODEL_GRAPH_ERROR) with this "
            "runtime",
            "use precision=fp16 or precision=w8a8 for this component, or check one w8a16 job on "
            "the device with export.lint=warn first",
            "AmanPandey28/lpcv2026 docs/EXPERIMENTS.md (runtime assumed qnn_dlc: uncertain)",
        ),
        # The submission contract (track.contract): what the organisers' harness feeds and reads.
        # LPCVC 2026 samples: Track 1 uploads `image` (1,3,224,224) float32 and `text` (1,77)
        # tokens (int32 after --truncate_64bit_io) and reads output_0; Track 2's run_inference.py
        # feeds `video` channel-last (1,T,112,112,3) float32 (AIHM compiles
        # --force_channel_last_input) and reads class_probs; the sample's README says NCTHW for
        # its example .bin, so which layout the evaluator uses is uncertain. Checked on the
        # export (the I/O the compile options will make of it) and, on hub=aihub, on each
        # compiled model (its TensorSpecs: integer I/O with a scale is quantized I/O).
        Rule(
            "io_contract",
            "an input or output of the model, as the device takes it, differs from what the "
            "organisers' harness feeds and reads (track.contract): their data does not fit it, "
            "or is read wrongly, which fails or degrades the submission silently",
            "make the export take the contract's input (preprocess.video.num_frames = "
            "track.contract.frames; the image size and context length at the contract's), keep "
            "hub.channel_last_inputs=[video] and float I/O (hub.quantize_io=false), or change "
            "track.contract when the organisers' rule changed",
            "LPCVC 2026 samples (Track 1 upload/evaluate scripts; Track 2 run_inference.py and "
            "README: layout uncertain); AIHM --force_channel_last_input; qai-hub TensorSpec",
        ),
    )
}


# Runtimes that compile through QAIRT to the HTP, where QNN_HTP_OPS applies; `onnx` runs the
# ONNX Runtime QNN EP, which falls back to the CPU for other ops, and tflite has its own delegate.
QNN_RUNTIMES = frozenset({"qnn_dlc", "qnn_context_binary", "precompiled_qnn_onnx"})
W8A16_FAILS_ON = frozenset({"qnn_dlc"})

# ONNX operators with a QNN (HTP) translation. Source: the op builders registered by ONNX
# Runtime's QNN execution provider (onnxruntime/core/providers/qnn/builder/op_builder_factory.cc,
# main branch, read December 2026), which AI Hub's precompiled_qnn_onnx and onnx targets use,
# together with the first rows of the QAIRT converter's "Supported ONNX Ops" page (80-63442-10:
# Constant, ConstantOfShape, Dropout in test mode). Shape, Identity and Range are folded into
# constants by the converter on a static graph. Erf is absent from both sources read.
QNN_HTP_OPS = frozenset(
    {
        "Abs", "Add", "And", "ArgMax", "ArgMin", "Asin", "Atan", "AveragePool",
        "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape",
        "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "DequantizeLinear", "Div",
        "Dropout", "Einsum", "Elu", "Equal", "Exp", "Expand", "Flatten", "Floor", "Gather",
        "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
        "Greater", "GreaterOrEqual", "GridSample", "HardSigmoid", "HardSwish", "Identity",
        "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual",
        "Log", "LogSoftmax", "LpNormalization", "LRN", "LSTM", "MatMul", "Max", "MaxPool",
        "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu",
        "QuantizeLinear", "Range", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "Relu", "Reshape", "Resize",
        "RMSNormalization", "Round", "ScatterElements", "ScatterND", "Shape", "Sigmoid",
        "Sign", "Sin", "Slice", "Softmax", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub",
        "Sum", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Unsqueeze",
        "Upsample", "Where",
    }
)  # fmt: skip
_OWN_RULE_OPS = frozenset({"Erf"})  # reported by their own rule, not as unsupported_op
_64BIT = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.DOUBLE})


@dataclass(frozen=True)
class Target:
    """What a graph is checked for: where and how it will be compiled.

    ``compile_options`` are the runtime's plus ``hub.extra_compile_options``; on ``hub=local``
    they are what an AI Hub run of the same config would use.
    """

    device: str
    runtime: str  # runtime.name
    target_runtime: str  # runtime.target_runtime
    compile_options: str = ""
    precision: str = "fp32"
    track: str = ""
    channel_last_inputs: frozenset[str] = frozenset({"video"})
    size_limit_bytes: int = SIZE_LIMIT_BYTES
    # track.contract.<component> (None: no contract) and whether it accepts quantized I/O
    contract: Any = None
    quantized_io: bool = False


@dataclass(frozen=True)
class Hazard:
    """One rule a graph breaks, where (node names) and how."""

    rule: str
    component: str
    message: str
    nodes: tuple[str, ...] = ()
    graph: str = "export"  # which graph: the export, or the fp16 / w8a8 graph deployed
    level: str = ERROR

    @property
    def fix(self) -> str:
        return RULES[self.rule].fix

    def line(self) -> str:
        """One line: component, rule, what, and the fix."""
        where = {"export": "", "compiled": " (compiled model)"}.get(
            self.graph, f" ({self.graph} graph)"
        )
        return f"{self.component}{where}: {self.rule}: {self.message}; fix: {self.fix}"

    def to_record(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "level": self.level,
            "graph": self.graph,
            "nodes": list(self.nodes),
            "message": self.message,
            "reason": RULES[self.rule].reason,
            "fix": self.fix,
            "source": RULES[self.rule].source,
        }


@dataclass
class LintReport:
    """Every finding of one component, over the graphs checked."""

    component: str
    findings: list[Hazard] = field(default_factory=list)

    @property
    def hazards(self) -> list[Hazard]:
        return [h for h in self.findings if h.level == ERROR]

    @property
    def notes(self) -> list[Hazard]:
        return [h for h in self.findings if h.level == NOTE]

    def tag(self) -> str:
        """``ok``, or the IDs of the rules broken, comma-separated (the ``lint/<c>`` tag)."""
        ids = sorted({h.rule for h in self.hazards})
        return ",".join(ids) if ids else "ok"

    def to_record(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "tag": self.tag(),
            "hazards": len(self.hazards),
            "findings": [h.to_record() for h in self.findings],
        }


def lint_mode(setting: str | None, hub: str) -> str:
    """``export.lint``, null resolved per hub: ``error`` on ``hub=aihub`` (a hazard costs paid
    jobs there), ``warn`` on ``hub=local``."""
    if setting is not None:
        return str(setting)
    return "error" if hub == "aihub" else "warn"


# --------------------------------------------------------------------------- the checks


def check_graph(
    path: str | Path,
    component: str,
    target: Target,
    spec: TensorSpec | None = None,
    graph: str = "export",
) -> list[Hazard]:
    """Every finding of the graph at ``path`` (``spec``: its exported input, for the layout)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    found: list[Hazard] = []

    def add(rule: str, message: str, nodes: Iterable[str] = ()) -> None:
        level = RULES[rule].level
        found.append(Hazard(rule, component, message, tuple(nodes), graph, level))

    nodes = list(_nodes(model.graph))
    erf = [_name(n) for n in nodes if n.op_type == "Erf" and n.domain in ("", "ai.onnx")]
    if erf:
        add("erf", f"{len(erf)} Erf node(s) (exact GELU)", erf)
    if target.target_runtime in QNN_RUNTIMES:
        other: dict[str, list[str]] = {}
        for n in nodes:
            custom = n.domain not in ("", "ai.onnx")
            if custom or (n.op_type not in QNN_HTP_OPS and n.op_type not in _OWN_RULE_OPS):
                key = f"{n.domain}::{n.op_type}" if custom else n.op_type
                other.setdefault(key, []).append(_name(n))
        for op, names in sorted(other.items()):
            add(
                "unsupported_op",
                f"{len(names)} {op} node(s): not in the QNN HTP op set (runtime={target.runtime})",
                names,
            )
    _check_seq_len(model, add)
    _check_io(model, target, add)
    _check_size(path, model, target, add)
    if target.precision == "w8a16" and target.target_runtime in W8A16_FAILS_ON:
        add("w8a16_runtime", f"w8a16 on runtime={target.runtime}")
    if target.contract is not None and spec is not None:
        _check_contract(model, spec, target, add)
    return found


def _nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node, those in subgraphs (If/Loop bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _check_seq_len(model: onnx.ModelProto, add: Any) -> None:
    """Attention: a Softmax over an (L, L) score matrix, L read from shape inference."""
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    if not softmax:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read has no known lengths
        return
    shapes = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input)}
    lengths: dict[int, list[str]] = {}
    for n in softmax:
        dims = shapes.get(n.input[0], [])
        if len(dims) >= 2 and dims[-1] is not None and dims[-1] == dims[-2] and dims[-1] >= 2:
            lengths.setdefault(int(dims[-1]), []).append(_name(n))
    for length, names in sorted(lengths.items()):
        if length > SEQ_LEN_MAX:
            add("seq_len", f"attention over {length} tokens, more than {SEQ_LEN_MAX}", names)
        elif length >= SEQ_LEN_MIN_PRIME and _is_prime(length) and length not in SEQ_LEN_ON_DEVICE:
            add("seq_len", f"attention over {length} tokens, a prime", names)
        elif length in SEQ_LEN_RISKY:
            add("seq_len_risky", f"attention over {length} tokens (reported risky)", names)


def _check_io(model: onnx.ModelProto, target: Target, add: Any) -> None:
    truncate = "--truncate_64bit_io" in shlex.split(target.compile_options or "")
    initializers = {i.name for i in model.graph.initializer}
    io = [
        *(("input", v) for v in model.graph.input if v.name not in initializers),
        *(("output", v) for v in model.graph.output),
    ]
    wide, dynamic = [], []
    for kind, value in io:
        elem = value.type.tensor_type.elem_type
        if elem in _64BIT:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
            wide.append(f"{kind} {value.name} ({dtype})")
        if any(d is None for d in _dims(value)) or not value.type.tensor_type.HasField("shape"):
            shape = [d.dim_param or d.dim_value or "?" for d in value.type.tensor_type.shape.dim]
            dynamic.append(f"{kind} {value.name} {shape}")
    if wide and not truncate:
        add(
            "int64_io",
            f"{', '.join(wide)} without --truncate_64bit_io in the compile options "
            f"({target.compile_options!r})",
            [w.split()[1] for w in wide],
        )
    if dynamic:
        add("dynamic_shape", ", ".join(dynamic), [d.split()[1] for d in dynamic])


def _external_bytes(path: Path, model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {kv.key: kv.value for kv in tensor.external_data}
            if "length" in info:
                total += int(info["length"])
            else:
                location = path.parent / info.get("location", "")
                total += location.stat().st_size if location.is_file() else 0
    return total


def _check_size(path: Path, model: onnx.ModelProto, target: Target, add: Any) -> None:
    graph_bytes = path.stat().st_size
    limit = int(target.size_limit_bytes)
    if graph_bytes > limit:
        add(
            "size",
            f"the graph file is {graph_bytes / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB "
            "protobuf limit",
        )
        return
    total = graph_bytes + _external_bytes(path, model)
    if target.target_runtime == "tflite" and total > limit:
        add(
            "size",
            f"graph and weights are {total / 2**20:.0f} MiB, over the {limit / 2**20:.0f} MiB "
            "TFLite flatbuffer limit",
        )


def device_input(spec: TensorSpec, channel_last_inputs: Sequence[str]) -> tuple[int, ...]:
    """The shape a compiled model takes ``spec`` in on the device (``--force_channel_last_input``
    moves the channel axis last, as :mod:`lpcvlab.hubs.aihub.settings` asks)."""
    shape = tuple(int(d) for d in spec.shape)
    if spec.name in channel_last_inputs and len(shape) >= 3 and not spec.channel_last:
        return (shape[0], *shape[2:], shape[1])
    return shape


def predicted_io(model: onnx.ModelProto, spec: TensorSpec, target: Target) -> CompiledIO:
    """The I/O a compile with ``target``'s options makes of the graph: the channel axis of a
    ``channel_last_inputs`` input moved last, 64-bit integers int32 under --truncate_64bit_io."""
    truncate = "--truncate_64bit_io" in shlex.split(target.compile_options or "")
    initializers = {i.name for i in model.graph.initializer}

    def tensor(value: onnx.ValueInfoProto) -> DeviceTensor:
        elem = value.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "float32"
        if truncate and dtype in ("int64", "uint64"):
            dtype = "int32"
        dims = tuple(d or 0 for d in _dims(value))
        if value.name == spec.name:
            dims = device_input(spec, sorted(target.channel_last_inputs))
        return DeviceTensor(value.name, dims, dtype)

    inputs = tuple(tensor(v) for v in model.graph.input if v.name not in initializers)
    return CompiledIO(inputs, tuple(tensor(v) for v in model.graph.output))


def _check_contract(model: onnx.ModelProto, spec: TensorSpec, target: Target, add: Any) -> None:
    if target.target_runtime == "onnx":
        return  # an ONNX target keeps the exported layout on purpose (AIHM does not force it)
    io = predicted_io(model, spec, target)
    for m in io_mismatches(target.contract, io, target.quantized_io):
        add("io_contract", f"{m.line()} (track.contract)", [m.tensor.split()[-1]])


def compiled_hazards(component: str, io: CompiledIO, target: Target, where: str) -> list[Hazard]:
    """The ``io_contract`` hazards of a compiled model's I/O (``where``: its compile job)."""
    if target.contract is None:
        return []
    return [
        Hazard(
            "io_contract",
            component,
            f"{m.line()} (track.contract; {where})",
            (m.tensor.split()[-1],),
            graph="compiled",
        )
        for m in io_mismatches(target.contract, io, target.quantized_io)
    ]


def lint_component(
    component: str,
    graphs: Sequence[tuple[str, str | Path]],
    target: Target,
    spec: TensorSpec | None = None,
) -> LintReport:
    """The report of one component over its graphs (``(label, path)``: the export first)."""
    report = LintReport(component)
    seen: set[tuple[str, tuple[str, ...], str]] = set()
    for label, path in graphs:
        for h in check_graph(path, component, target, spec, graph=label):
            key = (h.rule, h.nodes, h.message)
            if key not in seen:  # a config-only finding once, not once per graph
                seen.add(key)
                report.findings.append(h)
    return report


def failure_message(
    reports: Sequence[LintReport],
    mode_key: str = "export.lint",
    when: str = "before any hub job was created",
) -> str:
    """The error when ``export.lint=error`` finds hazards: one line per hazard."""
    lines = [h.line() for r in reports for h in r.hazards]
    return (
        f"{mode_key}=error: {len(lines)} device hazard(s), stopped {when} "
        f"(export.lint=warn runs anyway):\n  " + "\n  ".join(lines)
    )


# --------------------------------------------------------------------------- one run


def targets_of(s: RunConfig) -> dict[str, Target]:
    """Each component's :class:`Target` under a composed config. On ``hub=local`` the AI Hub
    settings a ``hub=aihub`` run would use (their defaults) stand in for the missing ones."""
    hub = s.hub if isinstance(s.hub, AIHubConfig) else AIHubConfig()
    options = " ".join(filter(None, [s.runtime.compile_options, hub.extra_compile_options]))
    return {
        name: Target(
            device=str(s.device.aihub_name or s.device.name),
            runtime=s.runtime.name,
            target_runtime=str(s.runtime.target_runtime),
            compile_options=options,
            precision=s.precision.of(name),
            track=s.track.name,
            channel_last_inputs=frozenset(hub.channel_last_inputs),
            contract=s.track.contract_of(name),
            quantized_io=s.track.quantized_io(),
        )
        for name in s.track.components()
    }


class DeviceLint:
    """The hazard check of one run: checks each component's graphs, prints what it finds, logs
    ``lint_hazards/<c>``, the ``lint/<c>`` tag and ``lint/<c>.json``, and stops the run
    (``export.lint=error``) with one line per hazard."""

    def __init__(self, mode: str, targets: dict[str, Target], work_dir: Path) -> None:
        if mode not in LINT_MODES:
            raise ConfigError(f"export.lint={mode!r} must be one of {', '.join(LINT_MODES)}")
        self.mode = mode
        self.targets = targets
        self.dir = Path(work_dir) / "lint"
        self._graphs: dict[str, list[tuple[str, Path]]] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._compiled: dict[str, list[Hazard]] = {}  # io_contract of the compiled models

    @classmethod
    def from_settings(cls, s: RunConfig, work_dir: Path) -> DeviceLint:
        return cls(lint_mode(s.export.lint, s.hub.name), targets_of(s), work_dir)

    def check(
        self, rec: RunLog, graphs: dict[str, tuple[str, Path]], specs: dict[str, TensorSpec]
    ) -> list[LintReport]:
        """Add one graph per component (``{component: (label, path)}``), check every graph of
        those components and record the reports; raise a ConfigError under ``error``. A graph
        already checked (the hub showed it before compiling it) is not checked again."""
        if self.mode == "off":
            return []
        graphs = {
            name: (label, Path(path))
            for name, (label, path) in graphs.items()
            if (label, Path(path)) not in self._graphs.get(name, [])
        }
        if not graphs:
            return []
        for name, (label, path) in graphs.items():
            self._graphs.setdefault(name, []).append((label, path))
            self._specs.setdefault(name, specs[name])
        return self._report(rec, list(graphs), "before any hub job was created")

    def check_compiled(self, rec: RunLog, component: str, io: CompiledIO, where: str) -> None:
        """The I/O of ``component``'s compiled model (as the hub reports it, ``where``: its
        compile job) against the submission contract: ``io_contract`` hazards, recorded with
        the component's report; a ConfigError under ``error`` before anything else is paid for."""
        if self.mode == "off":
            return
        self._compiled[component] = compiled_hazards(component, io, self.targets[component], where)
        self._report(rec, [component], f"after {where}, before its profile and inference jobs")

    def _report(self, rec: RunLog, names: list[str], when: str) -> list[LintReport]:
        reports = []
        for name in names:
            report = lint_component(
                name, self._graphs.get(name, []), self.targets[name], self._specs.get(name)
            )
            report.findings += self._compiled.get(name, [])
            self._record(rec, report)
            reports.append(report)
        summary = ", ".join(f"{r.component} {r.tag()}" for r in reports)
        console.stage(f"lint ({self.mode})", summary)
        for r in reports:
            for h in r.findings:
                level = "hazard" if h.level == ERROR else "note"
                print(f"lint {level}: {h.line()}", file=sys.stderr, flush=True)
        if self.mode == "error" and any(r.hazards for r in reports):
            raise ConfigError(failure_message(reports, when=when))
        return reports

    def _record(self, rec: RunLog, report: LintReport) -> None:
        name = report.component
        rec.log_metrics({f"lint_hazards/{name}": float(len(report.hazards))})
        rec.set_tags({f"lint/{name}": report.tag()})
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.json"
        record = report.to_record() | {
            "mode": self.mode,
            "target": asdict(self.targets[name])
            | {"channel_last_inputs": sorted(self.targets[name].channel_last_inputs)},
            "graphs": [{"graph": g, "path": str(p)} for g, p in self._graphs[name]],
        }
        path.write_text(json.dumps(record, indent=2, default=str))
        rec.log_artifact(path, "lint")
