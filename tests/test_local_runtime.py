"""The local runtime: AI Hub-shaped profiles, outputs in input order."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from lpcvlab.config.schema import LocalHubConfig
from lpcvlab.hubs import ComponentJob
from lpcvlab.hubs.local import LocalHub
from lpcvlab.hubs.profile import parse_profile
from lpcvlab.types import ExportResult, TensorSpec
from lpcvlab.util.hashing import file_sha256


def _scale_model(path):
    """y = 2x over a (1, 4) input: easy to check order and values."""
    node = helper.make_node("Mul", ["x", "two"], ["output_0"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph(
        [node],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [1, 4])],
        initializer=[two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, path)
    return ExportResult(
        "scaler",
        path,
        file_sha256(path),
        TensorSpec("x", (1, 4), "float32"),
        "output_0",
        1.0,
        1,
        0.0,
    )


def test_run_components_profiles_and_keeps_order(tmp_path):
    exported = _scale_model(tmp_path / "scale.onnx")
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    rt = LocalHub(LocalHubConfig(profile_iterations=4, warmup_iterations=1))
    runs = rt.run_components([ComponentJob(exported, x)])
    run = runs["scaler"]
    np.testing.assert_array_equal(run.inference.outputs, 2 * x)
    summary = run.profile.raw["execution_summary"]
    assert len(summary["all_inference_times"]) == 4
    median = np.median(summary["all_inference_times"])
    assert abs(summary["estimated_inference_time"] - median) <= 1
    low, high = summary["inference_memory_peak_range"]
    assert 0 <= low <= high
    assert run.profile.latency_ms == summary["estimated_inference_time"] / 1000
    assert run.profile.compute_units == {"CPU": 1}


def test_parse_profile_units_and_missing_fields():
    raw = {
        "execution_summary": {
            "estimated_inference_time": 29300,
            "inference_memory_peak_range": [0, 628 * 1024 * 1024],
        },
        "execution_detail": [
            {"compute_unit": "NPU"},
            {"compute_unit": "NPU"},
            {"compute_unit": "CPU"},
        ],
    }
    p = parse_profile("image_encoder", raw, job_id="j1")
    assert p.latency_ms == 29.3
    assert p.peak_memory_mb == (0.0, 628.0)
    assert p.compute_units == {"NPU": 2, "CPU": 1}
    empty = parse_profile("x", {})
    assert np.isnan(empty.latency_ms) and np.isnan(empty.peak_memory_mb[1])
    assert empty.compute_units == {}
