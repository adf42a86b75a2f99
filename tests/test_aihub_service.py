"""The faked service refuses what AI Hub refuses, and the hazard check catches it first; the
quantize job's creation survives 429s and a lost answer (real qai-hub client, faked transport)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import qai_hub
from aihub_fake import DEVICE_FACTS, FakeAIHub
from onnx import TensorProto, helper
from test_aihub import (  # noqa: F401  (fixtures)
    _export,
    calibrated,
    composed,
    fake,
    image_inputs,
    make_hub,
    models,
    text_inputs,
)

from lpcvlab.deploy.hazards import Target, check_graph
from lpcvlab.errors import RuntimeStageError
from lpcvlab.hubs import ComponentJob
from lpcvlab.hubs.aihub import AIHub
from lpcvlab.types import TensorSpec

pytestmark = pytest.mark.hub

QNN = Target("XR2 Gen 2 (Proxy)", "qnn_dlc", "qnn_dlc", "--truncate_64bit_io")


def _graph(tmp: Path, op: str, name: str, dims=(1, 4), dtype=TensorProto.FLOAT):
    spec_dtype = "int64" if dtype == TensorProto.INT64 else "float32"
    spec = TensorSpec("x", tuple(d if isinstance(d, int) else 1 for d in dims), spec_dtype)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)]
    nodes.append(helper.make_node(op, ["xf"], ["output_0"], name=f"the_{op.lower()}"))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", dtype, list(dims))],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, list(dims))],
    )
    return _export(tmp / f"{name}.onnx", graph, spec, "output_0")


def _refused(hub: AIHub, exported) -> str:
    with pytest.raises(RuntimeStageError) as exc:
        hub.compile(exported)
    return str(exc.value)


@pytest.mark.parametrize(
    ("rule", "op", "dims", "dtype", "refusal"),
    [
        ("erf", "Erf", (1, 4), TensorProto.FLOAT, "op Erf"),
        ("unsupported_op", "NonZero", (1, 4), TensorProto.FLOAT, "op NonZero"),
    ],
)
def test_the_service_refuses_ops_the_lint_flags_first(
    fake: FakeAIHub,  # noqa: F811
    tmp_path: Path,
    rule,
    op,
    dims,
    dtype,
    refusal,
) -> None:
    exported = _graph(tmp_path, op, f"g_{rule}", dims, dtype)
    assert rule in {h.rule for h in check_graph(exported.path, "c", QNN)}
    assert refusal in _refused(make_hub(tmp_path), exported)
    clean = _graph(tmp_path, "Relu", "g_ok", dims, dtype)
    assert check_graph(clean.path, "c", QNN) == []
    make_hub(tmp_path).compile(clean)  # compiles


def test_int64_without_truncation_is_refused_and_flagged(fake: FakeAIHub, tmp_path: Path):  # noqa: F811
    exported = _graph(tmp_path, "Relu", "text", (1, 7), TensorProto.INT64)
    settings, device, runtime = composed()
    bare = dataclasses.replace(runtime, compile_options="")
    hub = AIHub(settings, device, bare, track="retrieval", cache_dir=tmp_path / "cache")
    hub._stages.settings = dataclasses.replace(settings, poll_interval_s=0)
    hub._driver.poll_interval_s = 0
    target = Target("XR2 Gen 2 (Proxy)", "qnn_dlc", "qnn_dlc", "")
    assert {h.rule for h in check_graph(exported.path, "c", target)} == {"int64_io"}
    assert "needs --truncate_64bit_io" in _refused(hub, exported)
    make_hub(tmp_path).compile(exported)  # with the runtime's --truncate_64bit_io: compiles


def test_dynamic_dimension_is_refused_and_flagged(fake: FakeAIHub, tmp_path: Path):  # noqa: F811
    exported = _graph(tmp_path, "Relu", "dyn", (1, "n"))
    assert {h.rule for h in check_graph(exported.path, "c", QNN)} == {"dynamic_shape"}
    # The output's dimension stays dynamic whatever input_specs fix: the compiler refuses it.
    assert "dynamic dimension" in _refused(make_hub(tmp_path), exported)


def test_oversized_uploads_are_refused_and_the_size_rule_flags_them(
    fake: FakeAIHub,  # noqa: F811
    models,  # noqa: F811
    tmp_path: Path,
) -> None:
    exported = models["text_encoder"]
    size = exported.path.stat().st_size
    fake.model_limit_bytes = size - 1  # the service's limit, scaled down to a test graph
    small = Target("d", "qnn_dlc", "qnn_dlc", "--truncate_64bit_io", size_limit_bytes=size - 1)
    assert {h.rule for h in check_graph(exported.path, "c", small)} == {"size"}
    assert "Request Entity Too Large" in _refused(make_hub(tmp_path), exported)
    assert any("over the limit" in r for r in fake.refused)
    # Datasets over the limit (scaled down as well): hub.chunk_bytes keeps uploads under it.
    fake.model_limit_bytes = 1 << 40
    hub = make_hub(tmp_path, reuse=False)
    compiled = hub.compile(exported)
    hub.infer(compiled, text_inputs(64))
    (one,) = [len(fake.datasets[j.request.dataset.dataset_id]) for j in fake.jobs_of("inference")]
    fake.dataset_limit_bytes = one - 1
    with pytest.raises(RuntimeStageError, match="uploading the inputs"):
        hub.infer(compiled, text_inputs(64))
    assert any("over the 2 GB limit" in r for r in fake.refused)
    chunked = make_hub(tmp_path, chunk_bytes=7 * 4 * 16, reuse=False)  # 16 int32 samples
    assert len(chunked.infer(compiled, text_inputs(64)).outputs) == 64


def test_unknown_options_are_refused_per_job_type(fake: FakeAIHub, models, tmp_path):  # noqa: F811
    hub = make_hub(tmp_path, extra_compile_options="--max_profiler_iterations 5")
    assert "Unknown option --max_profiler_iterations for a compile job" in _refused(
        hub, models["image_encoder"]
    )
    hub = make_hub(tmp_path, extra_profile_options="--truncate_64bit_io")
    compiled = hub.compile(models["image_encoder"])
    with pytest.raises(RuntimeStageError, match="Unknown option --truncate_64bit_io"):
        hub.profile(compiled)
    bad = make_hub(tmp_path, extra_compile_options="--quantize_full_type int3")
    assert "Invalid value for --quantize_full_type" in _refused(bad, models["image_encoder"])


def test_devices_as_aihm_lists_them(fake: FakeAIHub, tmp_path: Path) -> None:  # noqa: F811
    client = make_hub(tmp_path).client
    devices = {d.name: d for d in client.get_devices()}
    assert set(devices) == {d[0] for d in DEVICE_FACTS}
    iq = devices["Dragonwing IQ-9075 EVK"]
    assert "os:linux" in iq.attributes and "chipset:qualcomm-qcs9075" in iq.attributes
    assert iq.os == "1.5"
    assert "os:android" in devices["Samsung Galaxy S25"].attributes


def test_w8a16_on_qnn_dlc_fails_on_the_device_and_the_lint_flags_it(
    fake: FakeAIHub,  # noqa: F811
    models,  # noqa: F811
    tmp_path: Path,
) -> None:
    exported = models["image_encoder"]
    w8a16 = Target("XR2 Gen 2 (Proxy)", "qnn_dlc", "qnn_dlc", "--truncate_64bit_io", "w8a16")
    assert {h.rule for h in check_graph(exported.path, "image_encoder", w8a16)} == {"w8a16_runtime"}
    precision = calibrated("w8a16", image_inputs(8, seed=2))
    job = ComponentJob(exported, image_inputs(2), precision=precision)
    with pytest.raises(RuntimeStageError, match="MODEL_GRAPH_ERROR"):
        make_hub(tmp_path).run_components([job])
    assert fake.jobs_of("compile")  # it compiled: the failure comes only on the device
    # w8a8 on the same runtime runs.
    w8a8 = ComponentJob(exported, image_inputs(2), precision=calibrated("w8a8", image_inputs(8)))
    assert len(make_hub(tmp_path).run_components([w8a8])["image_encoder"].inference.outputs) == 2


def _text_w8a8(models):  # noqa: F811
    precision = calibrated("w8a8", text_inputs(8, seed=4))
    return ComponentJob(models["text_encoder"], text_inputs(3), precision=precision)


def test_quantize_creation_waits_out_rate_limits(fake: FakeAIHub, models, tmp_path) -> None:  # noqa: F811
    hub = make_hub(tmp_path)
    waits: list[float] = []
    hub._stages.sleep = waits.append
    fake.rate_limited["quantize"] = 3
    run = hub.run_components([_text_w8a8(models)])["text_encoder"]
    assert waits == [20.0, 40.0, 60.0]  # the client's own schedule for compile and inference
    (quantize,) = fake.jobs_of("quantize")
    assert run.quantized.job_id == quantize.job_id
    # The token IDs were calibrated as the ONNX model takes them: int32 (--truncate_64bit_io).
    onnx_job, device_job = sorted(fake.jobs_of("compile"), key=lambda j: j.created_seq)
    assert "--truncate_64bit_io" in onnx_job.request.options
    assert quantize.calibration_samples == 8
    assert "--quantize_io" not in device_job.request.options  # float I/O: the contract's


def test_a_lost_quantize_creation_is_found_by_name_not_paid_twice(
    fake: FakeAIHub,  # noqa: F811
    models,  # noqa: F811
    tmp_path: Path,
) -> None:
    hub = make_hub(tmp_path)
    fake.lost_answers["quantize"] = 1  # AI Hub creates the job; its answer never arrives
    run = hub.run_components([_text_w8a8(models)])["text_encoder"]
    (quantize,) = fake.jobs_of("quantize")  # one job, not two
    assert run.quantized.job_id == quantize.job_id
    assert fake.count("GET", r"/api/v1/job_summaries") >= 1
    assert len(run.inference.outputs) == 3


def test_a_quantize_job_that_was_never_created_is_an_error(fake, models, tmp_path):  # noqa: F811
    hub = make_hub(tmp_path)
    fake.rate_limited["quantize"] = 10**6
    hub._stages.sleep = lambda s: None
    with pytest.raises(RuntimeStageError, match="submitting the quantize job"):
        hub.run_components([_text_w8a8(models)])
    assert fake.jobs_of("quantize") == []
    assert qai_hub.client.RATE_LIMIT_RETRY_TIMEOUT == 10  # the budget the wait follows
