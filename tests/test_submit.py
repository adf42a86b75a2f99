"""``lpcvlab submit``: the checks one line each, then sharing and the submission record, with the
real qai-hub client over the faked AI Hub transport."""

from __future__ import annotations

import json

import pytest
from conftest import compose_config, tiny_overrides
from mlflow.tracking import MlflowClient
from test_aihub import fake  # noqa: F401  (the fixture)

from lpcvlab import cli, pipeline
from lpcvlab.tracking.runstore import RunInfo, get_run
from lpcvlab.tracking.submit import RECORD, check_run

IMAGE, TEXT = "image_encoder", "text_encoder"
ORGANISERS = "lowpowervision@gmail.com"


def _io(name: str, shape: list[int], dtype: str, scale: float | None = None) -> str:
    """A ``compiled_io/<component>`` tag: one input, and the output_0 embedding."""
    zero = None if scale is None else 128
    out_dtype = "float32" if scale is None else "uint8"
    return json.dumps(
        {
            "inputs": [
                {"name": name, "shape": shape, "dtype": dtype, "scale": scale, "zero_point": zero}
            ],
            "outputs": [
                {
                    "name": "output_0",
                    "shape": [1, 64],
                    "dtype": out_dtype,
                    "scale": scale,
                    "zero_point": zero,
                }
            ],
        }
    )


def _run(
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    status: str = "FINISHED",
) -> RunInfo:
    """A finished Track 1 run measured on AI Hub that passes every check, changed as given."""
    base_tags = {
        "hub": "aihub",
        "track": "retrieval",
        f"onnx_sha256/{IMAGE}": "a" * 64,
        f"onnx_sha256/{TEXT}": "b" * 64,
        f"aihub/{IMAGE}/compile_job": "jimage",
        f"aihub/{TEXT}/compile_job": "jtext",
        f"lint/{IMAGE}": "ok",
        f"lint/{TEXT}": "ok",
        f"compiled_io/{IMAGE}": _io("image", [1, 3, 224, 224], "float32"),
        f"compiled_io/{TEXT}": _io("text", [1, 77], "int32"),
    }
    base_metrics = {
        f"latency_ms/{IMAGE}": 24.0,
        f"latency_ms/{TEXT}": 5.0,
        "latency_ms/total": 29.0,
        "recall_at_10": 0.7,
    }
    base_params = {"track.budget_ms": "35.0", "track.objective": "recall_at_10"}
    return RunInfo(
        run_id="r" * 32,
        name="clip_vit_b16 hub=aihub",
        status=status,
        experiment_id="1",
        start_time=0,
        params=base_params | (params or {}),
        metrics=base_metrics | (metrics or {}),
        tags={k: v for k, v in (base_tags | (tags or {})).items() if v is not None},
    )


def _failures(run: RunInfo, budget: float | None = 35.0) -> list[str]:
    return check_run(run, budget).failed


def test_a_run_that_meets_every_rule_passes():
    verdict = check_run(_run(), 35.0)
    assert verdict.failed == []
    assert "latency: total 29.00 ms (image_encoder 24.00 + text_encoder 5.00), within 35 ms" in (
        verdict.passed
    )
    assert "fidelity gate: not needed (every component in fp32)" in verdict.passed


def test_a_hub_local_run_is_refused_in_one_line():
    (line,) = _failures(_run({"hub": "local", "measured_on": "host_cpu"}))
    assert line.startswith("device: measured with hub=local (on host_cpu, not the device)")
    assert "hub=aihub" in line and "\n" not in line


def test_over_budget_is_refused_naming_the_budget():
    run = _run(metrics={"latency_ms/total": 36.5, f"latency_ms/{IMAGE}": 31.5})
    (line,) = _failures(run)
    assert line == (
        "latency: total 36.50 ms (image_encoder 31.50 + text_encoder 5.00) is over "
        "track.budget_ms=35; choose a faster model or precision"
    )
    (line,) = _failures(_run(), budget=None)
    assert "no track.budget_ms" in line and "--budget-ms" in line


def test_a_failed_gate_or_a_hazard_or_no_hazard_check_is_refused():
    gate = _run({"fidelity_gate": "failed", "fidelity_gate_reasons": "text_encoder cos 0.81"})
    assert _failures(gate) == ["fidelity gate: failed (text_encoder cos 0.81)"]
    lowered = _run({f"precision/{TEXT}": "w8a8"})
    (line,) = _failures(lowered)
    assert line.startswith("fidelity gate: not recorded for text_encoder")
    hazard = _run({f"lint/{TEXT}": "erf,seq_len"}, {f"lint_hazards/{TEXT}": 2})
    assert _failures(hazard) == [
        "device hazards: text_encoder has 2 hazard(s): erf,seq_len; fix them before submitting"
    ]
    (line,) = _failures(_run({f"lint/{IMAGE}": None}))
    assert "image_encoder was not checked" in line and "export.lint" in line
    assert len(_failures(_run(status="FAILED"))) == 1


def test_compiled_io_is_checked_against_the_contract():
    verdict = check_run(_run(), 35.0)
    (line,) = [x for x in verdict.passed if x.startswith("io_contract")]
    assert "image_encoder image 1x3x224x224 float32 -> output_0 1x64 float32" in line
    quantized = _run({f"compiled_io/{IMAGE}": _io("image", [1, 3, 224, 224], "uint8", 0.0039)})
    assert _failures(quantized) == [
        "io_contract: image_encoder input image: expected image 1x3x224x224 float32, got image "
        "1x3x224x224 uint8 (scale 0.0039, zero point 128) (track.contract); compile with float "
        "I/O (hub.quantize_io=false)",
        "io_contract: image_encoder output output_0: expected output_0 float32, got output_0 1x64 "
        "uint8 (scale 0.0039, zero point 128) (track.contract); compile with float I/O "
        "(hub.quantize_io=false)",
    ]
    # A contract that accepts quantized I/O (a changed rule is one value) passes it.
    allowed = _run(
        {f"compiled_io/{IMAGE}": _io("image", [1, 3, 224, 224], "uint8", 0.0039)},
        params={"track.contract.quantized_io": "True", **_contract_params()},
    )
    assert _failures(allowed) == []
    (line,) = _failures(_run({f"compiled_io/{TEXT}": None}))
    assert line.startswith("io_contract: text_encoder: the compiled model's I/O was not recorded")


def _contract_params() -> dict[str, str]:
    """The run's track.contract params, flattened as the run logs them."""
    return {
        "track.contract.image_encoder.input.name": "image",
        "track.contract.image_encoder.input.dtype": "float32",
        "track.contract.image_encoder.input.shape": "[1, 3, 224, 224]",
        "track.contract.image_encoder.output.name": "output_0",
        "track.contract.image_encoder.output.dtype": "float32",
        "track.contract.image_encoder.output.shape": "None",
        "track.contract.text_encoder.input.name": "text",
        "track.contract.text_encoder.input.dtype": "int32",
        "track.contract.text_encoder.input.shape": "[1, 77]",
        "track.contract.text_encoder.output.name": "output_0",
        "track.contract.text_encoder.output.dtype": "float32",
        "track.contract.text_encoder.output.shape": "None",
    }


# ----------------------------------------------------------------------------- with the fake


@pytest.mark.slow
@pytest.mark.hub
def test_submit_shares_once_and_records_what_was_submitted(fake, tmp_path, capsys):  # noqa: F811
    cfg = compose_config(
        *[o for o in tiny_overrides(tmp_path) if not o.startswith("hub.")],
        "hub=aihub",
        "hub.poll_interval_s=0",
        # clip_tiny's exact GELU (Erf) is a device hazard: the hazard check stops an aihub run
        "backbone.activation=gelu_sigmoid",
    )
    run_id = pipeline.run(cfg, work_dir=tmp_path / "work").run_id
    uri = str(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    tags = client.get_run(run_id).data.tags
    jobs = {c: tags[f"aihub/{c}/compile_job"] for c in (IMAGE, TEXT)}
    submit = ["submit", run_id, "--tracking-uri", uri]
    capsys.readouterr()  # the run's own output

    def refused(*extra: str) -> list[str]:
        assert cli.main([*submit, *extra]) == 1
        err = capsys.readouterr().err.splitlines()
        assert not any("Traceback" in line for line in err)
        (start,) = [i for i, line in enumerate(err) if line.startswith("error: run ")]
        assert err[start] == f"error: run {run_id} cannot be submitted:"
        return [line.strip() for line in err[start + 1 :] if line.strip()]

    # The run's own hazard check tagged both components (GELU swapped: no hazard).
    assert all(tags[f"lint/{c}"] == "ok" for c in (IMAGE, TEXT))
    # Without those tags (a run from before the check): refused, one line each, nothing shared.
    for comp in (IMAGE, TEXT):
        client.delete_tag(run_id, f"lint/{comp}")
    lines = refused()
    assert len(lines) == 2 and all("was not checked" in line for line in lines)
    for comp in (IMAGE, TEXT):
        client.set_tag(run_id, f"lint/{comp}", "ok")
    client.set_tag(run_id, f"lint/{TEXT}", "erf")
    client.log_metric(run_id, f"lint_hazards/{TEXT}", 1)
    assert refused() == [
        "device hazards: text_encoder has 1 hazard(s): erf; fix them before submitting"
    ]
    client.set_tag(run_id, f"lint/{TEXT}", "ok")
    client.set_tag(run_id, "fidelity_gate", "failed")
    (line,) = refused()
    assert line.startswith("fidelity gate: failed")
    client.delete_tag(run_id, "fidelity_gate")
    (line,) = refused("--budget-ms", "1")
    assert line.startswith("latency: total ") and "over track.budget_ms=1;" in line
    assert fake.shared == {}

    assert cli.main([*submit, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "every check passed" in out and "dry run: would share" in out
    assert jobs[IMAGE] in out and ORGANISERS in out and fake.shared == {}

    assert cli.main(submit) == 0
    out = capsys.readouterr().out
    assert f"compile job {jobs[TEXT]} shared with {ORGANISERS}" in out
    assert fake.shared == {jobs[IMAGE]: [ORGANISERS], jobs[TEXT]: [ORGANISERS]}

    local = client.download_artifacts(run_id, RECORD, str(tmp_path / "record"))
    record = json.loads(open(local).read())
    assert record["run_id"] == run_id and record["commit"] == tags["git_commit"]
    assert record["device"] == "XR2 Gen 2 (Proxy)" and record["runtime"] == "qnn_dlc"
    assert record["score"]["metric"] == "recall_at_10"
    assert record["latency_ms"]["budget"] == 35.0 and record["latency_ms"]["total"] > 0
    image = record["components"][IMAGE]
    assert image["compile_job"] == jobs[IMAGE] and image["shared_with"] == [ORGANISERS]
    assert image["target_model"] == tags[f"aihub/{IMAGE}/target_model"]
    assert image["onnx_sha256"] == tags[f"onnx_sha256/{IMAGE}"]
    assert image["inputs"] == [
        {"name": "image", "shape": [1, 3, 224, 224], "dtype": "float32", "layout": "channel-first"}
    ]
    (text_input,) = record["components"][TEXT]["inputs"]
    assert text_input["dtype"] == "int32" and text_input["layout"] == "n/a"  # truncated 64-bit

    for comp in (IMAGE, TEXT):
        version = client.get_model_version_by_alias(f"lpcvc-track1-{comp}", "submitted")
        assert version.run_id == run_id
        assert version.tags["submission.compile_job"] == jobs[comp]
        assert version.tags["submission.shared_with"] == ORGANISERS
        assert version.tags["submission.record"] == f"runs:/{run_id}/{RECORD}"
        assert json.loads(version.tags["submission.inputs"]) == record["components"][comp]["inputs"]
    after = client.get_run(run_id).data.tags
    assert after[f"aihub/{IMAGE}/compile_job_shared_with"] == ORGANISERS

    # Again: the jobs are shared already, so nothing is asked of AI Hub twice.
    assert cli.main(submit) == 0
    assert "already shared" in capsys.readouterr().out
    assert fake.shared == {jobs[IMAGE]: [ORGANISERS], jobs[TEXT]: [ORGANISERS]}


@pytest.mark.slow
@pytest.mark.hub
def test_quantized_io_scores_alike_and_is_refused_float_io_passes(fake, tmp_path, capsys):  # noqa: F811
    """A w8a8 Track 1 run compiled with hub.quantize_io=true (uint8 I/O with a scale and zero
    point) scores what the default float-I/O run scores, to the quantization error, and
    submit refuses it with io_contract lines; the default run's I/O check passes."""
    base = [
        *[o for o in tiny_overrides(tmp_path) if not o.startswith("hub.")],
        "hub=aihub",
        "hub.poll_interval_s=0",
        "precision=w8a8",
        "precision.calibration_samples=8",
        "backbone.activation=gelu_sigmoid",
        "export.rewrites=[finite_mask]",
    ]
    client = MlflowClient(tracking_uri=str(compose_config(*base).tracking.uri))
    ids = {}
    for name, extra in (("float", []), ("uint8", ["hub.quantize_io=true", "export.lint=warn"])):
        ids[name] = pipeline.run(compose_config(*base, *extra), work_dir=tmp_path / name).run_id
    runs = {k: client.get_run(v).data for k, v in ids.items()}
    (x,) = json.loads(runs["uint8"].tags[f"compiled_io/{IMAGE}"])["inputs"]
    assert x["dtype"] == "uint8" and x["scale"] > 0
    assert json.loads(runs["float"].tags[f"compiled_io/{IMAGE}"])["inputs"][0]["dtype"] == (
        "float32"
    )
    assert len(fake.jobs_of("quantize")) == 2  # one per encoder, reused by the second run
    recall = {k: r.metrics["recall_at_10"] for k, r in runs.items()}
    assert abs(recall["uint8"] - recall["float"]) <= 0.05, recall
    assert runs["uint8"].tags[f"lint/{IMAGE}"] == "io_contract"
    capsys.readouterr()
    uri = str(client.tracking_uri)
    assert cli.main(["submit", ids["uint8"], "--dry-run", "--tracking-uri", uri]) == 1
    err = [line.strip() for line in capsys.readouterr().err.splitlines()]
    assert (
        "io_contract: image_encoder input image: expected image 1x3x224x224 float32, got image "
        f"1x3x224x224 uint8 (scale {x['scale']:.6g}, zero point {x['zero_point']}) "
        "(track.contract); compile with float I/O (hub.quantize_io=false)"
    ) in err
    verdict = check_run(get_run(client, ids["float"]), 35.0)
    assert not [line for line in verdict.failed if "io_contract" in line]
    (passed,) = [line for line in verdict.passed if line.startswith("io_contract")]
    assert "image_encoder image 1x3x224x224 float32" in passed
    code = cli.main(["submit", ids["float"], "--dry-run", "--tracking-uri", uri])
    out = capsys.readouterr()
    assert "io_contract" not in out.err and (code == 1 or passed in out.out)
