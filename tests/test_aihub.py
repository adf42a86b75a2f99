"""AI Hub runtime against the real ``qai_hub`` client with a faked HTTP transport (no network)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import qai_hub.public_api_pb2 as pb
from aihub_fake import DEVICES, FakeAIHub, ledger_lines
from hydra import compose, initialize_config_dir
from lpcvlab.ledger import JobLedger, LedgerEntry, job_key
from lpcvlab.runtimes import ComponentJob, aihub, build_runtime
from lpcvlab.runtimes.aihub import (
    AIHubRuntime,
    HubSettings,
    HubTarget,
    compile_options,
    samples_per_chunk,
)
from omegaconf import OmegaConf
from onnx import TensorProto, helper, numpy_helper

from lpcvlab.cli_hub import add_hub_commands
from lpcvlab.errors import ConfigError, RuntimeStageError
from lpcvlab.hubs.profile import parse_profile
from lpcvlab.types import ExportResult, JobEvent, TensorSpec

pytestmark = pytest.mark.hub

CONF = Path(__file__).resolve().parents[1] / "conf"
TOKEN = "qaihub-test-token-5f2c9d81e4b7"
TRACK1_OPTIONS = "--target_runtime qnn_dlc --truncate_64bit_io"
TRACK2_OPTIONS = (
    "--target_runtime qnn_context_binary --truncate_64bit_io "
    "--force_channel_last_input video --output_names class_probs"
)


# --------------------------------------------------------------------------- tiny models


def _export(path: Path, graph: onnx.GraphProto, spec: TensorSpec, output: str, external=False):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.stem}.data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ExportResult(
        component=path.stem,
        path=path,
        sha256=digest,
        input=spec,
        output_name=output,
        parity_cosine_min=1.0,
        parity_samples=0,
        seconds=0.0,
    )


def _weights(name: str, shape: tuple[int, ...], seed: int) -> TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def image_encoder(tmp: Path, external: bool = True) -> ExportResult:
    """``image`` float32 (1, 3, 8, 8) -> ``output_0`` (1, 16); weights as external data."""
    spec = TensorSpec("image", (1, 3, 8, 8), "float32")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["output_0"]),
        ],
        "image_encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, spec.shape)],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, (1, 16))],
        [_weights("w", (192, 16), 1)],
    )
    return _export(tmp / "image_encoder.onnx", graph, spec, "output_0", external=external)


def text_encoder(tmp: Path) -> ExportResult:
    """``text`` int64 (1, 7) -> ``output_0`` (1, 16)."""
    spec = TensorSpec("text", (1, 7), "int64")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["text"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["f", "w"], ["output_0"]),
        ],
        "text_encoder",
        [helper.make_tensor_value_info("text", TensorProto.INT64, spec.shape)],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, (1, 16))],
        [_weights("w", (7, 16), 2)],
    )
    return _export(tmp / "text_encoder.onnx", graph, spec, "output_0")


def video_classifier(tmp: Path) -> ExportResult:
    """``video`` float32 (1, 3, 4, 6, 6) -> ``class_probs`` (1, 5), softmax."""
    spec = TensorSpec("video", (1, 3, 4, 6, 6), "float32")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["video"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["class_probs"], axis=-1),
        ],
        "video_classifier",
        [helper.make_tensor_value_info("video", TensorProto.FLOAT, spec.shape)],
        [helper.make_tensor_value_info("class_probs", TensorProto.FLOAT, (1, 5))],
        [_weights("w", (432, 5), 3)],
    )
    return _export(tmp / "video_classifier.onnx", graph, spec, "class_probs")


def local_outputs(exported: ExportResult, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    name, dtype = exported.input.name, exported.input.dtype
    return np.concatenate([session.run(None, {name: x[None].astype(dtype)})[0] for x in inputs])


def image_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32)


def text_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 49408, size=(n, 7), dtype=np.int64)


def video_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 4, 6, 6), dtype=np.float32)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeAIHub:
    monkeypatch.setenv("QAI_HUB_API_TOKEN", TOKEN)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "absent-client.ini"))
    hub = FakeAIHub(TOKEN)
    hub.install(monkeypatch)
    return hub


@pytest.fixture
def models(tmp_path: Path) -> dict[str, ExportResult]:
    out = tmp_path / "onnx"
    out.mkdir()
    return {
        "image_encoder": image_encoder(out),
        "text_encoder": text_encoder(out),
        "video_classifier": video_classifier(out),
    }


def make_cfg(
    tmp_path: Path,
    runtime: str = "qnn_dlc",
    device: str = "xr2_gen2_proxy",
    track: str = "retrieval",
    **hub: object,
):
    hub_cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "hub" / "aihub.yaml"),
        {"poll_interval_s": 0, "retry_backoff_s": 0, **hub},
    )
    return OmegaConf.create(
        {
            "hub": hub_cfg,
            "device": OmegaConf.load(CONF / "device" / f"{device}.yaml"),
            "runtime": OmegaConf.load(CONF / "runtime" / f"{runtime}.yaml"),
            "track": {"name": track},
            "paths": {"cache_dir": str(tmp_path / "cache")},
        }
    )


def runtime_with_events(cfg) -> tuple[AIHubRuntime, list[JobEvent]]:
    runtime = build_runtime(cfg)
    assert isinstance(runtime, AIHubRuntime)
    events: list[JobEvent] = []
    runtime.job_listener = events.append
    return runtime, events


def track1_jobs(models, n: int = 5) -> list[ComponentJob]:
    return [
        ComponentJob(models["image_encoder"], image_inputs(n)),
        ComponentJob(models["text_encoder"], text_inputs(n)),
    ]


def statuses(events: list[JobEvent], component: str, kind: str) -> list[str]:
    return [e.status or "" for e in events if e.component == component and e.kind == kind]


# --------------------------------------------------------------------------- end to end


def test_track1_pair_compile_profile_infer(fake: FakeAIHub, models, tmp_path: Path) -> None:
    runtime, events = runtime_with_events(make_cfg(tmp_path))
    jobs = track1_jobs(models)
    runs = runtime.run_components(jobs)

    assert list(runs) == ["image_encoder", "text_encoder"]
    compiles = fake.jobs_of("compile")
    assert [j.request.options for j in compiles] == [TRACK1_OPTIONS, TRACK1_OPTIONS]
    specs = {
        t.name: (tuple(t.tensor_type.shape), t.tensor_type.dtype)
        for j in compiles
        for t in j.request.tensor_type_list.types
    }
    assert specs == {
        "image": ((1, 3, 8, 8), pb.TENSOR_DTYPE_FLOAT32),
        "text": ((1, 7), pb.TENSOR_DTYPE_INT64),
    }
    # The image encoder's weights are external: it went up as a zipped <name>.onnx directory.
    sources = [fake.models[j.request.model.model_id] for j in compiles]
    assert [m.is_directory for m in sources] == [True, False]

    for job in jobs:
        run = runs[job.exported.component]
        expected = local_outputs(job.exported, job.inputs)
        assert run.inference.outputs.shape == expected.shape == (5, 16)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(run.inference.outputs, expected, rtol=0, atol=2e-3 * scale)
        assert run.inference.metrics["device_parity_cosine_min"] > 0.999
        assert 40 < run.inference.metrics["device_parity_psnr"] < math.inf
        assert run.profile.latency_ms == pytest.approx(5.4)
        assert run.profile.peak_memory_mb == pytest.approx((0.0, 185.0))
        assert run.profile.compute_units == {"NPU": 3, "CPU": 1}
        assert run.profile.raw["execution_summary"]["estimated_inference_time"] == 5400
        assert run.compiled.device == "XR2 Gen 2 (Proxy)"
        assert run.compiled.runtime == "qnn_dlc"
        assert fake.jobs[run.compiled.job_id].kind == "compile"
        assert fake.jobs[run.profile.job_id].profiling
        assert run.inference.job_id in fake.jobs and not fake.jobs[run.inference.job_id].profiling
        assert run.profile.job_url and run.profile.job_id in run.profile.job_url
        component = job.exported.component
        for kind in ("compile", "profile", "inference"):
            seen = statuses(events, component, kind)
            assert seen[0] == "SUBMITTED" and seen[-1] == "SUCCESS", (kind, seen)
        assert "OPTIMIZING_MODEL" in statuses(events, component, "compile")
        assert statuses(events, component, "upload") == ["UPLOADED"]

    # --truncate_64bit_io: the text encoder takes int32 on device and got int32 data.
    text_handle = runs["text_encoder"].compiled.handle
    assert isinstance(text_handle, HubTarget)
    assert (text_handle.device_dtype, text_handle.channel_last) == ("int32", False)

    # Every independent job went up before any was waited on: both compiles before either
    # finished, and each component's profile and inference jobs before any of them finished.
    assert max(j.created_seq for j in compiles) < min(j.done_seq for j in compiles)
    for component in runs:
        run = runs[component]
        follow = [fake.jobs[run.profile.job_id], fake.jobs[run.inference.job_id]]
        assert max(j.created_seq for j in follow) < min(j.done_seq for j in follow)


def test_track2_channel_last_video(fake: FakeAIHub, models, tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, runtime="qnn_context_binary", device="dragonwing_iq9075_evk", track="video"
    )
    runtime, _ = runtime_with_events(cfg)
    exported = models["video_classifier"]
    inputs = video_inputs(4)
    run = runtime.run_components([ComponentJob(exported, inputs)])["video_classifier"]

    (compile_job,) = fake.jobs_of("compile")
    assert compile_job.request.options == TRACK2_OPTIONS
    assert compile_job.device == "Dragonwing IQ-9075 EVK"
    handle = run.compiled.handle
    assert handle.channel_last and handle.device_shape == (1, 4, 6, 6, 3)
    # The fake device rejects any sample that is not (1, 4, 6, 6, 3) float32, and reads outputs
    # back under the compiled output name `class_probs`.
    assert fake.models[handle.model_id].outputs[0][0] == "class_probs"
    expected = local_outputs(exported, inputs)
    assert run.inference.outputs.shape == (4, 5)
    np.testing.assert_allclose(run.inference.outputs.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(run.inference.outputs, expected, atol=1e-3)
    assert run.inference.metrics["device_parity_cosine_min"] > 0.999


def test_chunking_keeps_input_order(fake: FakeAIHub, models, tmp_path: Path) -> None:
    sample_bytes = 3 * 8 * 8 * 4
    runtime, _ = runtime_with_events(make_cfg(tmp_path, chunk_bytes=2 * sample_bytes))
    exported = models["image_encoder"]
    inputs = image_inputs(5, seed=7)
    compiled = runtime.compile(exported)
    result = runtime.infer(compiled, inputs)

    chunks = fake.jobs_of("inference", profiling=False)
    assert len(chunks) == 3
    sizes = []
    for job in chunks:
        name = fake.dataset_names[job.request.dataset.dataset_id]
        sizes.append(name)
    assert sizes == [
        "retrieval-image_encoder inference 1/3",
        "retrieval-image_encoder inference 2/3",
        "retrieval-image_encoder inference 3/3",
    ]
    assert result.job_id == ",".join(j.job_id for j in chunks)
    expected = local_outputs(exported, inputs)
    np.testing.assert_allclose(result.outputs, expected, atol=1e-2)
    # Each output row is nearest to its own input's reference row: nothing was reordered.
    distance = np.linalg.norm(result.outputs[:, None] - expected[None], axis=-1)
    assert list(distance.argmin(axis=1)) == [0, 1, 2, 3, 4]


def test_samples_per_chunk() -> None:
    default = HubSettings().chunk_bytes
    assert samples_per_chunk((1, 3, 16, 112, 112), "float32", default) == 538
    assert samples_per_chunk((1, 77), "int32", 77 * 4 * 3) == 3
    with pytest.raises(ConfigError, match="chunk_bytes"):
        samples_per_chunk((1, 3, 224, 224), "float32", 1000)
    with pytest.raises(ConfigError, match="2 GB"):
        HubSettings.from_cfg({"chunk_bytes": 3 * 1024**3})


# --------------------------------------------------------------------------- options, profile


@pytest.mark.parametrize(
    ("runtime", "image", "video"),
    [
        ("qnn_dlc", TRACK1_OPTIONS, "--target_runtime qnn_dlc --truncate_64bit_io"),
        ("qnn_context_binary", "--target_runtime qnn_context_binary --truncate_64bit_io", ""),
        ("tflite", "--target_runtime tflite --truncate_64bit_io", ""),
        ("onnx", "--target_runtime onnx --truncate_64bit_io", ""),
        (
            "precompiled_qnn_onnx",
            "--target_runtime precompiled_qnn_onnx --truncate_64bit_io",
            "",
        ),
    ],
)
def test_compile_options_per_runtime(models, runtime: str, image: str, video: str) -> None:
    rt = OmegaConf.load(CONF / "runtime" / f"{runtime}.yaml")
    channel_last = HubSettings.from_cfg(OmegaConf.load(CONF / "hub" / "aihub.yaml"))
    cl = channel_last.channel_last_inputs
    assert compile_options(models["image_encoder"], rt.target_runtime, rt.compile_options, cl) == (
        image
    )
    assert compile_options(models["text_encoder"], rt.target_runtime, rt.compile_options, cl) == (
        f"--target_runtime {runtime} --truncate_64bit_io"
    )
    video_expected = (
        f"--target_runtime {runtime} --truncate_64bit_io "
        "--force_channel_last_input video --output_names class_probs"
    )
    assert (
        compile_options(models["video_classifier"], rt.target_runtime, rt.compile_options, cl)
        == video_expected
    )
    if video:  # without the channel-last list, the video input keeps its exported layout
        got = compile_options(models["video_classifier"], rt.target_runtime, rt.compile_options)
        assert got == f"{video} --output_names class_probs"


def test_compile_options_extra_and_conflicts(models) -> None:
    exported = models["image_encoder"]
    got = compile_options(
        exported, "qnn_dlc", "--truncate_64bit_io", (), "--qairt_version 2.31  --compute_unit npu"
    )
    assert got == TRACK1_OPTIONS + " --qairt_version 2.31 --compute_unit npu"
    assert compile_options(exported, "qnn_dlc", "", ("image",)) == (
        "--target_runtime qnn_dlc --force_channel_last_input image"
    )
    with pytest.raises(ConfigError, match="runtime=<name>"):
        compile_options(exported, "qnn_dlc", "", (), "--target_runtime tflite")


def test_graph_already_channel_last_is_not_forced(models) -> None:
    if "channel_last" not in TensorSpec.__dataclass_fields__:
        pytest.skip("TensorSpec has no channel_last flag in this checkout")
    exported = models["video_classifier"]
    spec = TensorSpec("video", (1, 4, 6, 6, 3), "float32", channel_last=True)  # type: ignore[call-arg]
    exported = dataclasses.replace(exported, input=spec)
    got = compile_options(exported, "qnn_context_binary", "--truncate_64bit_io", ("video",))
    assert (
        got == "--target_runtime qnn_context_binary --truncate_64bit_io --output_names class_probs"
    )


def test_extra_options_reach_the_jobs(fake: FakeAIHub, models, tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        extra_compile_options="--qairt_version 2.31",
        extra_profile_options="--compute_unit npu",
        extra_inference_options="--compute_unit npu",
        max_profiler_iterations=7,
    )
    runtime, _ = runtime_with_events(cfg)
    runtime.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    (compile_job,) = fake.jobs_of("compile")
    assert compile_job.request.options == TRACK1_OPTIONS + " --qairt_version 2.31"
    (profile_job,) = fake.jobs_of("inference", profiling=True)
    assert profile_job.request.options == "--max_profiler_iterations 7 --compute_unit npu"
    (inference_job,) = fake.jobs_of("inference", profiling=False)
    assert inference_job.request.options == "--compute_unit npu"


def test_profile_with_missing_fields(fake: FakeAIHub, models, tmp_path: Path) -> None:
    # An old-format profile: no memory ranges, no per-layer detail.
    fake.profile_detail = lambda job: pb.ProfileDetail(
        major_version=1, minor_version=0, execution_time=1234
    )
    runtime, _ = runtime_with_events(make_cfg(tmp_path))
    compiled = runtime.compile(models["text_encoder"])
    profile = runtime.profile(compiled)
    assert profile.latency_ms == pytest.approx(1.234)
    assert all(math.isnan(v) for v in profile.peak_memory_mb)
    assert profile.compute_units == {}
    assert profile.raw["execution_summary"]["estimated_inference_time"] == 1234

    empty = parse_profile("x", {})
    assert math.isnan(empty.latency_ms) and all(math.isnan(v) for v in empty.peak_memory_mb)
    partial = parse_profile(
        "x",
        {
            "execution_summary": {"inference_memory_peak_range": [1048576, 2097152]},
            "execution_detail": [{"name": "a"}, {"compute_unit": "gpu"}],
        },
    )
    assert math.isnan(partial.latency_ms)
    assert partial.peak_memory_mb == (1.0, 2.0)
    assert partial.compute_units == {"UNKNOWN": 1, "GPU": 1}


# --------------------------------------------------------------------------- ledger


def test_second_run_reuses_every_job(fake: FakeAIHub, models, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    first, _ = runtime_with_events(cfg)
    runs1 = first.run_components(track1_jobs(models))
    jobs_before = len(fake.jobs)
    uploads = (fake.count("POST", r"/models/$"), fake.count("POST", r"/datasets/$"))
    assert jobs_before == 6

    second, events = runtime_with_events(cfg)
    runs2 = second.run_components(track1_jobs(models))
    assert len(fake.jobs) == jobs_before, "a rerun paid for new jobs"
    assert (fake.count("POST", r"/models/$"), fake.count("POST", r"/datasets/$")) == uploads
    for component, run in runs2.items():
        for kind in ("compile", "profile", "inference"):
            assert statuses(events, component, kind) == ["REUSED"]
        np.testing.assert_array_equal(run.inference.outputs, runs1[component].inference.outputs)
        assert run.compiled.job_id == runs1[component].compiled.job_id
        assert run.profile.latency_ms == runs1[component].profile.latency_ms

    third, events = runtime_with_events(make_cfg(tmp_path, reuse=False))
    third.run_components(track1_jobs(models))
    assert len(fake.jobs) == 2 * jobs_before
    assert "REUSED" not in {e.status for e in events}

    # Different inputs are a different inference job; compile and profile are still reused.
    fourth, events = runtime_with_events(cfg)
    fourth.run_components([ComponentJob(models["text_encoder"], text_inputs(5, seed=1))])
    assert statuses(events, "text_encoder", "compile") == ["REUSED"]
    assert statuses(events, "text_encoder", "inference")[0] == "SUBMITTED"

    ledger = ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")
    entry = next(e for e in ledger if e["kind"] == "compile")
    assert entry["inputs"]["model_sha256"] and entry["options"] == TRACK1_OPTIONS
    assert entry["device"] == "XR2 Gen 2 (Proxy)" and entry["url"].endswith(f"{entry['job_id']}/")
    assert any(e["kind"] == "inference" and e["inputs"]["dataset_sha256"] for e in ledger)


def test_reused_job_with_expired_outputs_runs_again(
    fake: FakeAIHub, models, tmp_path: Path
) -> None:
    cfg = make_cfg(tmp_path)
    first, _ = runtime_with_events(cfg)
    jobs = [ComponentJob(models["text_encoder"], text_inputs(3))]
    before = first.run_components(jobs)["text_encoder"]
    fake.expired |= {j.output_dataset_id for j in fake.jobs_of("inference", profiling=False)}

    second, events = runtime_with_events(cfg)
    after = second.run_components(jobs)["text_encoder"]
    assert statuses(events, "text_encoder", "compile") == ["REUSED"]
    assert statuses(events, "text_encoder", "inference")[:2] == ["REUSED", "SUBMITTED"]
    assert len(fake.jobs_of("inference", profiling=False)) == 2
    assert after.inference.job_id != before.inference.job_id
    assert after.inference.job_id == fake.jobs_of("inference", profiling=False)[-1].job_id
    scale = float(np.abs(before.inference.outputs).max())
    np.testing.assert_allclose(after.inference.outputs, before.inference.outputs, atol=2e-3 * scale)


class _Interrupted(Exception):
    pass


def test_interrupted_run_resumes_in_flight_jobs(
    fake: FakeAIHub, models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(tmp_path)
    fake.hold = True  # the queue is slow: nothing finishes

    def interrupt(seconds: float) -> None:
        raise _Interrupted

    with monkeypatch.context() as m:
        m.setattr(aihub.time, "sleep", interrupt)
        first, _ = runtime_with_events(cfg)
        with pytest.raises(_Interrupted):
            first.run_components(track1_jobs(models))
    ledger = ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")
    assert [(e["kind"], e["status"]) for e in ledger] == [("compile", "SUBMITTED")] * 2
    assert len(fake.jobs_of("compile")) == 2

    fake.hold = False
    second, events = runtime_with_events(cfg)
    runs = second.run_components(track1_jobs(models))
    assert len(fake.jobs_of("compile")) == 2, "an in-flight compile job was submitted again"
    for component, run in runs.items():
        assert statuses(events, component, "compile")[0] == "RESUMED"
        assert run.compiled.job_id in {e["job_id"] for e in ledger}
    final = JobLedger(tmp_path / "cache" / "aihub_ledger.jsonl").entries()
    assert {e.status for e in final} == {"SUCCESS"}


def test_ledger_file_semantics(tmp_path: Path) -> None:
    ledger = JobLedger(tmp_path / "l.jsonl")
    key = job_key("compile", "dev", "--x", {"model_sha256": "abc"})
    assert key == job_key("compile", "dev", "--x", {"model_sha256": "abc"})
    assert key != job_key("compile", "dev", "--y", {"model_sha256": "abc"})
    entry = ledger.record(LedgerEntry(key, "compile", "c", "j1", "SUBMITTED", "dev", "--x"))
    with open(ledger.path, "a") as f:
        f.write('{"key": "truncated\n')  # a run killed mid-write
    ledger.update(entry, "SUCCESS")
    latest = ledger.latest(key)
    assert latest is not None and (latest.job_id, latest.status) == ("j1", "SUCCESS")
    assert ledger.latest("other") is None
    assert len(ledger.entries()) == 1


# --------------------------------------------------------------------------- failures


def test_failed_job_reports_reason_and_ids(fake: FakeAIHub, models, tmp_path: Path) -> None:
    fake.compile_failures["text_encoder"] = "Unsupported op ArgMax on HTP at node /text/argmax"
    runtime, events = runtime_with_events(make_cfg(tmp_path))
    with pytest.raises(RuntimeStageError) as err:
        runtime.run_components(track1_jobs(models))
    text_job = next(j for j in fake.jobs_of("compile") if j.failure)
    message = str(err.value)
    assert "Unsupported op ArgMax on HTP at node /text/argmax" in message
    assert text_job.job_id in message and "text_encoder" in message
    assert TRACK1_OPTIONS in message
    failed = statuses(events, "text_encoder", "compile")
    assert failed[-1] == "FAILED: Unsupported op ArgMax on HTP at node /text/argmax"
    ledger = JobLedger(tmp_path / "cache" / "aihub_ledger.jsonl").entries()
    assert {(e.component, e.status) for e in ledger if e.kind == "compile"} >= {
        ("text_encoder", "FAILED")
    }

    # A failed job is not reused: the next run compiles again.
    fake.compile_failures.clear()
    rerun, _ = runtime_with_events(make_cfg(tmp_path))
    runs = rerun.run_components(track1_jobs(models))
    assert runs["text_encoder"].compiled.job_id != text_job.job_id


def test_failed_inference_chunk(fake: FakeAIHub, models, tmp_path: Path) -> None:
    fake.inference_failures["inference"] = "Device lost during inference"
    runtime, _ = runtime_with_events(make_cfg(tmp_path))
    with pytest.raises(RuntimeStageError, match="Device lost during inference") as err:
        runtime.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    (compile_job,) = fake.jobs_of("compile")
    assert compile_job.job_id in str(err.value)


def test_missing_token_fails_before_any_request(
    fake: FakeAIHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QAI_HUB_API_TOKEN")
    with pytest.raises(ConfigError) as err:
        build_runtime(make_cfg(tmp_path))
    message = str(err.value)
    assert "QAI_HUB_API_TOKEN" in message and "qai-hub configure --api_token" in message
    assert "absent-client.ini" in message
    assert fake.requests == []

    ini = tmp_path / "client.ini"
    ini.write_text("[api]\napi_url = https://x.invalid\nweb_url = https://x.invalid\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    with pytest.raises(ConfigError, match="could not be read"):
        build_runtime(make_cfg(tmp_path))
    assert fake.requests == []


def test_token_from_client_ini(fake: FakeAIHub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("QAI_HUB_API_TOKEN")
    ini = tmp_path / "client.ini"
    ini.write_text(
        "[api]\napi_url = https://workbench.aihub.qualcomm.com\n"
        f"web_url = https://workbench.aihub.qualcomm.com\napi_token = {TOKEN}\n"
    )
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    runtime = build_runtime(make_cfg(tmp_path))
    assert runtime.list_devices() == sorted(DEVICES)


def test_rejected_token_is_a_config_error(fake: FakeAIHub, tmp_path: Path, monkeypatch) -> None:
    wrong = "qaihub-wrong-token-0000"
    monkeypatch.setenv("QAI_HUB_API_TOKEN", wrong)
    runtime = build_runtime(make_cfg(tmp_path))
    with pytest.raises(ConfigError, match="rejected the API token") as err:
        runtime.list_devices()
    assert wrong not in str(err.value)


def test_host_cpu_is_not_an_aihub_device(fake: FakeAIHub, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device=host_cpu has no AI Hub device"):
        build_runtime(make_cfg(tmp_path, device="host_cpu"))
    assert fake.requests == []


def test_unknown_device_name(fake: FakeAIHub, models, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    cfg.device.aihub_name = "Snapdragon 9 Gen 9"
    runtime, _ = runtime_with_events(cfg)
    with pytest.raises(ConfigError, match="lpcvlab hub devices"):
        runtime.compile(models["text_encoder"])
    assert fake.count("POST", r"/models/$") == 0


def test_transient_network_errors_are_retried(
    fake: FakeAIHub, models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, events = runtime_with_events(make_cfg(tmp_path))
    status_poll = re.compile(r"/api/v1/jobs/[^/]+/")

    def arm(event: JobEvent) -> None:
        events.append(event)
        if event.kind == "compile" and event.status == "SUBMITTED":
            fake.fail_requests(lambda m, p: m == "GET" and bool(status_poll.fullmatch(p)), 2)

    runtime.job_listener = arm
    with caplog.at_level(logging.WARNING, logger="lpcvlab"):
        runs = runtime.run_components(track1_jobs(models))
    assert set(runs) == {"image_encoder", "text_encoder"}
    assert len(fake.jobs_of("compile")) == 2, "a retry resubmitted a job"
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 4 and "Could not connect" in retries[0]

    # When the network stays down, the error says what failed and how often it was tried.
    fake.fail_requests(lambda m, p: m == "GET" and p.endswith("/devices/"), times=10)
    retry_once, _ = runtime_with_events(make_cfg(tmp_path, retries=1))
    with pytest.raises(RuntimeStageError, match="listing devices failed after 2 tries"):
        retry_once.list_devices()


def test_job_created_while_the_network_drops_is_not_paid_twice(
    fake: FakeAIHub, models, tmp_path: Path
) -> None:
    # The job is created, then every attempt to fetch it fails: the run stops, but the job is in
    # the ledger and the next run picks it up instead of creating another one.
    fake.fail_requests(lambda m, p: m == "GET" and p.startswith("/api/v1/jobs/"), times=2)
    runtime, events = runtime_with_events(make_cfg(tmp_path, retries=1))
    with pytest.raises(RuntimeStageError, match="created compile job j.* rerun to pick it up"):
        runtime.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    (created,) = fake.jobs_of("compile")
    assert statuses(events, "text_encoder", "compile") == ["SUBMITTED"]
    assert [e["job_id"] for e in ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")] == [
        created.job_id
    ]

    rerun, events = runtime_with_events(make_cfg(tmp_path, retries=1))
    run = rerun.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    assert run["text_encoder"].compiled.job_id == created.job_id
    assert statuses(events, "text_encoder", "compile")[0] == "RESUMED"
    assert len(fake.jobs_of("compile")) == 1


def test_token_never_leaves_the_runtime(
    fake: FakeAIHub,
    models,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The service echoes the token in a failure reason: it must still not get out.
    fake.inference_failures["text_encoder inference"] = f"request signed with {TOKEN} was refused"
    cfg = make_cfg(tmp_path, share_with=["lpcv@example.com"])
    runtime, events = runtime_with_events(cfg)
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        runs = runtime.run_components([ComponentJob(models["image_encoder"], image_inputs(2))])
        texts.append(repr(runs))
        with pytest.raises(RuntimeStageError) as err:
            runtime.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
        texts.append(str(err.value))
    captured = capsys.readouterr()
    texts += [caplog.text, captured.out, captured.err, repr(events), repr(runtime.__dict__)]
    exc: BaseException | None = err.value
    while exc is not None:  # nothing attached to the error quotes it either
        texts.append(repr(exc))
        exc = exc.__cause__ or exc.__context__
    texts.append((tmp_path / "cache" / "aihub_ledger.jsonl").read_text())
    assert "was refused" in str(err.value)  # the reason itself is shown ...
    for text in texts:
        assert TOKEN not in text  # ... without the token
    # The token was in use all along (every API request carried it).
    assert fake.count("GET", r"/devices/$") > 0
    assert len(caplog.records) > 10


def test_compile_jobs_are_shared(
    fake: FakeAIHub, models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg(tmp_path, share_with=["lpcv@example.com", "team@example.com"])
    runtime, events = runtime_with_events(cfg)
    with caplog.at_level(logging.INFO, logger="lpcvlab"):
        runs = runtime.run_components(track1_jobs(models, n=2))
    for component, run in runs.items():
        assert fake.shared[run.compiled.job_id] == ["lpcv@example.com", "team@example.com"]
        assert "SHARED with lpcv@example.com, team@example.com" in statuses(
            events, component, "compile"
        )
    assert set(fake.shared) == {run.compiled.job_id for run in runs.values()}
    assert "SHARED with lpcv@example.com" in caplog.text


# --------------------------------------------------------------------------- config, CLI, files


def test_composed_config_builds_the_runtime(fake: FakeAIHub, tmp_path: Path) -> None:
    overrides = [
        "hub=aihub",
        "runtime=qnn_context_binary",
        "device=dragonwing_iq9075_evk",
        f"paths.cache_dir={tmp_path}/cache",
        "hub.share_with=[lpcv@example.com]",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    runtime = build_runtime(cfg)
    assert isinstance(runtime, AIHubRuntime)
    assert runtime.device == "Dragonwing IQ-9075 EVK"
    assert runtime.target_runtime == "qnn_context_binary"
    assert runtime.settings.share_with == ("lpcv@example.com",)
    assert "video" in runtime.channel_last_inputs
    assert runtime.ledger.path == tmp_path / "cache" / "aihub_ledger.jsonl"
    assert fake.requests == []  # building the runtime costs nothing


def test_every_hub_key_is_read() -> None:
    cfg = OmegaConf.load(CONF / "hub" / "aihub.yaml")
    keys = set(cfg) - {"name"}
    assert keys == {f for f in HubSettings.__dataclass_fields__}
    assert cfg.name == "aihub"
    settings = HubSettings.from_cfg(cfg)
    assert settings.max_profiler_iterations == 100 and settings.reuse is True
    assert settings.share_with == () and settings.channel_last_inputs == ("video",)
    with pytest.raises(ConfigError, match="hub.max_profiler_iteration "):
        HubSettings.from_cfg({**OmegaConf.to_container(cfg), "max_profiler_iteration ": 5})
    with pytest.raises(ConfigError, match="unknown hub.reuse_jobs"):
        HubSettings.from_cfg({"reuse_jobs": True})


def test_hub_devices_cli(fake: FakeAIHub, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="lpcvlab")
    add_hub_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hub", "devices", "--attribute", "framework:qnn"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == sorted(DEVICES)


def test_odd_external_data_is_restaged(tmp_path: Path) -> None:
    """AI Hub takes one ``.data`` file; other external-data layouts are rewritten to that."""
    src = tmp_path / "src"
    src.mkdir()
    exported = image_encoder(src, external=False)
    model = onnx.load(str(exported.path))
    odd = src / "odd.onnx"
    onnx.save_model(
        model, str(odd), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    files = aihub._external_data_files(odd)
    assert [f.name for f in files] == ["weights.bin"]
    staged = aihub._stage_model(odd, files, tmp_path / "stage")
    assert staged.name == "odd.onnx" and staged.is_dir()
    assert sorted(p.name for p in staged.iterdir()) == ["odd.data", "odd.onnx"]
    x = image_inputs(1)
    ref = local_outputs(exported, x)
    session = ort.InferenceSession(str(staged / "odd.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x})[0], ref, rtol=1e-6)
