"""`python run.py hub=aihub` end to end, with the real qai-hub client over a faked transport."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_config, tiny_overrides
from mlflow.tracking import MlflowClient
from test_aihub import TOKEN, fake  # noqa: F401  (the fixture)

from lpcvlab import pipeline
from lpcvlab.errors import ConfigError
from lpcvlab.tracking.registry import register_run

pytestmark = [pytest.mark.slow, pytest.mark.hub]


def _aihub_cfg(tmp_path, *extra):
    local_only = ("hub.",)
    return compose_config(
        *[o for o in tiny_overrides(tmp_path) if not o.startswith(local_only)],
        "hub=aihub",
        *extra,
    )


def test_missing_token_stops_the_run_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("QAI_HUB_API_TOKEN", raising=False)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "absent-client.ini"))
    cfg = _aihub_cfg(tmp_path)
    with pytest.raises(ConfigError, match="no Qualcomm AI Hub API token"):
        pipeline.run(cfg, work_dir=tmp_path / "work")
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lpcvc-retrieval").experiment_id])
    assert run.info.status == "FAILED"
    assert not any(k.startswith("data/") for k in run.data.params)  # no data was even read
    assert not (tmp_path / "cache" / "onnx").exists()  # nothing exported


def test_track1_on_aihub_logs_jobs_device_metrics_and_no_token(fake, tmp_path):  # noqa: F811
    cfg = _aihub_cfg(
        tmp_path,
        "hub.poll_interval_s=0",
        "hub.share_with=[lpcv@example.com]",
        "cache.enabled=false",
        "backbone.activation=gelu_sigmoid",  # Erf is a device hazard: export.lint stops the run
    )
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    for comp in ("image_encoder", "text_encoder"):
        for kind in ("compile", "profile", "inference"):
            assert tags[f"aihub/{comp}/{kind}_job"], (comp, kind)
        assert tags[f"aihub/{comp}/compile_job_status"] == "SUCCESS"
        assert tags[f"aihub/{comp}/compile_job_shared_with"] == "lpcv@example.com"
        assert metrics[f"device_parity_cosine_min/{comp}"] > 0.99
        assert metrics[f"latency_ms/{comp}"] > 0
        assert f"compute_units/{comp}/npu" in run.data.params
    assert 0.0 <= metrics["recall_at_10"] <= 1.0
    assert "measured_on" not in tags and tags["hub"] == "aihub"
    # hub.qairt_version on every job; the version the compiled models report, tagged.
    for job in fake.jobs.values():
        assert "--qairt_version 2.42" in getattr(job.request, "options", ""), job.job_id
    assert tags["aihub/qairt_version"] == "2.42.0"
    assert tags["aihub/image_encoder/qairt_version"] == "2.42.0"
    # each compiled model's I/O, recorded and checked against track.contract
    io = json.loads(tags["compiled_io/text_encoder"])
    assert io["inputs"][0] | {"scale": None} == {
        "name": "text",
        "shape": [1, 77],
        "dtype": "int32",
        "scale": None,
        "zero_point": None,
    }
    assert tags["deployed_sha256/image_encoder"] and tags["deployed_artifact/image_encoder"]
    # The logged models carry the AI Hub facts of their compile jobs; the description the device.
    models = {}
    for out in run.outputs.model_outputs:
        model = client.get_logged_model(out.model_id)
        models[model.tags["component"]] = model
    for comp, model in models.items():
        assert model.tags["aihub.compile_job"] == tags[f"aihub/{comp}/compile_job"]
        assert model.tags["aihub.target_model"] == tags[f"aihub/{comp}/target_model"]
        assert model.tags["aihub.device"] == "XR2 Gen 2 (Proxy)"
        assert model.tags["aihub.runtime"] == "qnn_dlc"
        assert model.tags["aihub.shared_with"] == "lpcv@example.com"
    assert set(models) == {"image_encoder", "text_encoder"}
    assert "component (XR2 Gen 2 (Proxy))" in tags["mlflow.note.content"]
    # A registered version carries what the submission form asks for.
    versions = register_run(client, res.run_id)
    for v in versions:
        version = client.get_model_version(v.name, v.version)
        assert version.tags["aihub.compile_job"] == tags[f"aihub/{v.component}/compile_job"]
        assert version.tags["aihub.target_model"] == tags[f"aihub/{v.component}/target_model"]
        assert version.tags["shared_with"] == "lpcv@example.com"
        assert version.tags["device"] == "XR2 Gen 2 (Proxy)" and version.tags["hub"] == "aihub"
        assert float(version.tags["latency_ms"]) == metrics[f"latency_ms/{v.component}"]
        profile_job = tags[f"aihub/{v.component}/profile_job"]
        assert version.tags["latency_measured_on"] == (
            f"XR2 Gen 2 (Proxy) (qnn_dlc), AI Hub profile job {profile_job}"
        )
        assert f"measured on XR2 Gen 2 (Proxy) (qnn_dlc), AI Hub profile job {profile_job}" in (
            version.description
        )
        assert "weights random" in version.description
    # The token is nowhere in what the run logged.
    run = client.get_run(res.run_id)  # with the registry's tags
    logged = [str(run.data.params), str(run.data.tags), str(metrics), str(run.inputs)]
    for art in ("config.yaml", "profiles/image_encoder.json", "profiles/text_encoder.json"):
        logged.append(open(client.download_artifacts(res.run_id, art, str(tmp_path))).read())
    for model in models.values():
        model = client.get_logged_model(model.model_id)
        logged += [str(model.tags), str(model.params), str(model.metrics)]
        mlmodel = Path(model.artifact_location.removeprefix("file://")) / "MLmodel"
        logged.append(mlmodel.read_text())
    for v in versions:
        version = client.get_model_version(v.name, v.version)
        logged += [str(version.tags), str(version.description)]
        logged.append(str(client.get_registered_model(v.name)))
    assert all(TOKEN not in text for text in logged)


def test_mixed_precision_on_aihub_records_the_quantize_job_and_its_fidelity(fake, tmp_path):  # noqa: F811
    cfg = _aihub_cfg(
        tmp_path,
        "hub.poll_interval_s=0",
        "precision=mixed",
        "precision.per_component.image_encoder=fp16",
        "precision.per_component.text_encoder=w8a8",
        "precision.calibration_samples=8",
        "backbone.activation=gelu_sigmoid",
        "export.rewrites=[finite_mask]",
    )
    first, run = _logged(cfg, tmp_path / "work")
    tags, metrics = run.tags, run.metrics
    (quantize,) = fake.jobs_of("quantize")
    assert tags["aihub/text_encoder/quantize_job"] == quantize.job_id
    assert tags["aihub/text_encoder/quantize_job_status"] == "SUCCESS"
    assert "aihub/image_encoder/quantize_job" not in tags
    assert "AI Hub quantize job" in tags["precision_method/text_encoder"]
    assert "--quantize_full_type float16" in tags["precision_method/image_encoder"]
    assert tags["calibration/text_encoder/source"] == "eval_spread"
    assert quantize.calibration_samples == 8
    image_compile = fake.jobs[tags["aihub/image_encoder/compile_job"]]
    assert "--quantize_full_type float16" in image_compile.request.options
    assert "--quantize_io" not in image_compile.request.options  # float I/O: the contract's
    for comp in ("image_encoder", "text_encoder"):
        assert 0.9 < metrics[f"fidelity_cosine_min/{comp}"] < 1.0
    assert "recall_at_10_fp32" in metrics and tags["fidelity_gate"] in ("passed", "failed")
    # The fp32 reference was computed on this machine, not paid for on AI Hub.
    assert tags["fidelity/reference"].endswith("computed on this machine")
    # Two device compiles, and the ONNX compile the w8a8 text encoder is quantized from (AIHM).
    targets = sorted(j.request.options.split()[1] for j in fake.jobs_of("compile"))
    assert targets == ["onnx", "qnn_dlc", "qnn_dlc"]

    # Again: every AI Hub job is reused from the ledger, the reference from the stage cache.
    jobs = len(fake.jobs)
    _, again = _logged(cfg, tmp_path / "again")
    assert len(fake.jobs) == jobs
    assert again.tags["aihub/text_encoder/quantize_job_status"] == "REUSED"
    assert first in again.tags["fidelity/reference"]
    assert (
        again.metrics["fidelity_cosine_min/text_encoder"]
        == (metrics["fidelity_cosine_min/text_encoder"])
    )


def _logged(cfg, work_dir):
    """(run ID, what the run logged) of one pipeline run."""
    run_id = pipeline.run(cfg, work_dir=work_dir).run_id
    return run_id, MlflowClient(cfg.tracking.uri).get_run(run_id).data


def test_a_device_hazard_stops_the_run_before_any_ai_hub_job(fake, tmp_path):  # noqa: F811
    """clip_tiny's exact GELU (Erf) is a hazard: export.lint=error (hub=aihub's default) stops
    the run after export with one line per hazard, before anything is uploaded or paid for."""
    cfg = _aihub_cfg(tmp_path, "hub.poll_interval_s=0", "cache.enabled=false")
    with pytest.raises(ConfigError) as exc:
        pipeline.run(cfg, work_dir=tmp_path / "work")
    lines = str(exc.value).splitlines()
    assert lines[0].startswith("export.lint=error: 2 device hazard(s)")
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "image_encoder",
        "text_encoder",
    ]
    fix = "backbone.activation=gelu_sigmoid"
    assert all(": erf: " in line and fix in line for line in lines[1:])
    assert fake.jobs == {} and fake.models == {} and fake.datasets == {}
    assert fake.count("POST", r"/api/v1/(jobs|models|datasets)") == 0
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lpcvc-retrieval").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["lint/image_encoder"] == "erf"
    assert run.data.metrics["lint_hazards/text_encoder"] == 1.0
