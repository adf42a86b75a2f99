"""The graph that is deployed is the graph that is logged: an fp16 / w8a8 component's logged model
is its converted / quantized ONNX (hub=local), or the model its AI Hub quantize job made
(hub=aihub, through the fake service), with the fp32 export's model as its parent."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import mlflow.onnx
import onnx
import pytest
from mlflow.tracking import MlflowClient
from test_aihub import fake  # noqa: F401  (the fixture)
from test_pipeline_aihub import _aihub_cfg

from lpcvlab import pipeline
from lpcvlab.hubs.aihub.stages import find_onnx
from lpcvlab.tracking.registry import register_run
from lpcvlab.util.hashing import file_sha256

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


def test_a_w8a8_component_on_aihub_logs_the_quantize_jobs_model(fake, tmp_path):  # noqa: F811
    cfg = _aihub_cfg(
        tmp_path,
        "hub.poll_interval_s=0",
        "precision=mixed",
        "precision.per_component.image_encoder=fp32",
        "precision.per_component.text_encoder=w8a8",
        "precision.calibration_samples=8",
        "export.rewrites=[gelu_sigmoid,finite_mask]",
    )
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(res.run_id)
    tags = run.data.tags
    (quantize,) = fake.jobs_of("quantize")
    # The quantize job's target model came down once, through the client's Model.download.
    assert fake.model_downloads == [quantize.target_model_id]
    downloaded = find_onnx(Path(cfg.paths.cache_dir) / "aihub_models" / quantize.job_id)
    assert downloaded is not None
    assert tags["deployed_sha256/text_encoder"] == file_sha256(downloaded)
    deployed = client.get_logged_model(tags["deployed_model/text_encoder"])
    parent = client.get_logged_model(tags["parent_model/text_encoder"])
    assert deployed.tags["deployed_graph"] == "w8a8"
    assert deployed.tags["parent_model_id"] == parent.model_id != deployed.model_id
    assert deployed.tags["onnx_sha256"] == file_sha256(downloaded)
    assert parent.tags["onnx_sha256"] == tags["onnx_sha256/text_encoder"]  # the fp32 export
    assert {o.model_id for o in run.outputs.model_outputs} >= {deployed.model_id, parent.model_id}
    graph = mlflow.onnx.load_model(f"models:/{deployed.model_id}")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    fp32_ops = {n.op_type for n in mlflow.onnx.load_model(f"models:/{parent.model_id}").graph.node}
    assert "QuantizeLinear" not in fp32_ops
    # The fp32 image encoder has no deployed graph of its own; the deployed graph was linted.
    assert "deployed_model/image_encoder" not in tags
    assert tags["lint/text_encoder"] == "ok"
    lint = Path(client.download_artifacts(res.run_id, "lint/text_encoder.json", str(tmp_path)))
    assert [g["graph"] for g in json.loads(lint.read_text())["graphs"]] == ["export", "w8a8"]
    assert 0.9 < run.data.metrics["fidelity_cosine_min/text_encoder"] < 1.0

    # lpcvlab register makes the deployed graph the submission candidate, not the fp32 export.
    versions = {v.component: v for v in register_run(client, res.run_id)}
    assert versions["text_encoder"].model_id == deployed.model_id
    image = client.get_logged_model(versions["image_encoder"].model_id)  # fp32: its export
    assert image.tags["onnx_sha256"] == tags["onnx_sha256/image_encoder"]
    version = client.get_model_version(versions["text_encoder"].name, "1")
    assert version.tags["deployed_sha256"] == file_sha256(downloaded)
    assert version.tags["parent_model"] == parent.model_id

    # Again: the quantize job is reused from the ledger, and so is its downloaded file.
    again = pipeline.run(cfg, work_dir=tmp_path / "again")
    assert fake.model_downloads == [quantize.target_model_id]
    again_tags = client.get_run(again.run_id).data.tags
    assert again_tags["deployed_sha256/text_encoder"] == tags["deployed_sha256/text_encoder"]


def test_find_onnx_reads_a_file_a_zip_or_a_folder(tmp_path):
    """Model.download gives a .onnx file, or for a model with external weights a .zip of its
    ONNX directory: either way the graph inside is found."""
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"graph")
    assert find_onnx(graph) == graph
    archive = tmp_path / "zipped" / "model.onnx.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("model.onnx/model.onnx", b"graph")
        z.writestr("model.onnx/model.data", b"weights")
    found = find_onnx(archive)
    assert found is not None and found.name == "model.onnx" and found.read_bytes() == b"graph"
    assert find_onnx(archive.parent) == found  # the folder it was downloaded into
    assert find_onnx(tmp_path / "absent") is None
    (tmp_path / "other.txt").write_text("x")
    assert find_onnx(tmp_path / "other.txt") is None
