"""AI Hub hub against the real ``qai_hub`` client, faked below urllib3's retries (no network)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import aihub_fake
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import qai_hub
import qai_hub.public_api_pb2 as pb
import qai_hub.util.session
from aihub_fake import API_HOST, DEVICES, FakeAIHub, ledger_lines, without_backoff_sleeps
from conftest import compose_config
from omegaconf import OmegaConf
from onnx import TensorProto, helper, numpy_helper

from lpcvlab.cli.hub import add_hub_commands
from lpcvlab.config import composition_error, load_settings
from lpcvlab.config.schema import AIHubConfig, DeviceConfig, RuntimeConfig
from lpcvlab.deploy.precision import Calibration, ComponentPrecision
from lpcvlab.errors import ConfigError, RuntimeStageError
from lpcvlab.hubs import ComponentJob, Hub, build_hub
from lpcvlab.hubs.aihub import AIHub, stages
from lpcvlab.hubs.aihub import jobs as aihub_jobs
from lpcvlab.hubs.aihub.jobs import JobLedger, LedgerEntry, job_key
from lpcvlab.hubs.aihub.settings import (
    compile_options,
    from_device,
    samples_per_chunk,
    to_device,
)
from lpcvlab.hubs.aihub.stages import HubTarget
from lpcvlab.hubs.profile import parse_profile
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.types import DeviceTensor, ExportResult, JobEvent, TensorSpec
from lpcvlab.util.hashing import file_sha256

pytestmark = pytest.mark.hub

CONF = Path(__file__).resolve().parents[1] / "conf"
TOKEN = "qaihub-test-token-5f2c9d81e4b7"
QAIRT = "--qairt_version 2.42"  # hub.qairt_version: AIHM v0.46.1's pin
TRACK1_OPTIONS = f"--target_runtime qnn_dlc --truncate_64bit_io {QAIRT}"
TRACK2_OPTIONS = (
    f"--target_runtime qnn_context_binary --truncate_64bit_io {QAIRT} "
    "--force_channel_last_input video --output_names class_probs"
)
# Tries of one request by the client's urllib3 retries (LogRetry): the first and its retries.
CLIENT_TRIES = qai_hub.util.session.MAX_RETRIES + 1

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
    without_backoff_sleeps(monkeypatch)
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


@functools.cache
def composed(
    runtime: str = "qnn_dlc", device: str = "xr2_gen2_proxy", track: str = "retrieval"
) -> tuple[AIHubConfig, DeviceConfig, RuntimeConfig]:
    """The typed ``hub``, ``device`` and ``runtime`` groups of a composed ``hub=aihub`` config."""
    settings = load_settings(
        compose_config("hub=aihub", f"runtime={runtime}", f"device={device}", f"track={track}")
    )
    assert isinstance(settings.hub, AIHubConfig)
    return settings.hub, settings.device, settings.runtime


def make_hub(
    tmp_path: Path,
    runtime: str = "qnn_dlc",
    device: str = "xr2_gen2_proxy",
    track: str = "retrieval",
    **hub: object,
) -> AIHub:
    """An AI Hub built from the composed groups, ``hub.<key>`` replaced by ``hub``; no polling
    pause; the ledger under ``tmp_path/cache``."""
    settings, device_cfg, runtime_cfg = composed(runtime, device, track)
    settings = dataclasses.replace(settings, **{"poll_interval_s": 0, **hub})
    return AIHub(settings, device_cfg, runtime_cfg, track=track, cache_dir=tmp_path / "cache")


def with_events(hub: AIHub) -> tuple[AIHub, list[JobEvent]]:
    events: list[JobEvent] = []
    hub.job_listener = events.append
    return hub, events


def hub_with_events(tmp_path: Path, **kwargs: object) -> tuple[AIHub, list[JobEvent]]:
    return with_events(make_hub(tmp_path, **kwargs))


def track1_jobs(models, n: int = 5) -> list[ComponentJob]:
    return [
        ComponentJob(models["image_encoder"], image_inputs(n)),
        ComponentJob(models["text_encoder"], text_inputs(n)),
    ]


def statuses(events: list[JobEvent], component: str, kind: str) -> list[str]:
    return [e.status or "" for e in events if e.component == component and e.kind == kind]


# --------------------------------------------------------------------------- end to end


def test_track1_pair_compile_profile_infer(fake: FakeAIHub, models, tmp_path: Path) -> None:
    hub, events = hub_with_events(tmp_path)
    jobs = track1_jobs(models)
    runs = hub.run_components(jobs)

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
    # Models and datasets moved with the short-lived S3 credentials qai-hub 0.56 asks for.
    moved = {t.rsplit(" ", 1)[0] for t in fake.credential_transfers}
    assert moved == {"upload model", "upload dataset", "download dataset", "download model"}

    # Every independent job went up before any was waited on: both compiles before either
    # finished, and each component's profile and inference jobs before any of them finished.
    assert max(j.created_seq for j in compiles) < min(j.done_seq for j in compiles)
    for component in runs:
        run = runs[component]
        follow = [fake.jobs[run.profile.job_id], fake.jobs[run.inference.job_id]]
        assert max(j.created_seq for j in follow) < min(j.done_seq for j in follow)


def test_presigned_urls_still_work(fake: FakeAIHub, models, tmp_path: Path) -> None:
    """A service (or client) without S3 credentials: pre-signed URLs, the same results."""
    fake.offer_credentials = False
    hub, _ = hub_with_events(tmp_path)
    run = hub.run_components([ComponentJob(models["text_encoder"], text_inputs(3))])
    assert fake.credential_transfers == [] and fake.s3_objects == {}
    expected = local_outputs(models["text_encoder"], text_inputs(3))
    assert cosine_per_sample(expected, run["text_encoder"].inference.outputs).min() > 0.999
    assert run["text_encoder"].compiled.artifact.read_bytes().startswith(b"FAKE-QAIRT")


def test_quantized_io_is_quantized_and_dequantized_with_the_specs_scale(
    fake: FakeAIHub, models, tmp_path: Path
) -> None:
    """hub.quantize_io=true: the compiled model reports uint8 I/O with a scale and zero point;
    inputs go up quantized with them and outputs come back dequantized, so the scores match
    the float-I/O model's to the quantization error. Each compiled model's I/O is shown to the
    contract's check."""
    exported, inputs = models["image_encoder"], image_inputs(6)
    precision = calibrated("w8a8", image_inputs(8, seed=3))
    seen, runs = [], {}
    for quantize_io in (False, True):
        hub, _ = hub_with_events(tmp_path, quantize_io=quantize_io)
        hub.compiled_check = lambda c, io, where: seen.append((c, io, where))
        job = ComponentJob(exported, inputs, precision=precision)
        runs[quantize_io] = hub.run_components([job])["image_encoder"]
    assert len(fake.jobs_of("quantize")) == 1  # the same quantize job; two device compiles
    (x,), (y,) = runs[True].compiled.io.inputs, runs[True].compiled.io.outputs
    assert (x.dtype, y.dtype) == ("uint8", "uint8") and x.scale > 0 and y.scale > 0
    assert [t.dtype for t in runs[False].compiled.io.inputs] == ["float32"]
    assert [(c, io.inputs[0].dtype) for c, io, _ in seen] == [
        ("image_encoder", "float32"),
        ("image_encoder", "uint8"),
    ]
    assert seen[1][2] == f"compile job {runs[True].compiled.job_id}"
    # what went up was uint8 (the fake refuses any other dtype), what came back float32
    floats, dequantized = runs[False].inference.outputs, runs[True].inference.outputs
    assert dequantized.dtype == np.float32
    assert cosine_per_sample(floats, dequantized).min() > 0.99
    assert np.abs(dequantized - floats).max() < 8 * y.scale


def test_a_float_to_integer_cast_without_a_scale_is_refused() -> None:
    quantized = DeviceTensor("image", (1, 3), "uint8", 0.5, 10)
    got = to_device(np.array([[0.0, 1.0, 200.0]], np.float32), quantized)
    assert got.dtype == np.uint8 and got.tolist() == [[10, 12, 255]]  # rint, clipped
    assert from_device(got, quantized).tolist() == [[0.0, 1.0, 122.5]]
    with pytest.raises(RuntimeStageError, match="without a scale and zero point"):
        to_device(np.zeros((1, 3), np.float32), DeviceTensor("image", (1, 3), "uint8"))
    tokens = to_device(np.array([[49406, 7]], np.int64), DeviceTensor("text", (1, 2), "int32"))
    assert tokens.dtype == np.int32 and tokens.tolist() == [[49406, 7]]
    half = from_device(np.ones((1, 2), np.float16), DeviceTensor("o", (1, 2), "float16"))
    assert half.dtype == np.float32


def test_a_compiled_model_another_process_brought_down_is_used(
    fake: FakeAIHub, models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sweep jobs reusing one compile job may download its target model at once: the one
    whose folder lands second uses the first's, and leaves no partial folder behind."""
    download = qai_hub.Model.download

    def racing(self, filename, timeout=None):
        final = Path(filename).parent / Path(filename).name.split(".")[1]
        final.mkdir()
        (final / "first.dlc").write_bytes(b"the other process's copy")
        return download(self, filename, timeout)

    monkeypatch.setattr(qai_hub.Model, "download", racing)
    hub, _ = hub_with_events(tmp_path)
    compiled = hub.compile(models["text_encoder"])
    assert compiled.artifact.name == "first.dlc"
    assert compiled.artifact_sha256 == file_sha256(compiled.artifact)
    assert [p.name for p in compiled.artifact.parent.parent.iterdir()] == [compiled.job_id]


def test_track2_channel_last_video(fake: FakeAIHub, models, tmp_path: Path) -> None:
    hub, _ = hub_with_events(
        tmp_path, runtime="qnn_context_binary", device="dragonwing_iq9075_evk", track="video"
    )
    exported = models["video_classifier"]
    inputs = video_inputs(4)
    run = hub.run_components([ComponentJob(exported, inputs)])["video_classifier"]

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
    hub, _ = hub_with_events(tmp_path, chunk_bytes=2 * sample_bytes)
    exported = models["image_encoder"]
    inputs = image_inputs(5, seed=7)
    compiled = hub.compile(exported)
    result = hub.infer(compiled, inputs)

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


def test_samples_per_chunk(fake: FakeAIHub, tmp_path: Path) -> None:
    default = AIHubConfig().chunk_bytes
    assert default == composed()[0].chunk_bytes
    assert samples_per_chunk((1, 3, 16, 112, 112), "float32", default) == 538
    assert samples_per_chunk((1, 77), "int32", 77 * 4 * 3) == 3
    with pytest.raises(ConfigError, match="chunk_bytes"):
        samples_per_chunk((1, 3, 224, 224), "float32", 1000)
    with pytest.raises(ConfigError, match="2 GB"):
        make_hub(tmp_path, chunk_bytes=3 * 1024**3)
    with pytest.raises(ConfigError, match="2 GB"):
        samples_per_chunk((1, 77), "int32", 3 * 1024**3)
    # A composed config is refused when it is loaded, naming the key.
    with pytest.raises(ConfigError, match="hub.chunk_bytes="):
        load_settings(compose_config("hub=aihub", f"hub.chunk_bytes={3 * 1024**3}"))
    assert fake.requests == []


# --------------------------------------------------------------------------- options, profile


@pytest.mark.parametrize(
    ("runtime", "image", "video"),
    [
        (
            "qnn_dlc",
            "--target_runtime qnn_dlc --truncate_64bit_io",
            "--target_runtime qnn_dlc --truncate_64bit_io",
        ),
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
    cl = composed()[0].channel_last_inputs
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
    # hub.qairt_version pins the compile of the QNN targets, whose compilation it changes
    # (AIHM's qairt_version_changes_compilation); tflite and onnx compiles go without it.
    pinned = compile_options(
        models["text_encoder"], rt.target_runtime, rt.compile_options, qairt_version="2.42"
    )
    qnn = runtime in ("qnn_dlc", "qnn_context_binary", "precompiled_qnn_onnx")
    assert pinned == f"--target_runtime {runtime} --truncate_64bit_io" + (
        f" {QAIRT}" if qnn else ""
    )


def test_compile_options_extra_and_conflicts(models) -> None:
    exported = models["image_encoder"]
    got = compile_options(exported, "qnn_dlc", "--truncate_64bit_io", (), " --compute_unit  npu")
    assert got == "--target_runtime qnn_dlc --truncate_64bit_io --compute_unit npu"
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


def test_qairt_version_reaches_every_job_keys_the_ledger_and_is_reported(
    fake: FakeAIHub, models, tmp_path: Path
) -> None:
    """hub.qairt_version goes to compile, profile and inference jobs (extra options after it),
    the compiled model's reported version is an event, and a job made under another version
    is never reused."""
    hub, events = hub_with_events(tmp_path, qairt_version="2.43", **_EXTRA_NPU)
    hub.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    (compile_job,) = fake.jobs_of("compile")
    assert compile_job.request.options == (
        "--target_runtime qnn_dlc --truncate_64bit_io --qairt_version 2.43 --compute_unit npu"
    )
    (profile_job,) = fake.jobs_of("inference", profiling=True)
    assert profile_job.request.options == (
        "--max_profiler_iterations 7 --qairt_version 2.43 --compute_unit npu"
    )
    (inference_job,) = fake.jobs_of("inference", profiling=False)
    assert inference_job.request.options == "--qairt_version 2.43 --compute_unit npu"
    assert statuses(events, "text_encoder", "qairt_version") == ["2.43.0"]  # as reported
    ledger = ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")
    assert {e["inputs"]["qairt_version"] for e in ledger} == {"2.43"}

    # The same version again: every job reused. Another: every job paid again.
    again, events = hub_with_events(tmp_path, qairt_version="2.43", **_EXTRA_NPU)
    again.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    for kind in ("compile", "profile", "inference"):
        assert statuses(events, "text_encoder", kind) == ["REUSED"], kind
    other, events = hub_with_events(tmp_path, qairt_version="2.42", **_EXTRA_NPU)
    other.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    for kind in ("compile", "profile", "inference"):
        assert statuses(events, "text_encoder", kind)[0] == "SUBMITTED", kind
    assert statuses(events, "text_encoder", "qairt_version") == ["2.42.0"]
    # null: AI Hub's default of the day, no option sent; the ledger keys it "default"
    default, events = hub_with_events(tmp_path, qairt_version=None, **_EXTRA_NPU)
    default.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    newest = max(fake.jobs_of("compile"), key=lambda j: j.created_seq)
    assert "--qairt_version" not in newest.request.options
    assert statuses(events, "text_encoder", "qairt_version") == ["2.45.0"]  # the fake's default


_EXTRA_NPU = {
    "extra_compile_options": "--compute_unit npu",
    "extra_profile_options": "--compute_unit npu",
    "extra_inference_options": "--compute_unit npu",
    "profile_iterations": 7,
}


def test_profile_with_missing_fields(fake: FakeAIHub, models, tmp_path: Path) -> None:
    # An old-format profile: no memory ranges, no per-layer detail.
    fake.profile_detail = lambda job: pb.ProfileDetail(
        major_version=1, minor_version=0, execution_time=1234
    )
    hub, _ = hub_with_events(tmp_path)
    compiled = hub.compile(models["text_encoder"])
    profile = hub.profile(compiled)
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


# --------------------------------------------------------------------------- precision


def calibrated(precision: str, samples: np.ndarray) -> ComponentPrecision:
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    return ComponentPrecision(precision, Calibration(samples, digest, "eval_spread"))


def test_quantized_component_quantize_compile_profile_infer_then_reused(
    fake: FakeAIHub, models, tmp_path: Path
) -> None:
    exported = models["video_classifier"]
    inputs = video_inputs(4)
    precision = calibrated("w8a16", video_inputs(8, seed=5))
    job = ComponentJob(exported, inputs, precision=precision)
    hub, events = hub_with_events(
        tmp_path, runtime="qnn_context_binary", device="dragonwing_iq9075_evk", track="video"
    )
    run = hub.run_components([job])["video_classifier"]

    (quantize,) = fake.jobs_of("quantize")
    assert quantize.request.weights_dtype == pb.QUANTIZE_DTYPE_INT8
    assert quantize.request.activations_dtype == pb.QUANTIZE_DTYPE_INT16
    assert quantize.request.options == "--range_scheme min_max"  # AIHM's w8a16 option
    assert quantize.calibration_samples == 8  # the dataset held the calibration samples
    name = fake.dataset_names[quantize.request.calibration_dataset.dataset_id]
    assert name == "video-video_classifier quantize w8a16 calibration"
    # AIHM's order: the export compiled to an ONNX target, that model quantized, the quantized
    # model compiled for the device -- with float I/O (hub.quantize_io=false, the submission
    # contract's); only the export was uploaded.
    onnx_job, compile_job = sorted(fake.jobs_of("compile"), key=lambda j: j.created_seq)
    assert onnx_job.request.options == "--target_runtime onnx --output_names class_probs"
    assert quantize.request.model.model_id == onnx_job.target_model_id
    assert quantize.created_seq > onnx_job.done_seq
    assert compile_job.request.model.model_id == quantize.target_model_id
    assert compile_job.request.options == TRACK2_OPTIONS
    assert run.compiled.io.inputs[0].dtype == "float32" and run.compiled.io.inputs[0].scale is None
    assert fake.count("POST", r"/models/$") == 1
    assert compile_job.created_seq > quantize.done_seq
    # ... then profiled and run like any model; its outputs are the quantized model's.
    assert run.profile.latency_ms == pytest.approx(5.4)
    expected = local_outputs(exported, inputs)
    cos = cosine_per_sample(expected, run.inference.outputs)
    assert cos.min() > 0.99 and run.inference.metrics["device_parity_cosine_min"] < 1.0
    q = run.quantized
    assert (q.precision, q.job_id, q.calibration_sha256) == (
        "w8a16",
        quantize.job_id,
        precision.calibration.sha256,
    )
    assert "AI Hub quantize job" in q.method and q.job_url
    # The deployed graph came down: the quantize job's QDQ model, int16 activations; and so
    # did what AI Hub built of it (the compile job's context binary), once each.
    assert q.model is not None
    assert fake.model_downloads == [quantize.target_model_id, compile_job.target_model_id]
    assert run.compiled.artifact.suffix == ".bin"
    assert run.compiled.artifact_sha256 == file_sha256(run.compiled.artifact)
    assert q.model.path.parent.parent == tmp_path / "cache" / "aihub_models"
    assert q.model.sha256 == file_sha256(q.model.path) != exported.sha256
    graph = onnx.load(str(q.model.path)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    types = {i.name: i.data_type for i in graph.initializer}
    zero_points = [n.input[2] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert onnx.TensorProto.INT16 in {types.get(z) for z in zero_points}
    seen = statuses(events, "video_classifier", "quantize")
    assert seen[0] == "SUBMITTED" and seen[-1] == "SUCCESS" and "QUANTIZING_MODEL" in seen
    ledger = ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")
    entry = next(e for e in ledger if e["kind"] == "quantize")
    assert entry["inputs"]["calibration_sha256"] == precision.calibration.sha256
    assert (entry["inputs"]["weights_dtype"], entry["inputs"]["activations_dtype"]) == (
        "INT8",
        "INT16",
    )
    assert entry["inputs"]["onnx_compile_job"] == onnx_job.job_id
    onnx_entry = next(e for e in ledger if e["kind"] == "onnx_compile")
    assert onnx_entry["inputs"]["model_sha256"] == exported.sha256
    compiled = next(e for e in ledger if e["kind"] == "compile")
    assert compiled["inputs"]["quantize_job"] == quantize.job_id

    # A second run pays for nothing: quantize, compile, profile and inference are reused.
    before = len(fake.jobs)
    again, events = hub_with_events(
        tmp_path, runtime="qnn_context_binary", device="dragonwing_iq9075_evk", track="video"
    )
    run2 = again.run_components([job])["video_classifier"]
    assert len(fake.jobs) == before
    for kind in ("onnx_compile", "quantize", "compile", "profile", "inference"):
        assert statuses(events, "video_classifier", kind) == ["REUSED"], kind
    np.testing.assert_array_equal(run2.inference.outputs, run.inference.outputs)
    assert run2.quantized.job_id == quantize.job_id
    assert len(fake.model_downloads) == 2  # both files read again from the cache folder
    assert run2.compiled.artifact_sha256 == run.compiled.artifact_sha256

    # Other calibration data, or other activations, is another quantize job.
    for other in (
        calibrated("w8a16", video_inputs(8, seed=6)),
        calibrated("w8a8", video_inputs(8, seed=5)),
    ):
        third, events = hub_with_events(
            tmp_path, runtime="qnn_context_binary", device="dragonwing_iq9075_evk", track="video"
        )
        third.run_components([ComponentJob(exported, inputs, precision=other)])
        assert statuses(events, "video_classifier", "quantize")[0] == "SUBMITTED"
    assert [j.request.activations_dtype for j in fake.jobs_of("quantize")] == [
        pb.QUANTIZE_DTYPE_INT16,
        pb.QUANTIZE_DTYPE_INT16,
        pb.QUANTIZE_DTYPE_INT8,
    ]


def test_fp16_uploads_the_fp32_export_with_the_runtimes_fp16_options(
    fake: FakeAIHub, models, tmp_path: Path
):
    """As AIHM makes fp16: the fp32 export goes up and is compiled with --quantize_full_type
    float16; the fp16 graph converted here is only linted; the compiled target model is the
    deployed artifact, downloaded once with its sha256."""
    hub, events = hub_with_events(tmp_path)
    checked: list[tuple[str, str]] = []
    hub.graph_check = lambda component, label, path: checked.append((component, label))
    fp16 = ComponentPrecision("fp16")
    jobs = [
        ComponentJob(models["image_encoder"], image_inputs(2), precision=fp16),
        ComponentJob(models["text_encoder"], text_inputs(2)),
    ]
    runs = hub.run_components(jobs)
    options = {
        fake.models[j.request.model.model_id].name: j.request.options
        for j in fake.jobs_of("compile")
    }
    assert options == {
        "retrieval-image_encoder": "--target_runtime qnn_dlc --truncate_64bit_io "
        f"--quantize_full_type float16 {QAIRT}",
        "retrieval-text_encoder": TRACK1_OPTIONS,
    }
    assert fake.jobs_of("quantize") == []
    assert checked == [("image_encoder", "fp16")]  # the local conversion, linted
    q = runs["image_encoder"].quantized
    assert q.precision == "fp16" and q.model is None
    assert "--quantize_full_type float16" in q.method
    # What went up is the fp32 export itself: AI Hub makes the fp16 model.
    (image_compile,) = [j for j in fake.jobs_of("compile") if "image" in j.request.name]
    source = fake.models[image_compile.request.model.model_id]
    uploaded = aihub_fake._load_onnx(source)  # a zipped .onnx folder: external weights
    export = onnx.load(str(models["image_encoder"].path))
    assert uploaded.graph.SerializeToString() == export.graph.SerializeToString()
    # float I/O (no --quantize_io): what the organisers' harness feeds
    compiled = runs["image_encoder"].compiled
    assert [t.dtype for t in (*compiled.io.inputs, *compiled.io.outputs)] == ["float32"] * 2
    # the deployed artifact: the compile job's target model (.dlc), downloaded once
    assert compiled.artifact.suffix == ".dlc" and compiled.artifact.read_bytes().startswith(
        b"FAKE-QAIRT"
    )
    assert compiled.artifact_sha256 == file_sha256(compiled.artifact)
    assert compiled.artifact.parent.name == image_compile.job_id
    assert compiled.toolchain == "QAIRT 2.42.0"
    assert fake.model_downloads.count(image_compile.target_model_id) == 1
    # fp16 and fp32 of the same export are different compile jobs in the ledger.
    again, events = hub_with_events(tmp_path)
    again.run_components([ComponentJob(models["image_encoder"], image_inputs(2))])
    assert statuses(events, "image_encoder", "compile")[0] == "SUBMITTED"
    # hub.quantize_io=true (AIHM's choice) gives float16 I/O, which the inputs are cast to.
    io16, _ = hub_with_events(tmp_path, quantize_io=True)
    run16 = io16.run_components(
        [ComponentJob(models["image_encoder"], image_inputs(2), precision=fp16)]
    )["image_encoder"]
    assert "--quantize_full_type float16 --quantize_io" in run16.compiled.handle.options
    assert run16.compiled.io.inputs[0].dtype == "float16"
    assert run16.inference.outputs.dtype == np.float32  # widened back for scoring
    cos = cosine_per_sample(runs["image_encoder"].inference.outputs, run16.inference.outputs)
    assert cos.min() > 0.99


def test_a_failed_quantize_job_says_why(fake: FakeAIHub, models, tmp_path: Path) -> None:
    hub, _ = hub_with_events(tmp_path)
    # Calibration data of the wrong shape reaches AI Hub only if lpcvlab let it through; the
    # service refuses it with a reason, which the run shows with the job's ID.
    wrong = calibrated("w8a8", np.zeros((8, 3, 4, 4), np.float32))
    with pytest.raises(RuntimeStageError, match="calibration input image is .* the model takes"):
        hub.run_components(
            [ComponentJob(models["image_encoder"], image_inputs(2), precision=wrong)]
        )
    # Only the ONNX compile that quantize starts from ran: no device compile followed.
    (onnx_job,) = fake.jobs_of("compile")
    assert onnx_job.request.options.startswith("--target_runtime onnx ")


# --------------------------------------------------------------------------- ledger


def test_second_run_reuses_every_job(fake: FakeAIHub, models, tmp_path: Path) -> None:
    first, _ = hub_with_events(tmp_path)
    runs1 = first.run_components(track1_jobs(models))
    jobs_before = len(fake.jobs)
    uploads = (fake.count("POST", r"/models/$"), fake.count("POST", r"/datasets/$"))
    assert jobs_before == 6

    second, events = hub_with_events(tmp_path)
    runs2 = second.run_components(track1_jobs(models))
    assert len(fake.jobs) == jobs_before, "a rerun paid for new jobs"
    assert (fake.count("POST", r"/models/$"), fake.count("POST", r"/datasets/$")) == uploads
    for component, run in runs2.items():
        for kind in ("compile", "profile", "inference"):
            assert statuses(events, component, kind) == ["REUSED"]
        np.testing.assert_array_equal(run.inference.outputs, runs1[component].inference.outputs)
        assert run.compiled.job_id == runs1[component].compiled.job_id
        assert run.profile.latency_ms == runs1[component].profile.latency_ms

    third, events = hub_with_events(tmp_path, reuse=False)
    third.run_components(track1_jobs(models))
    assert len(fake.jobs) == 2 * jobs_before
    assert "REUSED" not in {e.status for e in events}

    # Different inputs are a different inference job; compile and profile are still reused.
    fourth, events = hub_with_events(tmp_path)
    fourth.run_components([ComponentJob(models["text_encoder"], text_inputs(5, seed=1))])
    assert statuses(events, "text_encoder", "compile") == ["REUSED"]
    assert statuses(events, "text_encoder", "inference")[0] == "SUBMITTED"

    ledger = ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")
    entry = next(e for e in ledger if e["kind"] == "compile")
    assert entry["inputs"]["model_sha256"] and entry["options"] == TRACK1_OPTIONS
    assert entry["device"] == "XR2 Gen 2 (Proxy)" and entry["url"].endswith(f"{entry['job_id']}/")
    assert any(e["kind"] == "inference" and e["inputs"]["dataset_sha256"] for e in ledger)


def test_reused_job_with_expired_outputs_reads_the_kept_outputs(
    fake: FakeAIHub, models, tmp_path: Path
) -> None:
    """AI Hub deletes a job's outputs after 30 days; the cache kept them, so reusing the job
    costs nothing. Only when that copy is gone too is the job run again."""
    first, _ = hub_with_events(tmp_path)
    jobs = [ComponentJob(models["text_encoder"], text_inputs(3))]
    before = first.run_components(jobs)["text_encoder"]
    (done,) = fake.jobs_of("inference", profiling=False)
    assert (tmp_path / "cache" / "aihub_outputs" / f"{done.job_id}.h5").is_file()
    fake.expired |= {done.output_dataset_id}
    downloads = fake.count("GET", r"/datasets/.*/download_data")

    second, events = hub_with_events(tmp_path)
    kept = second.run_components(jobs)["text_encoder"]
    assert statuses(events, "text_encoder", "inference") == ["REUSED"]
    assert len(fake.jobs_of("inference", profiling=False)) == 1
    assert fake.count("GET", r"/datasets/.*/download_data") == downloads  # read from the cache
    np.testing.assert_array_equal(kept.inference.outputs, before.inference.outputs)

    for f in (tmp_path / "cache" / "aihub_outputs").iterdir():
        f.unlink()
    third, events = hub_with_events(tmp_path)
    after = third.run_components(jobs)["text_encoder"]
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
    fake.hold = True  # the queue is slow: nothing finishes

    def interrupt(seconds: float) -> None:
        raise _Interrupted

    with monkeypatch.context() as m:
        m.setattr(aihub_jobs.time, "sleep", interrupt)
        first, _ = hub_with_events(tmp_path)
        with pytest.raises(_Interrupted):
            first.run_components(track1_jobs(models))
    ledger = ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")
    assert [(e["kind"], e["status"]) for e in ledger] == [("compile", "SUBMITTED")] * 2
    assert len(fake.jobs_of("compile")) == 2

    fake.hold = False
    second, events = hub_with_events(tmp_path)
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
    hub, events = hub_with_events(tmp_path)
    with pytest.raises(RuntimeStageError) as err:
        hub.run_components(track1_jobs(models))
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
    rerun, _ = hub_with_events(tmp_path)
    runs = rerun.run_components(track1_jobs(models))
    assert runs["text_encoder"].compiled.job_id != text_job.job_id


def test_failed_inference_chunk(fake: FakeAIHub, models, tmp_path: Path) -> None:
    fake.inference_failures["inference"] = "Device lost during inference"
    hub, _ = hub_with_events(tmp_path)
    with pytest.raises(RuntimeStageError, match="Device lost during inference") as err:
        hub.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
    (compile_job,) = fake.jobs_of("compile")
    assert compile_job.job_id in str(err.value)


def test_missing_token_fails_before_any_request(
    fake: FakeAIHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QAI_HUB_API_TOKEN")
    with pytest.raises(ConfigError) as err:
        make_hub(tmp_path)
    message = str(err.value)
    assert "QAI_HUB_API_TOKEN" in message and "qai-hub configure --api_token" in message
    assert "absent-client.ini" in message
    assert fake.requests == []

    ini = tmp_path / "client.ini"
    ini.write_text("[api]\napi_url = https://x.invalid\nweb_url = https://x.invalid\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    with pytest.raises(ConfigError, match="could not be read"):
        make_hub(tmp_path)
    assert fake.requests == []


def test_token_from_client_ini(fake: FakeAIHub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("QAI_HUB_API_TOKEN")
    ini = tmp_path / "client.ini"
    ini.write_text(
        "[api]\napi_url = https://workbench.aihub.qualcomm.com\n"
        f"web_url = https://workbench.aihub.qualcomm.com\napi_token = {TOKEN}\n"
    )
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    hub = make_hub(tmp_path)
    assert hub.list_devices() == sorted(DEVICES)


def test_rejected_token_is_a_config_error(fake: FakeAIHub, tmp_path: Path, monkeypatch) -> None:
    wrong = "qaihub-wrong-token-0000"
    monkeypatch.setenv("QAI_HUB_API_TOKEN", wrong)
    hub = make_hub(tmp_path)
    with pytest.raises(ConfigError, match="rejected the API token") as err:
        hub.list_devices()
    assert wrong not in str(err.value)


def test_host_cpu_is_not_an_aihub_device(fake: FakeAIHub, tmp_path: Path) -> None:
    settings, _, runtime = composed()
    host_cpu = DeviceConfig(name="host_cpu", aihub_name=None)
    with pytest.raises(ConfigError, match="device=host_cpu has no AI Hub device"):
        AIHub(settings, host_cpu, runtime, track="retrieval", cache_dir=tmp_path)
    # A composed config is refused when it is loaded, before any hub is built.
    with pytest.raises(ConfigError, match="device=host_cpu has no AI Hub device"):
        load_settings(compose_config("hub=aihub", "device=host_cpu"))
    assert fake.requests == []


def test_unknown_device_name(fake: FakeAIHub, models, tmp_path: Path) -> None:
    settings, device, runtime = composed()
    unknown = dataclasses.replace(device, aihub_name="Snapdragon 9 Gen 9")
    hub = AIHub(settings, unknown, runtime, track="retrieval", cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="lpcvlab hub devices"):
        hub.compile(models["text_encoder"])
    assert fake.count("POST", r"/models/$") == 0
    with pytest.raises(ConfigError, match="lpcvlab hub devices"):
        hub.preflight()


# --------------------------------------------------------------------------- preflight


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ("dns", f"the name {API_HOST} could not be resolved (DNS)"),
        ("refused", f"{API_HOST} refused the connection"),
        ("connect_timeout", f"{API_HOST} did not accept a connection within 0.5 s"),
    ],
)
def test_unreachable_ai_hub_is_one_line_at_once(
    fake: FakeAIHub, tmp_path: Path, failure: str, reason: str, monkeypatch
) -> None:
    fake.fail_requests(lambda m, p: True, times=100, failure=failure)
    hub = make_hub(tmp_path, connect_timeout_s=0.5)
    waits: list[float] = []  # every sleep: the fake's simulated connect timeout, any backoff
    monkeypatch.setattr(time, "sleep", waits.append)
    with pytest.raises(ConfigError) as err:
        hub.preflight()
    message = one_line(err.value)
    assert reason in message
    assert f"https://{API_HOST}" in message
    assert "proxy" in message and "API URL" in message
    assert "absent-client.ini" not in message  # only files that exist are named
    # "within 60 s": nothing waited but the connect timeout given, once (no retry, no backoff)
    assert waits == ([0.5] if failure == "connect_timeout" else [])
    # One probe, no retries, and nothing uploaded or submitted.
    assert fake.requests == [("GET", f"https://{API_HOST}/")]


def test_unreachable_names_the_client_config_only_when_it_exists(
    fake: FakeAIHub, tmp_path: Path, monkeypatch
) -> None:
    ini = tmp_path / "client.ini"
    ini.write_text(
        f"[api]\napi_token = {TOKEN}\napi_url = https://{API_HOST}\nweb_url = https://{API_HOST}\n"
    )
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    fake.fail_requests(lambda m, p: True, times=100, failure="refused")
    with pytest.raises(ConfigError) as err:
        make_hub(tmp_path, connect_timeout_s=0.5).preflight()
    assert f"the api_url in {ini}" in one_line(err.value)


def test_rejected_token_stops_preflight(fake: FakeAIHub, tmp_path: Path, monkeypatch) -> None:
    wrong = "qaihub-wrong-token-0000"
    monkeypatch.setenv("QAI_HUB_API_TOKEN", wrong)
    hub = make_hub(tmp_path)
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    with pytest.raises(ConfigError, match="rejected the API token") as err:
        hub.preflight()
    assert waits == []  # stopped at once: no retry, no backoff
    message = one_line(err.value)
    assert "QAI_HUB_API_TOKEN" in message and "qai-hub configure --api_token" in message
    assert wrong not in message
    assert [m for m, _ in fake.requests] == ["GET", "GET"]  # the probe, the device lookup
    assert fake.count("GET", r"/devices/$") == 1  # a 401 is not retried


def test_preflight_checks_reachability_token_and_device_once(
    fake: FakeAIHub, models, tmp_path: Path
) -> None:
    hub = make_hub(tmp_path)
    hub.preflight()
    assert [urlpath(u) for _, u in fake.requests] == ["/", "/api/v1/devices/"]
    hub.compile(models["text_encoder"])
    # lpcvlab checked the device once; the client selects it itself for each submission.
    lookups = [u for m, u in fake.requests if urlpath(u) == "/api/v1/devices/"]
    assert ["select=True" in u for u in lookups] == [False, True]


def urlpath(url: str) -> str:
    return re.sub(r"^https://[^/]+", "", url).split("?")[0]


# --------------------------------------------------------------------------- the client's retries


def retry_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the client's urllib3 retries logged (qai_hub's ``LogRetry``), one per retry."""
    return [r.getMessage() for r in caplog.records if r.name == "LogRetry"]


def test_transient_network_errors_are_retried(
    fake: FakeAIHub, models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub, events = hub_with_events(tmp_path)
    status_poll = re.compile(r"/api/v1/jobs/[^/]+/")

    def arm(event: JobEvent) -> None:
        events.append(event)
        if event.kind == "compile" and event.status == "SUBMITTED":
            fake.fail_requests(lambda m, p: m == "GET" and bool(status_poll.fullmatch(p)), 2)

    hub.job_listener = arm
    with caplog.at_level(logging.INFO, logger="LogRetry"):
        runs = hub.run_components(track1_jobs(models))
    assert set(runs) == {"image_encoder", "text_encoder"}
    assert len(fake.jobs_of("compile")) == 2, "a retry resubmitted a job"
    retries = retry_logs(caplog)
    assert len(fake.failed) == 4 and len(retries) == 4
    assert all("Connection refused" in r for r in retries)
    retried = [r.getMessage() for r in caplog.records if r.name == "urllib3.connectionpool"]
    assert len(retried) == 4 and all(re.search(r"/api/v1/jobs/j\d+/$", r) for r in retried)

    # When the network stays down past the client's retries, one line says what failed.
    fake.fail_requests(lambda m, p: m == "GET" and p.endswith("/devices/"), times=10)
    before = fake.count("GET", r"/devices/$")
    with pytest.raises(RuntimeStageError, match="listing devices failed") as err:
        make_hub(tmp_path).list_devices()
    message = one_line(err.value)
    assert "Could not connect to Qualcomm AI Hub" in message and "|" not in message
    assert f"Please visit https://{API_HOST} to check the service's status" in message
    assert fake.count("GET", r"/devices/$") - before == CLIENT_TRIES


def test_503_and_dropped_connection_while_polling_are_retried(
    fake: FakeAIHub, models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub, events = hub_with_events(tmp_path)
    polled: list[str] = []

    def arm(event: JobEvent) -> None:
        events.append(event)
        # In the middle of the run, once the driver is polling the compile jobs: their next
        # status polls meet a 503 twice, then a dropped connection twice.
        if event.status == "OPTIMIZING_MODEL" and not polled:
            polled.extend(fake.jobs)
            paths = {f"/api/v1/jobs/{job_id}/" for job_id in polled}
            polls = lambda m, p: m == "GET" and p in paths  # noqa: E731
            fake.fail_requests(polls, times=2, failure=503)
            fake.fail_requests(polls, times=2, failure="dropped")

    hub.job_listener = arm
    with caplog.at_level(logging.INFO, logger="LogRetry"):
        runs = hub.run_components(track1_jobs(models))
    assert [j.kind for j in fake.jobs.values() if j.job_id in polled] == ["compile", "compile"]
    assert [f for _, _, f in fake.failed] == [503, 503, "dropped", "dropped"]
    assert all(urlpath(url) in {f"/api/v1/jobs/{j}/" for j in polled} for _, url, _ in fake.failed)
    assert len(retry_logs(caplog)) == 4
    assert set(runs) == {"image_encoder", "text_encoder"}
    assert len(fake.jobs) == 6, "a retry resubmitted a job"
    for component, run in runs.items():
        assert run.inference.metrics["device_parity_cosine_min"] > 0.999
        assert statuses(events, component, "compile").count("SUBMITTED") == 1


def test_job_created_while_the_network_drops_is_not_paid_twice(
    fake: FakeAIHub, models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jobs_url = lambda m, p: m == "GET" and p.startswith("/api/v1/jobs/")  # noqa: E731
    text = [ComponentJob(models["text_encoder"], text_inputs(2))]

    # A blip right after the job was created: the client's retries fetch it, nothing is lost.
    fake.fail_requests(jobs_url, times=3, failure="dropped")
    with caplog.at_level(logging.INFO, logger="LogRetry"):
        make_hub(tmp_path, ledger_path=str(tmp_path / "blip.jsonl")).compile(text[0].exported)
    assert len(fake.jobs_of("compile")) == 1 and len(retry_logs(caplog)) == 3
    fake.jobs.clear()

    # The job is created, then every try of the client to fetch it fails: the run stops, but
    # the job is in the ledger and the next run picks it up instead of creating another one.
    fake.fail_requests(jobs_url, times=CLIENT_TRIES)
    hub, events = hub_with_events(tmp_path)
    with pytest.raises(RuntimeStageError, match="created compile job j.* rerun to pick it up") as e:
        hub.run_components(text)
    one_line(e.value)
    (created,) = fake.jobs_of("compile")
    assert fake.count("GET", rf"/jobs/{created.job_id}/$") == CLIENT_TRIES
    assert statuses(events, "text_encoder", "compile") == ["SUBMITTED"]
    assert [e["job_id"] for e in ledger_lines(tmp_path / "cache" / "aihub_ledger.jsonl")] == [
        created.job_id
    ]

    rerun, events = hub_with_events(tmp_path)
    run = rerun.run_components(text)
    assert run["text_encoder"].compiled.job_id == created.job_id
    assert statuses(events, "text_encoder", "compile")[0] == "RESUMED"
    assert len(fake.jobs_of("compile")) == 1


def test_token_never_leaves_the_hub(
    fake: FakeAIHub,
    models,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The service echoes the token in a failure reason: it must still not get out.
    fake.inference_failures["text_encoder inference"] = f"request signed with {TOKEN} was refused"
    # A retried request too: the client logs what it retries.
    fake.fail_requests(lambda m, p: m == "GET" and p.endswith("/devices/"), times=1)
    hub, events = hub_with_events(tmp_path, share_with=["lpcv@example.com"])
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        hub.preflight()
        runs = hub.run_components([ComponentJob(models["image_encoder"], image_inputs(2))])
        texts.append(repr(runs))
        with pytest.raises(RuntimeStageError) as err:
            hub.run_components([ComponentJob(models["text_encoder"], text_inputs(2))])
        texts.append(str(err.value))
    captured = capsys.readouterr()
    texts += [caplog.text, captured.out, captured.err, repr(events), repr(hub.__dict__)]
    texts.append(json.dumps(hub.identity()))
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
    assert retry_logs(caplog)


def test_compile_jobs_are_shared(
    fake: FakeAIHub, models, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub, events = hub_with_events(tmp_path, share_with=["lpcv@example.com", "team@example.com"])
    with caplog.at_level(logging.INFO, logger="lpcvlab"):
        runs = hub.run_components(track1_jobs(models, n=2))
    for component, run in runs.items():
        assert fake.shared[run.compiled.job_id] == ["lpcv@example.com", "team@example.com"]
        assert "SHARED with lpcv@example.com, team@example.com" in statuses(
            events, component, "compile"
        )
    assert set(fake.shared) == {run.compiled.job_id for run in runs.values()}
    assert "SHARED with lpcv@example.com" in caplog.text


def test_only_the_asked_stages_run(fake: FakeAIHub, models, tmp_path: Path) -> None:
    hub, events = hub_with_events(tmp_path)
    runs = hub.run_components(
        [
            ComponentJob(models["image_encoder"], image_inputs(2), frozenset({"compile"})),
            ComponentJob(models["text_encoder"], text_inputs(2), frozenset({"inference"})),
        ]
    )
    image, text = runs["image_encoder"], runs["text_encoder"]
    assert image.compiled.job_id and image.profile is None and image.inference is None
    assert text.profile is None and text.inference.outputs.shape == (2, 16)
    assert len(fake.jobs_of("compile")) == 2
    assert fake.jobs_of("inference", profiling=True) == []
    assert [j.request.name for j in fake.jobs_of("inference")] == [
        "retrieval-text_encoder inference"
    ]

    # Profile alone: the compile job is reused from the ledger, and only a profile job is new.
    (run,) = hub.run_components(
        [ComponentJob(models["image_encoder"], image_inputs(0), frozenset({"profile"}))]
    ).values()
    assert run.profile.latency_ms == pytest.approx(5.4) and run.inference is None
    assert run.compiled.job_id == image.compiled.job_id
    assert len(fake.jobs) == 4


# --------------------------------------------------------------------------- config, CLI, files


def test_composed_config_builds_the_hub(fake: FakeAIHub, tmp_path: Path) -> None:
    cfg = compose_config(
        "hub=aihub",
        "runtime=qnn_context_binary",
        "device=dragonwing_iq9075_evk",
        f"paths.cache_dir={tmp_path}/cache",
        "hub.share_with=[lpcv@example.com]",
    )
    settings = load_settings(cfg)
    hub = build_hub(
        settings.hub,
        settings.device,
        settings.runtime,
        track=settings.track.name,
        cache_dir=settings.paths.cache_dir,
    )
    assert isinstance(hub, AIHub) and isinstance(hub, Hub)
    assert (hub.name, hub.records_jobs, hub.job_listener) == ("aihub", True, None)
    assert hub.device == "Dragonwing IQ-9075 EVK"
    assert hub.target_runtime == "qnn_context_binary"
    assert hub.settings.share_with == ["lpcv@example.com"]
    assert "video" in hub.channel_last_inputs
    assert hub.ledger.path == tmp_path / "cache" / "aihub_ledger.jsonl"
    assert fake.requests == []  # building the hub costs nothing

    other = dataclasses.replace(settings.hub, ledger_path=str(tmp_path / "elsewhere.jsonl"))
    moved = build_hub(other, settings.device, settings.runtime, track="retrieval", cache_dir="x")
    assert isinstance(moved, AIHub) and moved.ledger.path == tmp_path / "elsewhere.jsonl"


def test_identity_without_secrets(fake: FakeAIHub, tmp_path: Path) -> None:
    hub = make_hub(tmp_path, runtime="qnn_context_binary", device="dragonwing_iq9075_evk")
    identity = hub.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["device"] == {
        "name": "dragonwing_iq9075_evk",
        "aihub_name": "Dragonwing IQ-9075 EVK",
    }
    assert identity["runtime"]["target_runtime"] == "qnn_context_binary"
    assert identity["hub"]["profile_iterations"] == 100
    assert identity["qai_hub"] == str(qai_hub.__version__)  # the client installed
    assert identity["api_url"] == f"https://{API_HOST}"
    assert TOKEN not in json.dumps(identity)
    # How lpcvlab waits or records jobs does not change what a job computes.
    assert (
        make_hub(tmp_path, poll_interval_s=3, reuse=False).identity()
        == make_hub(tmp_path).identity()
    )
    assert make_hub(tmp_path, parity_samples=4).identity() != make_hub(tmp_path).identity()
    assert fake.requests == []


def test_every_hub_key_is_read(fake: FakeAIHub, models, tmp_path: Path) -> None:
    """Every ``hub`` key is documented in conf/hub/aihub.yaml and read by the back-end itself."""
    cfg = OmegaConf.load(CONF / "hub" / "aihub.yaml")
    keys = set(cfg) - {"defaults"}
    fields = {f.name for f in dataclasses.fields(AIHubConfig)}
    assert keys == fields
    assert cfg.name == "aihub"
    settings = composed()[0]
    assert settings.profile_iterations == 100 and settings.reuse is True
    assert settings.share_with == [] and settings.channel_last_inputs == ["video"]

    read: set[str] = set()

    class Spy(AIHubConfig):
        """Notes each field read from code in lpcvlab.hubs.aihub (not schema checks)."""

        def __getattribute__(self, name: str):
            if name in fields:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("lpcvlab.hubs.aihub"):
                    read.add(name)
            return super().__getattribute__(name)

    spy = Spy(**{f: getattr(settings, f) for f in fields - {"poll_interval_s", "share_with"}})
    spy.poll_interval_s, spy.share_with = 0, ["lpcv@example.com"]
    _, device, runtime = composed()
    hub = AIHub(spy, device, runtime, track="retrieval", cache_dir=tmp_path / "cache")
    hub.preflight()
    hub.run_components(track1_jobs(models, n=2))
    assert read == fields - {"name"}  # `name` picks the back-end (hub=aihub)

    # Keys the schema does not have -- typos, and the retired retry settings -- stop composing.
    for override in (
        "hub.max_profiler_iterations=5",
        "hub.reuse_jobs=true",
        "hub.retries=3",
        "hub.retry_backoff_s=0",
    ):
        key = override.split("=")[0]
        with pytest.raises(Exception) as err:
            compose_config("hub=aihub", override)
        assert composition_error(err.value) == (
            f"{key} is not a setting of hub=aihub; check the spelling or the group option"
        )


def test_hub_devices_cli(fake: FakeAIHub, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="lpcvlab")
    add_hub_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hub", "devices", "--attribute", "framework:qnn"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == sorted(DEVICES)

    # Unreachable: one line at once, not the client's retries.
    fake.fail_requests(lambda m, p: True, times=100, failure="dns")
    before = len(fake.requests)
    with pytest.raises(ConfigError, match="could not be resolved"):
        args.func(args)
    assert len(fake.requests) == before + 1


def test_ledger_appends_whole_lines_from_many_processes(tmp_path: Path) -> None:
    """Parallel sweep jobs share one ledger: concurrent appends never interleave."""
    import multiprocessing

    path = tmp_path / "shared.jsonl"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.starmap(_record_many, [(str(path), w) for w in range(2)])
    ledger = JobLedger(path)
    assert len(ledger_lines(path)) == 2 * 25
    assert {e.job_id for e in ledger.entries()} == {
        f"w{w}-{i}" for w in range(2) for i in range(25)
    }


def _record_many(path: str, worker: int) -> None:
    ledger = JobLedger(path)
    for i in range(25):
        key = job_key("compile", "dev", "", {"n": f"{worker}-{i}"})
        ledger.record(LedgerEntry(key, "compile", "c", f"w{worker}-{i}", "SUBMITTED", "dev", ""))


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
    files = stages.external_data_files(odd)
    assert [f.name for f in files] == ["weights.bin"]
    staged = stages.stage_model(odd, files, tmp_path / "stage")
    assert staged.name == "odd.onnx" and staged.is_dir()
    assert sorted(p.name for p in staged.iterdir()) == ["odd.data", "odd.onnx"]
    x = image_inputs(1)
    ref = local_outputs(exported, x)
    session = ort.InferenceSession(str(staged / "odd.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x})[0], ref, rtol=1e-6)
