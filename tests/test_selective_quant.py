"""Selective quantization: ops and nodes kept float, the sensitivity sweep, exclude=auto."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from conftest import build_track_for, compose_config
from mlflow.tracking import MlflowClient
from test_compose import _outcome

from lpcvlab import pipeline
from lpcvlab.config.schema import FidelityConfig
from lpcvlab.deploy.export import export_component
from lpcvlab.deploy.precision import Calibration, ComponentPrecision
from lpcvlab.deploy.precision.emulate import emulate
from lpcvlab.deploy.precision.selective import auto_exclude, groups, outputs_of, sweep, write_table
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.util.hashing import array_sha256
from lpcvlab.util.seeding import seed_everything


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 49000, size=(n, 77))
    for i, end in enumerate(rng.integers(5, 40, size=n)):
        x[i, 0], x[i, end], x[i, end + 1 :] = 49406, 49407, 0
    return x.astype(np.int64)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """clip_tiny's text encoder exported as is (its -inf causal mask breaks int8 ranges)."""
    seed_everything(0)  # the random weights, whatever tests ran before in this process
    comp = next(
        c
        for c in build_track_for(compose_config("backbone=clip_tiny")).build_model().components
        if c.name == "text_encoder"
    )
    exp = export_component(comp, _tokens(4), tmp_path_factory.mktemp("onnx"))
    cal = _tokens(16, seed=1)
    return exp, ComponentPrecision("w8a8", Calibration(cal, array_sha256(cal), "eval_spread"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["precision=w8a8", "precision.exclude_op_types=[MatMull]"], "'MatMull' is not an ONNX"),
        (
            ["precision=w8a8", "precision.exclude=auto", "hub=aihub"],
            "run the selective quantization with hub=local",
        ),
        (["precision=fp16", "precision.exclude=auto"], "use precision=w8a8"),
        (["precision=w8a8", "precision.exclude=always"], "precision.exclude"),
    ],
)
def test_selective_settings_that_cannot_run_fail_at_compose(overrides, expected):
    message = _outcome("backbone=clip_tiny", *overrides)
    assert message is not None and expected in message and "\n" not in message


def test_the_sensitivity_sweep_alone_goes_with_aihub():
    assert (
        _outcome("backbone=clip_tiny", "precision=w8a8", "precision.sensitivity=true", "hub=aihub")
        is None
    )


def test_excluded_op_types_and_nodes_stay_float(text):
    exp, w8a8 = text
    plain = onnx.load(str(emulate(exp, w8a8).model.path))
    kept = dataclasses.replace(w8a8, exclude_op_types=("MatMul",), exclude_nodes=("node_gelu",))
    assert kept.key() != w8a8.key()  # a different deployment, a different cache entry
    graph = onnx.load(str(emulate(exp, kept).model.path))

    def weights(model):  # where each weight MatMul's constant weight comes from
        inits = {i.name for i in model.graph.initializer}
        made = {o: n for n in model.graph.node for o in n.output}

        def of(name):
            if name in inits:
                return "float"
            node = made.get(name)
            dq = node is not None and node.op_type == "DequantizeLinear"
            return "int8" if dq and node.input[0] in inits else None

        return [
            of(n.input[1]) for n in model.graph.node if n.op_type == "MatMul" and of(n.input[1])
        ]

    def quantized(model, tensor):
        return any(n.op_type == "QuantizeLinear" and n.input[0] == tensor for n in model.graph.node)

    assert weights(plain) and set(weights(plain)) == {"int8"}
    assert weights(graph) and set(weights(graph)) == {"float"}
    assert quantized(plain, "gelu") and not quantized(graph, "gelu")  # node_gelu's output


def test_sweep_finds_the_mask_and_auto_keeps_it_float(text, tmp_path):
    exp, w8a8 = text
    inputs = _tokens(12, seed=3)
    reference = outputs_of(exp.path, exp.input.name, inputs)

    def score(outs: np.ndarray) -> float:  # a stand-in objective: mean cosine to fp32
        return float(cosine_per_sample(reference, outs).mean())

    found = {(g.kind, g.name) for g in groups(exp.path)}
    assert {("op_type", "MatMul"), ("op_type", "Add")} <= found
    assert ("layer", "model.transformer.resblocks.1") in found
    rows = sweep(exp, w8a8, inputs, score)
    assert [r.cosine_min for r in rows] == sorted(r.cosine_min for r in rows)
    # the additive -inf mask: quantizing the Adds alone destroys the output
    assert rows[0].group.name in ("Add", "model.transformer.resblocks.0")
    assert rows[0].cosine_min < 0.5 and rows[-1].cosine_min > 0.999
    table, chart = write_table(rows, tmp_path, "text_encoder")
    assert table.read_text().splitlines()[0].startswith("kind,group,nodes,cosine_min")
    assert chart.stat().st_size > 0
    fidelity = FidelityConfig(cosine_min=0.95, metric_drop_max=None)
    result = auto_exclude(exp, w8a8, inputs, score, rows, fidelity, "score")
    assert result.passed and result.kept_float and len(result.kept_float) < len(rows)
    assert result.metrics["fidelity_cosine_min/text_encoder"] >= 0.95
    assert "Add" in result.precision.exclude_op_types or result.precision.exclude_nodes


@pytest.mark.slow
def test_a_run_logs_the_table_and_the_groups_kept_float(cfg_factory, tmp_path):
    cfg = cfg_factory(
        "precision=w8a8",
        "precision.calibration_samples=12",
        "precision.sensitivity=true",
        "precision.exclude=auto",
    )
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(res.run_id)
    arts = {a.path for a in client.list_artifacts(res.run_id, "sensitivity")}
    assert {"sensitivity/text_encoder.csv", "sensitivity/image_encoder.png"} <= arts
    assert run.data.tags["precision_auto/text_encoder/gate"] == "passed"
    assert run.data.tags["precision_auto/text_encoder/kept_float"] != "none"
    assert run.data.metrics["fidelity_cosine_min/text_encoder"] >= 0.95
