"""The graph that is deployed is the graph that is logged (hub=local): an fp16 / w8a8 component's
logged model is its converted / quantized ONNX, with the fp32 export's model as its parent."""

from __future__ import annotations

import mlflow.onnx
import onnx
import pytest
from mlflow.tracking import MlflowClient

from lpcvlab import pipeline

pytestmark = pytest.mark.slow


def test_fp16_and_w8a8_components_log_their_deployed_graphs(cfg_factory, tmp_path):
    cfg = cfg_factory(
        "precision=mixed",
        "precision.per_component.image_encoder=fp16",
        "precision.per_component.text_encoder=w8a8",
        "precision.calibration_samples=8",
        "export.rewrites=[gelu_sigmoid,finite_mask]",
    )
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(res.run_id)
    tags = run.data.tags
    assert tags["lint/image_encoder"] == "ok" and tags["lint/text_encoder"] == "ok"
    graphs = {}
    for comp, precision in (("image_encoder", "fp16"), ("text_encoder", "w8a8")):
        deployed = client.get_logged_model(tags[f"deployed_model/{comp}"])
        parent = client.get_logged_model(tags[f"parent_model/{comp}"])
        assert deployed.tags["deployed_graph"] == precision
        assert deployed.tags["parent_model_id"] == parent.model_id
        assert deployed.tags["onnx_sha256"] == tags[f"deployed_sha256/{comp}"]
        assert tags[f"deployed_sha256/{comp}"] == tags[f"onnx_sha256/{comp}/{precision}"]
        assert parent.tags["onnx_sha256"] == tags[f"onnx_sha256/{comp}"]  # the fp32 export
        assert {o.model_id for o in run.outputs.model_outputs} >= {
            deployed.model_id,
            parent.model_id,
        }
        graphs[comp] = mlflow.onnx.load_model(f"models:/{deployed.model_id}")
    image_types = {t.data_type for t in graphs["image_encoder"].graph.initializer}
    assert onnx.TensorProto.FLOAT16 in image_types
    text_ops = {n.op_type for n in graphs["text_encoder"].graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= text_ops
