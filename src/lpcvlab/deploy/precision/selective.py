"""Selective quantization: which parts of a quantized component cost most, and keeping them float.

``precision.sensitivity=true`` quantizes one group of a w8a* component at a time -- every node of
one operator type, or every node of one transformer block (from the exporter's module scopes,
``pkg.torch.onnx.name_scopes``) -- with the component's calibration data, everything else float,
and measures on the evaluation inputs the output cosine against the fp32 export and the track's
objective (the other components fp32). The table goes to ``sensitivity/<component>.csv`` with a
bar chart. ``precision.exclude=auto`` then keeps the costliest groups float, one more at a time,
until the component passes the fidelity gate alone, and logs which
(``precision_auto/<component>/kept_float``). Both use ONNX Runtime's own quantizer
(``op_types_to_quantize`` / ``nodes_to_exclude``) through :mod:`.emulate`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lpcvlab.config.schema import FidelityConfig
from lpcvlab.deploy.precision.emulate import emulate
from lpcvlab.deploy.precision.fidelity import component_fidelity, gate, metric_fidelity
from lpcvlab.deploy.precision.plan import ComponentPrecision
from lpcvlab.types import ExportResult
from lpcvlab.util.console import stage

log = logging.getLogger(__name__)

# Ops ONNX Runtime never quantizes on their own (shape and index arithmetic): not a group.
_NOT_GROUPS = {"Shape", "Gather", "Constant", "Unsqueeze", "Squeeze", "Concat", "ArgMax", "Cast"}
_BLOCK = re.compile(r"(?:resblocks|blocks|layers|stages)\.\d+$")


@dataclass(frozen=True)
class Group:
    """Nodes quantized together in the sweep: an operator type or a transformer block."""

    kind: str  # "op_type" or "layer"
    name: str
    nodes: tuple[str, ...]


@dataclass
class Row:
    group: Group
    cosine_min: float
    cosine_mean: float
    objective: float
    objective_drop: float


def _block_of(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = re.findall(r"'([^']*)'", prop.value)
            blocks = [s for s in scopes if _BLOCK.search(s)]
            return blocks[-1] if blocks else None
    return None


def groups(path: Path) -> list[Group]:
    """The op-type groups and the block groups of an exported graph (nodes named)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    by_type: dict[str, list[str]] = {}
    by_block: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type in _NOT_GROUPS or not node.name:
            continue
        by_type.setdefault(node.op_type, []).append(node.name)
        block = _block_of(node)
        if block is not None:
            by_block.setdefault(block, []).append(node.name)
    out = [Group("op_type", t, tuple(n)) for t, n in sorted(by_type.items())]
    out += [Group("layer", b, tuple(n)) for b, n in by_block.items()]
    return out


def _all_nodes(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.name]


def outputs_of(path: Path, input_name: str, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(None, {input_name: inputs[i : i + 1]})[0] for i in range(len(inputs))]
    )


Score = Callable[[np.ndarray], float]  # this component's outputs -> the track's objective


def _measure(
    exported: ExportResult,
    precision: ComponentPrecision,
    inputs: np.ndarray,
    reference: np.ndarray,
    score: Score,
    fp32_score: float,
) -> tuple[float, float, float, float]:
    quantized = emulate(exported, precision).model
    assert quantized is not None
    out = outputs_of(Path(quantized.path), exported.input.name, inputs)
    fid = component_fidelity(exported.component, reference, out)
    value = score(out)
    return (
        fid[f"fidelity_cosine_min/{exported.component}"],
        fid[f"fidelity_cosine_mean/{exported.component}"],
        value,
        fp32_score - value,
    )


def sweep(
    exported: ExportResult,
    precision: ComponentPrecision,
    inputs: np.ndarray,
    score: Score,
) -> list[Row]:
    """One row per group: only that group quantized (everything else float), costliest first."""
    path = Path(exported.path)
    reference = outputs_of(path, exported.input.name, inputs)
    fp32_score = score(reference)
    everything = _all_nodes(path)
    rows = []
    for group in groups(path):
        members = set(group.nodes)
        only = dataclasses.replace(
            precision,
            exclude_op_types=(),
            exclude_nodes=tuple(n for n in everything if n not in members),
        )
        cos_min, cos_mean, value, drop = _measure(
            exported, only, inputs, reference, score, fp32_score
        )
        rows.append(Row(group, cos_min, cos_mean, value, drop))
        log.info(
            "sensitivity %s %s %s: cosine min %.4f, objective drop %.4f",
            exported.component, group.kind, group.name, cos_min, drop,
        )  # fmt: skip
    rows.sort(key=lambda r: (r.cosine_min, -r.objective_drop))
    return rows


def write_table(rows: list[Row], directory: Path, component: str) -> list[Path]:
    """``<component>.csv`` and ``<component>.png`` (1 - cosine min per group, a bar chart)."""
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / f"{component}.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["kind", "group", "nodes", "cosine_min", "cosine_mean", "objective", "objective_drop"]
        )
        for r in rows:
            w.writerow(
                [r.group.kind, r.group.name, len(r.group.nodes), f"{r.cosine_min:.6f}",
                 f"{r.cosine_mean:.6f}", f"{r.objective:.6f}", f"{r.objective_drop:.6f}"]
            )  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    labels = [f"{r.group.kind}: {r.group.name}" for r in rows]
    ax.barh(labels[::-1], [1 - r.cosine_min for r in rows][::-1])
    ax.set_xlabel("1 - output cosine min against fp32 (only this group quantized)")
    ax.set_title(f"{component}: quantization sensitivity")
    fig.tight_layout()
    chart = directory / f"{component}.png"
    fig.savefig(chart, dpi=100)
    plt.close(fig)
    return [table, chart]


@dataclass
class AutoResult:
    precision: ComponentPrecision
    kept_float: list[Group]
    passed: bool
    metrics: dict[str, float]


def auto_exclude(
    exported: ExportResult,
    precision: ComponentPrecision,
    inputs: np.ndarray,
    score: Score,
    rows: list[Row],
    fidelity: FidelityConfig,
    objective: str,
) -> AutoResult:
    """Keep groups float, costliest first, until this component passes the fidelity gate."""
    path = Path(exported.path)
    reference = outputs_of(path, exported.input.name, inputs)
    fp32_score = score(reference)
    kept: list[Group] = []
    current = precision
    ordered = [r.group for r in rows]
    while True:
        cos_min, _, value, _ = _measure(exported, current, inputs, reference, score, fp32_score)
        metrics = {f"fidelity_cosine_min/{exported.component}": cos_min}
        metrics |= metric_fidelity(objective, value, fp32_score)
        verdict = gate(fidelity, objective, metrics)
        passed = verdict is None or verdict.passed
        log.info(
            "precision.exclude=auto %s: %d group(s) float, cosine min %.4f, gate %s",
            exported.component, len(kept), cos_min, "passed" if passed else "failed",
        )  # fmt: skip
        if passed or len(kept) == len(ordered):
            return AutoResult(current, kept, passed, metrics)
        kept.append(ordered[len(kept)])
        types = {g.name for g in kept if g.kind == "op_type"} | set(precision.exclude_op_types)
        nodes = {n for g in kept if g.kind == "layer" for n in g.nodes} | set(
            precision.exclude_nodes
        )
        current = dataclasses.replace(
            precision, exclude_op_types=tuple(sorted(types)), exclude_nodes=tuple(sorted(nodes))
        )


def selective_quantization(
    settings,
    track,
    data,
    exports: dict[str, ExportResult],
    precisions: dict[str, ComponentPrecision],
    rec,
    work_dir: Path,
) -> dict[str, ComponentPrecision]:
    """The pipeline's hook: the sweep and/or exclude=auto for every quantized component; returns
    the precisions to deploy (with the groups auto kept float) and logs the table and choices."""
    p = settings.precision
    objective = settings.track.objective
    out = dict(precisions)
    for name, precision in precisions.items():
        if not precision.quantized:
            continue
        exported = exports[name]
        inputs = data.inputs[name]
        others = {  # the other components stay fp32 while this one is measured
            n: outputs_of(Path(e.path), e.input.name, data.inputs[n])
            for n, e in exports.items()
            if n != name
        }

        def score(outs: np.ndarray, name: str = name, others: dict = others) -> float:
            with tempfile.TemporaryDirectory() as tmp:
                result = track.evaluate(data, others | {name: outs}, Path(tmp))
                return float(result.metrics[objective])

        rows = sweep(exported, precision, inputs, score)
        for path in write_table(rows, work_dir / "sensitivity", name):
            rec.log_artifact(path, "sensitivity")
        rec.log_metrics(
            {f"sensitivity/{name}/{r.group.kind}/{r.group.name}": r.cosine_min for r in rows}
        )
        if p.exclude == "auto":
            result = auto_exclude(
                exported, precision, inputs, score, rows, settings.fidelity, objective
            )
            out[name] = result.precision
            kept = ", ".join(f"{g.kind}:{g.name}" for g in result.kept_float) or "none"
            rec.set_tags(
                {
                    f"precision_auto/{name}/kept_float": kept[:5000],
                    f"precision_auto/{name}/gate": "passed" if result.passed else "failed",
                }
            )
            rec.log_metrics({f"precision_auto/{name}/groups_float": float(len(result.kept_float))})
            stage(
                "precision",
                f"exclude=auto {name}: kept float {kept}; fidelity gate "
                f"{'passed' if result.passed else 'FAILED (every group float)'} "
                f"(cosine min {result.metrics[f'fidelity_cosine_min/{name}']:.4f})",
            )
    return out
