"""The graph that is deployed is the graph that is logged: an fp16 / w8a8 component's logged model
is its converted / quantized ONNX (hub=local), or the model its AI Hub quantize job made
(hub=aihub, through the fake service), with the fp32 export's model as its parent."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import mlflow.onnx
import onnx
import pytest
from aihub_fake import _load_onnx
from mlflow.tracking import MlflowClient
from test_aihub import fake  # noqa: F401  (the fixture)
from test_pipeline_aihub import _aihub_cfg

from lpcvlab import pipeline
from lpcvlab.deploy.hazards import DeviceLint
from lpcvlab.hubs.aihub.stages import find_onnx
from lpcvlab.tracking.registry import register_run
from lpcvlab.util.hashing import file_sha256


@pytest.mark.slow
def test_fp16_and_w8a8_components_log_their_deployed_graphs(cfg_factory, tmp_path):
    cfg = cfg_factory(
        "precision=mixed",
        "precision.per_component.image_encoder=fp16",
        "precision.per_component.text_encoder=w8a8",
        "precision.calibration_samples=8",
        "backbone.activation=gelu_sigmoid",
        "export.rewrites=[finite_mask]",
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


@pytest.mark.slow
def test_a_w8a8_component_on_aihub_logs_the_quantize_jobs_model(
    fake,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    cfg, res, run, seen = _aihub_run(
        fake, tmp_path, monkeypatch, "fp32", "w8a8", "precision.calibration_samples=8"
    )
    client = MlflowClient(cfg.tracking.uri)
    tags = run.data.tags
    (quantize,) = fake.jobs_of("quantize")
    # The quantized graph came down and was linted before the compile job that takes it.
    assert ("text_encoder", "w8a8", 0) in seen
    # The quantize job's target model came down once, through the client's Model.download,
    # and so did each device compile's target model (what runs: the deployed artifact).
    device = [
        j for j in fake.jobs_of("compile") if "--target_runtime onnx" not in j.request.options
    ]
    downloads = sorted([quantize.target_model_id, *(j.target_model_id for j in device)])
    assert sorted(fake.model_downloads) == downloads
    downloaded = find_onnx(Path(cfg.paths.cache_dir) / "aihub_models" / quantize.job_id)
    assert downloaded is not None
    assert tags["onnx_sha256/text_encoder/w8a8"] == file_sha256(downloaded)
    (text_compile,) = [j for j in device if "text_encoder" in j.request.name]
    compiled = hashlib.sha256(fake.models[text_compile.target_model_id].data).hexdigest()
    assert tags["deployed_sha256/text_encoder"] == compiled  # the .dlc, not the QDQ ONNX
    assert tags["deployed_artifact/text_encoder"].endswith(".dlc")
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
    assert version.tags["deployed_sha256"] == compiled
    assert version.tags["parent_model"] == parent.model_id

    # Again: the quantize job is reused from the ledger, and so are the downloaded files.
    again = pipeline.run(cfg, work_dir=tmp_path / "again")
    assert sorted(fake.model_downloads) == downloads
    again_tags = client.get_run(again.run_id).data.tags
    assert again_tags["deployed_sha256/text_encoder"] == tags["deployed_sha256/text_encoder"]


def _checks_before_compiles(monkeypatch, fake):  # noqa: F811
    """Every graph the device lint sees, with the device compile jobs (not AIHM's compile to an
    ONNX target before quantizing) its component had by then."""
    seen: list[tuple[str, str, int]] = []
    check = DeviceLint.check

    def counting(self, rec, graphs, specs):
        for name, (label, _) in graphs.items():
            compiles = [
                j
                for j in fake.jobs_of("compile")
                if name in j.request.name and "--target_runtime onnx" not in j.request.options
            ]
            seen.append((name, label, len(compiles)))
        return check(self, rec, graphs, specs)

    monkeypatch.setattr(DeviceLint, "check", counting)
    return seen


def _aihub_run(fake, tmp_path, monkeypatch, image: str, text: str, *extra: str):  # noqa: F811
    """One pipeline run on the fake AI Hub with these precisions (hazard-free graphs): its
    config, result, MLflow run and the graphs the lint saw (see _checks_before_compiles)."""
    cfg = _aihub_cfg(
        tmp_path,
        "hub.poll_interval_s=0",
        "precision=mixed",
        f"precision.per_component.image_encoder={image}",
        f"precision.per_component.text_encoder={text}",
        "backbone.activation=gelu_sigmoid",
        "export.rewrites=[finite_mask]",
        *extra,
    )
    seen = _checks_before_compiles(monkeypatch, fake)
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    return cfg, res, MlflowClient(cfg.tracking.uri).get_run(res.run_id), seen


@pytest.mark.slow
def test_an_fp16_component_on_aihub_uploads_the_fp32_export_and_logs_the_compiled_model(
    fake,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """fp16 as AIHM makes it: the fp32 export goes up with the runtime's fp16 options; the fp16
    graph converted here is only linted; what AI Hub built (the compile job's .dlc) is logged
    as the deployed artifact and deployed_sha256 names it."""
    cfg, res, run, seen = _aihub_run(fake, tmp_path, monkeypatch, "fp16", "fp32")
    client = MlflowClient(cfg.tracking.uri)
    tags = run.data.tags
    assert fake.jobs_of("quantize") == []
    (compile_job,) = [j for j in fake.jobs_of("compile") if "image_encoder" in j.request.name]
    options = compile_job.request.options
    assert "--quantize_full_type float16" in options and "--quantize_io" not in options
    assert "--qairt_version 2.42" in options
    # what went up is the fp32 export itself
    uploaded = _load_onnx(fake.models[compile_job.request.model.model_id])
    export = onnx.load(str(next(Path(cfg.paths.cache_dir, "onnx").glob("image_encoder-*.onnx"))))
    assert uploaded.graph.SerializeToString() == export.graph.SerializeToString()
    assert tags["onnx_sha256/image_encoder"] == file_sha256(
        next(Path(cfg.paths.cache_dir, "onnx").glob("image_encoder-*.onnx"))
    )
    assert ("image_encoder", "fp16", 0) in seen  # the local fp16 graph, linted before compile
    # the deployed artifact: the compile job's target model, downloaded once, logged, named
    target = fake.models[compile_job.target_model_id]
    assert fake.model_downloads.count(target.model_id) == 1
    sha = hashlib.sha256(target.data).hexdigest()
    assert tags["deployed_sha256/image_encoder"] == sha
    artifact = tags["deployed_artifact/image_encoder"]
    assert artifact.startswith("deployed/image_encoder/") and artifact.endswith(".dlc")
    logged = Path(client.download_artifacts(res.run_id, artifact, str(tmp_path / "art")))
    assert file_sha256(logged) == sha
    assert tags["toolchain/image_encoder"] == "QAIRT 2.42.0"
    assert "deployed_model/image_encoder" not in tags  # no ONNX is deployed in its place
    assert "AI Hub compile of the fp32 export" in tags["precision_method/image_encoder"]
    lint = Path(client.download_artifacts(res.run_id, "lint/image_encoder.json", str(tmp_path)))
    assert [g["graph"] for g in json.loads(lint.read_text())["graphs"]] == ["export", "fp16"]
    assert tags["lint/image_encoder"] == "ok"
    assert json.loads(tags["compiled_io/image_encoder"])["inputs"][0]["dtype"] == "float32"
    assert "fidelity_cosine_min/image_encoder" in run.data.metrics
    # registered: the fp32 export's logged model, the version naming the compiled file
    versions = {v.component: v for v in register_run(client, res.run_id)}
    version = client.get_model_version(versions["image_encoder"].name, "1")
    assert (
        version.tags["deployed_sha256"] == sha
        and version.tags["onnx_sha256"] == tags["onnx_sha256/image_encoder"]
    )


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
