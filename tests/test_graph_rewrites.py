"""The NPU layout rewrites (matmul_conv1x1, fold_attention_scale, drop_transposes) on real
open_clip graphs: each against PyTorch, and what each does to the operator counts."""

from __future__ import annotations

import numpy as np
import onnx
import open_clip
import pytest
import torch
from onnx import helper, numpy_helper

from lpcvlab.deploy.export import export_component, export_onnx, onnx_outputs, torch_outputs
from lpcvlab.deploy.rewrites import REWRITES, op_counts, rewritten
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.models.clip import ImageEncoder, TextEncoder
from lpcvlab.types import Component, TensorSpec

NPU = ["matmul_conv1x1", "fold_attention_scale", "drop_transposes"]
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
CONFIGS = {
    # clip_tiny (conf/backbone/clip_tiny.yaml)
    "clip_tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 64, "layers": 2,
                       "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {**TEXT, "mlp_ratio": 2.0},
    },
    # a ViT of another shape: patch 16, 3 heads of 32, 17 tokens, 4x MLP, 3 blocks
    "vit_p16": {
        "embed_dim": 48,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 96, "layers": 3,
                       "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": TEXT,
    },
}  # fmt: skip


def _samples(spec: TensorSpec, n: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    if spec.dtype == "int64":
        x = np.zeros((n, *spec.shape[1:]), dtype=np.int64)
        x[:, 0] = 49406
        x[:, 1:9] = rng.integers(1, 49000, (n, 8))
        x[:, 9] = 49407
        return x
    return rng.random((n, *spec.shape[1:]), dtype=np.float32)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """(component, plain exported graph, samples, PyTorch outputs) per config and tower."""
    out = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    found = {}
    for name, cfg in CONFIGS.items():
        model = open_clip.CLIP(**cfg).eval()
        size = cfg["vision_cfg"]["image_size"]
        comps = [
            Component(
                "image_encoder",
                ImageEncoder(model),
                TensorSpec("image", (1, 3, size, size), "float32"),
            )
        ]
        if name == "clip_tiny":
            comps.append(
                Component("text_encoder", TextEncoder(model), TensorSpec("text", (1, 77), "int64"))
            )
        for comp in comps:
            path, _ = export_onnx(comp, out)
            samples = _samples(comp.input)
            found[f"{name}/{comp.name}"] = (
                comp,
                onnx.load(str(path)),
                samples,
                torch_outputs(comp, samples),
            )
    return found


def _cosine(graph, comp, samples, reference) -> float:
    onnx.checker.check_model(graph, full_check=True)
    return float(cosine_per_sample(reference, onnx_outputs(graph, comp, samples)).min())


KEYS = ["clip_tiny/image_encoder", "clip_tiny/text_encoder", "vit_p16/image_encoder"]


@pytest.mark.parametrize("key", KEYS)
def test_matmul_conv1x1_turns_every_weight_matmul_into_a_conv(graphs, key):
    comp, plain, samples, reference = graphs[key]
    graph, sites = rewritten(plain, ["matmul_conv1x1"])
    before, after = op_counts(plain), op_counts(graph)
    layers = 3 if key.startswith("vit_p16") else 2
    # per block: qkv, out, fc, proj; plus the final projection
    assert sites["matmul_conv1x1"] == 4 * layers + 1
    # only the two activation x activation products of each attention stay MatMul
    assert after["MatMul"] == 2 * layers < before["MatMul"]
    assert "Gemm" not in after
    assert after["Conv"] == before.get("Conv", 0) + sites["matmul_conv1x1"]
    assert _cosine(graph, comp, samples, reference) >= 0.9999


@pytest.mark.parametrize("key", KEYS)
def test_fold_attention_scale_leaves_no_scale_mul(graphs, key):
    comp, plain, samples, reference = graphs[key]
    graph, sites = rewritten(plain, ["fold_attention_scale"])
    layers = 3 if key.startswith("vit_p16") else 2
    assert sites["fold_attention_scale"] == layers
    # the exporter scales Q and K^T by d^-1/4 each: both Muls go, into the q columns
    assert op_counts(graph)["Mul"] == op_counts(plain)["Mul"] - 2 * layers
    assert _cosine(graph, comp, samples, reference) >= 0.9999
    # after matmul_conv1x1 the query comes from a Conv: folded into its output channels too
    conv, _ = rewritten(plain, ["matmul_conv1x1", "fold_attention_scale"])
    assert op_counts(conv)["Mul"] == op_counts(plain)["Mul"] - 2 * layers
    assert _cosine(conv, comp, samples, reference) >= 0.9999


@pytest.mark.parametrize("key", KEYS)
def test_drop_transposes_removes_transposes_and_stays_exact(graphs, key):
    comp, plain, samples, reference = graphs[key]
    graph, sites = rewritten(plain, ["drop_transposes"])
    assert sites["drop_transposes"] > 0
    assert op_counts(graph)["Transpose"] < op_counts(plain)["Transpose"]
    assert _cosine(graph, comp, samples, reference) >= 0.9999
    # after matmul_conv1x1, the MLP's GELU runs in the convolution layout: fewer transposes
    conv, _ = rewritten(plain, ["matmul_conv1x1"])
    both, _ = rewritten(plain, ["matmul_conv1x1", "drop_transposes"])
    assert op_counts(both)["Transpose"] < op_counts(conv)["Transpose"]
    assert op_counts(both)["Reshape"] < op_counts(conv)["Reshape"]
    assert _cosine(both, comp, samples, reference) >= 0.9999


def test_all_three_through_the_exporter_are_logged_and_exact(graphs, tmp_path):
    comp, plain, samples, _ = graphs["clip_tiny/image_encoder"]
    exp = export_component(comp, samples, tmp_path, rewrites=NPU)
    assert set(exp.rewrite_cosine_min) == set(NPU)
    assert min(exp.rewrite_cosine_min.values()) >= 0.9999 and exp.parity_cosine_min >= 0.9999
    assert exp.op_counts_plain == op_counts(plain)
    assert exp.op_counts["MatMul"] < exp.op_counts_plain["MatMul"]
    assert exp.op_counts == op_counts(exp.path)


def _tiny(nodes, inits, shape_in, shape_out) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape_out)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_drop_transposes_cancels_pairs_and_folds_constant_transposes():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    model = _tiny(
        [
            helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1]),  # cancels the first
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),  # a constant's
            helper.make_node("MatMul", ["b", "wt"], ["y"]),
        ],
        {"w": w},
        [1, 5, 3],
        [1, 5, 4],
    )
    x = np.random.default_rng(0).random((2, 5, 3), dtype=np.float32)
    out, sites = rewritten(model, ["drop_transposes"])
    assert "Transpose" not in op_counts(out) and sites["drop_transposes"] >= 2
    comp = Component("c", None, TensorSpec("x", (1, 5, 3), "float32"))  # type: ignore[arg-type]
    np.testing.assert_allclose(onnx_outputs(out, comp, x), x @ w.T, rtol=1e-6)


def test_the_rewrites_are_registered():
    assert set(NPU) <= set(REWRITES)
