"""Deployment precision: config, calibration, local emulation, rewrites, cache keys, the gate."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import build_track_for, compose_config
from mlflow.tracking import MlflowClient
from onnx import TensorProto, numpy_helper
from test_compose import _outcome

from lpcvlab import pipeline
from lpcvlab.config import load_settings
from lpcvlab.config.schema import BudgetConfig, FidelityConfig, LocalHubConfig
from lpcvlab.deploy.export import export_component, parity_message
from lpcvlab.deploy.precision import FP32, Calibration, ComponentPrecision, PrecisionPlan
from lpcvlab.deploy.precision import emulate as emulate_module
from lpcvlab.deploy.precision.calibration import choose_calibration, spread
from lpcvlab.deploy.precision.fidelity import component_fidelity, gate, metric_fidelity
from lpcvlab.deploy.rewrites import MASK_VALUE, op_counts
from lpcvlab.errors import ConfigError, ParityError
from lpcvlab.hubs import INFERENCE, ComponentJob
from lpcvlab.hubs.cache import CachedHub, RecordStore, StageCache, quantize_key, runtime_key
from lpcvlab.hubs.local import LocalHub
from lpcvlab.metrics import cosine_per_sample
from lpcvlab.objective import score
from lpcvlab.tracks import TrackData
from lpcvlab.util.hashing import array_sha256

ONLY_INFERENCE = frozenset({INFERENCE})


# --------------------------------------------------------------------------- config


def test_precision_settings_resolve_per_component():
    s = load_settings(compose_config("precision=w8a8", "precision.calibration_samples=64"))
    assert {c: s.precision.of(c) for c in s.track.components()} == {
        "image_encoder": "w8a8",
        "text_encoder": "w8a8",
    }
    mixed = load_settings(
        compose_config(
            "precision=mixed",
            "precision.per_component.image_encoder=fp16",
            "precision.per_component.text_encoder=w8a8",
        )
    )
    plan = PrecisionPlan(mixed.precision)
    assert plan.tags(["image_encoder", "text_encoder"]) == {
        "precision": "mixed",
        "precision/default": "fp32",
        "precision/image_encoder": "fp16",
        "precision/text_encoder": "w8a8",
    }
    assert not plan.needs_calibration("image_encoder") and plan.needs_calibration("text_encoder")
    video = load_settings(compose_config("track=video", "precision=fp16", "hub=aihub"))
    assert video.precision.of("video_classifier") == "fp16"
    assert video.runtime.fp16_options == "--quantize_full_type float16"  # AIHM's; I/O stays float
    assert video.hub.quantize_io is False  # --quantize_io: hub.quantize_io=true only
    assert load_settings(compose_config()).precision.name == "fp32"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["precision=w8a16", "runtime=tflite", "hub=aihub"],
            ["image_encoder", "precision=w8a16", "runtime=tflite", "hub=aihub"],
        ),
        (
            ["precision=mixed", "precision.per_component.text_encoder=w8a16", "runtime=tflite"]
            + ["hub=aihub"],
            ["text_encoder", "precision.per_component.text_encoder=w8a16", "runtime=tflite"],
        ),
        (
            ["precision=fp16", "runtime=tflite", "hub=aihub"],
            ["precision=fp16", "runtime=tflite", "runtime=qnn_dlc", "runtime=qnn_context_binary"],
        ),
        (
            ["precision=fp16", "runtime=onnx", "hub=aihub"],
            ["precision=fp16", "runtime=onnx", "runtime=precompiled_qnn_onnx"],
        ),
        (
            ["precision=mixed", "precision.per_component.video_classifier=w8a8"],
            ["precision.per_component.video_classifier", "track=retrieval", "image_encoder"],
        ),
        (
            ["precision=w8a8", "precision.calibration_samples=2"],
            ["precision.calibration_samples=2", "too few", "at least 8"],
        ),
        (
            ["precision=fp16", "precision.per_component.image_encoder=w8a8"],
            ["precision.per_component", "precision=mixed has it"],
        ),
        (
            ["precision=mixed", "precision.per_component.image_encodr=fp16"],
            ["precision.per_component.image_encodr", "components of both tracks"],
        ),
        (
            ["precision=mixed", "precision.per_component.image_encoder=int4"],
            ["precision.per_component.image_encoder='int4'", "w8a8"],
        ),
        (["precision=int4"], ["precision=int4", "mixed"]),
        (["export.rewrites=[gelu_tanh]"], ["export.rewrites", "finite_mask"]),
        (
            ["export.rewrites=[gelu_sigmoid,finite_mask]"],
            ["export.rewrites=[gelu_sigmoid,finite_mask]", "use backbone.activation=gelu_sigmoid"],
        ),
        (["fidelity.cosine_min=1.5"], ["fidelity.cosine_min=1.5", "<= 1"]),
    ],
)
def test_bad_precision_settings_are_one_line_before_any_work(overrides, words):
    message = _outcome(*overrides)
    assert message is not None and "\n" not in message, message
    for w in words:
        assert w in message, (w, message)


def test_hub_local_emulates_what_an_aihub_runtime_cannot_take():
    assert _outcome("precision=w8a16", "runtime=tflite") is None
    assert _outcome("precision=fp16", "precision.calibration_samples=2") is None  # not quantized


# --------------------------------------------------------------------------- calibration


def _spec(shape=(1, 3, 4), dtype="float32"):
    from lpcvlab.types import TensorSpec

    return TensorSpec("x", shape, dtype)


def test_calibration_is_an_even_spread_of_eval_inputs_or_the_training_split():
    evals = np.arange(20 * 12, dtype=np.float32).reshape(20, 3, 4)
    cal = choose_calibration("enc", _spec(), 5, evals)
    assert cal.source == "eval_spread" and len(cal) == 5
    assert list(spread(20, 5)) == [0, 5, 10, 14, 19]
    np.testing.assert_array_equal(cal.samples, evals[[0, 5, 10, 14, 19]])
    assert cal.sha256 == array_sha256(cal.samples)
    assert choose_calibration("enc", _spec(), 5, evals).sha256 == cal.sha256  # deterministic

    train = evals[:8] + 1000
    from_train = choose_calibration("enc", _spec(), 8, evals, train)
    assert from_train.source == "train" and from_train.sha256 != cal.sha256
    np.testing.assert_array_equal(from_train.samples, train)


@pytest.mark.parametrize(
    ("n", "evals", "train", "words"),
    [
        (64, np.zeros((56, 3, 4), np.float32), None, ["enc", "calibration_samples=64", "56"]),
        (8, np.zeros((56, 3, 4), np.float32), np.zeros((3, 3, 4)), ["training split", "only 3"]),
        (8, np.zeros((56, 3, 4), np.float32), np.zeros((8, 4, 3)), ["enc", "shape (8, 4, 3)"]),
        (8, np.zeros((56, 3, 4), np.int64), None, ["enc", "int64", "float32"]),
    ],
)
def test_too_few_or_misshapen_calibration_data_names_component_and_setting(n, evals, train, words):
    with pytest.raises(ConfigError) as err:
        choose_calibration("enc", _spec(), n, evals, train)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_video_track_calibrates_on_its_training_clips_in_the_exported_layout(tmp_path):
    from lpcvlab.tracks.video import VideoPayload

    clips = []
    for i in range(6):
        path = tmp_path / f"clip{i}.npy"
        np.save(path, np.full((1, 3, 16, 112, 112), i, np.float32))
        clips.append(path)
    track = build_track_for(compose_config("track=video", "backbone=video_tiny"))
    payload = VideoPayload([], [], 1, [], train=[object()] * 6, train_cache=clips)
    for shape, channel_last in (((1, 3, 16, 112, 112), False), ((1, 16, 112, 112, 3), True)):
        track.settings.channel_last = channel_last
        data = TrackData(
            {"video_classifier": np.zeros((2, *shape[1:]), np.float32)}, payload=payload
        )
        got = track.calibration_inputs(data, "video_classifier", 3)
        spec = _spec(shape)
        cal = choose_calibration("video_classifier", spec, 3, data.inputs["video_classifier"], got)
        assert cal.source == "train" and cal.samples.shape == (3, *shape[1:])
        assert [float(c.reshape(-1)[0]) for c in cal.samples] == [0.0, 2.0, 5.0]
    no_training = TrackData({}, payload=VideoPayload([], [], 1, [], train=[], train_cache=[]))
    assert track.calibration_inputs(no_training, "video_classifier", 3) is None


# --------------------------------------------------------------------------- emulation


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 49000, size=(n, 77))
    ends = rng.integers(5, 40, size=n)
    for i, end in enumerate(ends):
        x[i, 0], x[i, end], x[i, end + 1 :] = 49406, 49407, 0
    return x.astype(np.int64)


def _inputs(spec, n: int, seed: int = 0) -> np.ndarray:
    if spec.dtype == "int64":
        return _tokens(n, seed)
    return np.random.default_rng(seed).random((n, *spec.shape[1:]), dtype=np.float32)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """clip_tiny's encoders and video_tiny, exported once; the text encoder is the same weights
    with GELU swapped (``backbone.activation=gelu_sigmoid``) and ``export.rewrites=[finite_mask]``;
    ``text_encoder-inf`` is it with its mask put back to -inf."""
    out = tmp_path_factory.mktemp("onnx")
    found = {}
    weights = torch.get_rng_state()  # the swapped text encoder gets the same random weights
    for overrides in (
        ["backbone=clip_tiny"],
        ["track=video", "backbone=video_tiny"],
        ["backbone=clip_tiny", "backbone.activation=gelu_sigmoid"],
    ):
        swapped = "backbone.activation=gelu_sigmoid" in overrides
        if swapped:
            torch.set_rng_state(weights)
        for comp in build_track_for(compose_config(*overrides)).build_model().components:
            if (comp.name == "text_encoder") != swapped:
                continue
            rewrites = ["finite_mask"] if swapped else []
            exp = export_component(comp, _inputs(comp.input, 4), out, rewrites=rewrites)
            found[comp.name] = (comp, exp)
    comp, exp = found["text_encoder"]
    model = onnx.load(str(exp.path))
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and (array == MASK_VALUE).any():
            masked = np.where(array == MASK_VALUE, -np.inf, array).astype(array.dtype)
            init.CopyFrom(numpy_helper.from_array(masked, init.name))
    path = out / "text_encoder-inf.onnx"
    onnx.save_model(model, str(path))
    found["text_encoder-inf"] = (comp, dataclasses.replace(exp, path=path))
    return found


def _calibrated(name: str, spec, n: int = 8) -> ComponentPrecision:
    samples = _inputs(spec, n, seed=1)
    return ComponentPrecision(name, Calibration(samples, array_sha256(samples), "eval_spread"))


def _local() -> LocalHub:
    return LocalHub(LocalHubConfig(profile_iterations=1, warmup_iterations=0))


def _deploy(exp, precision: ComponentPrecision, inputs: np.ndarray):
    """(fp32 outputs, deployed outputs, the run) through hub=local, inference only."""
    hub = _local()
    runs = hub.run_components(
        [
            ComponentJob(exp, inputs, ONLY_INFERENCE),
            ComponentJob(_renamed(exp, "deployed"), inputs, ONLY_INFERENCE, precision=precision),
        ]
    )
    return (
        runs[exp.component].inference.outputs,
        runs["deployed"].inference.outputs,
        runs["deployed"],
    )


def _renamed(exp, name):
    return dataclasses.replace(exp, component=name)


def _initializer_types(path: Path) -> set[int]:
    return {i.data_type for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("component", ["image_encoder", "text_encoder", "video_classifier"])
def test_w8a8_changes_outputs_a_little_with_real_quantized_operators(exports, component):
    comp, exp = exports[component]
    inputs = _inputs(comp.input, 6, seed=2)
    ref, out, run = _deploy(exp, _calibrated("w8a8", comp.input), inputs)
    cos = cosine_per_sample(ref, out)
    assert cos.max() < 1.0, "quantization changed nothing"
    assert cos.min() > 0.95, cos
    q = run.quantized
    assert q.precision == "w8a8" and "QDQ" in q.method and q.calibration_samples == 8
    assert q.model.path.name.startswith("deployed.w8a8-") and q.model.path.exists()
    assert run.compiled.exported.path == q.model.path  # what ran is the quantized file
    counts = op_counts(q.model.path)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    assert q.model.op_counts == counts
    assert TensorProto.INT8 in _initializer_types(q.model.path)  # int8 weights
    assert TensorProto.UINT8 in _initializer_types(q.model.path)  # uint8 activation zero points


def test_w8a16_holds_16_bit_activations_and_stays_closer(exports):
    comp, exp = exports["text_encoder"]
    inputs = _inputs(comp.input, 6, seed=2)
    ref, out16, run = _deploy(exp, _calibrated("w8a16", comp.input), inputs)
    _, out8, _ = _deploy(exp, _calibrated("w8a8", comp.input), inputs)
    assert TensorProto.UINT16 in _initializer_types(run.quantized.model.path)
    assert cosine_per_sample(ref, out16).min() > cosine_per_sample(ref, out8).min()


def test_fp16_graph_holds_fp16_tensors_and_fp32_io(exports):
    comp, exp = exports["image_encoder"]
    inputs = _inputs(comp.input, 3)
    ref, out, run = _deploy(exp, ComponentPrecision("fp16"), inputs)
    model = onnx.load(str(run.quantized.model.path))
    types = {i.data_type for i in model.graph.initializer}
    assert TensorProto.FLOAT16 in types and TensorProto.FLOAT not in types
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.dtype == np.float32
    cos = cosine_per_sample(ref, out)
    assert 0.999 < cos.min() and cos.max() < 1.0
    assert run.quantized.calibration_samples == 0 and "float16" in run.quantized.method


def test_the_minus_inf_mask_is_why_the_text_encoder_needs_finite_mask(exports):
    comp, plain = exports["text_encoder-inf"]
    _, rewritten_exp = exports["text_encoder"]
    inputs = _inputs(comp.input, 6, seed=2)
    ref, out, _ = _deploy(plain, _calibrated("w8a8", comp.input), inputs)
    assert cosine_per_sample(ref, out).mean() < 0.6  # the -inf range swallows the activations
    ref, out, _ = _deploy(rewritten_exp, _calibrated("w8a8", comp.input), inputs)
    assert cosine_per_sample(ref, out).mean() > 0.97


# --------------------------------------------------------------------------- rewrites


def test_rewrites_are_applied_measured_and_change_the_graph(exports):
    _, exp = exports["text_encoder"]
    after = op_counts(exp.path)
    assert "Erf" not in after and after["Sigmoid"] == 2
    assert exp.op_counts == after
    assert exp.op_counts_plain["Sigmoid"] == 2  # the GELU swap is in the model, before any rewrite
    _, image = exports["image_encoder"]  # exported without rewrites or swap
    assert image.op_counts["Erf"] == 2 and "Sigmoid" not in image.op_counts
    assert exp.rewrite_sites == {"finite_mask": 2}
    for name, cos in exp.rewrite_cosine_min.items():
        assert 0.999 < cos <= 1.0, name
    model = onnx.load(str(exp.path))
    masks = [numpy_helper.to_array(i) for i in model.graph.initializer]
    assert not any(np.isneginf(a).any() for a in masks if a.dtype.kind == "f")
    assert any((a == MASK_VALUE).any() for a in masks if a.dtype.kind == "f")
    _, video = exports["video_classifier"]
    assert video.rewrite_sites == {} and "Erf" not in video.op_counts


def test_a_failed_parity_names_each_rewrite_and_its_cost(exports, tmp_path):
    comp, exp = exports["text_encoder"]
    rewrites = ["finite_mask"]
    samples = _inputs(comp.input, 4)
    store = RecordStore(tmp_path / "stages")
    StageCache(store, "run-1").export(comp, samples, 18, 0.999, lambda: exp, rewrites)
    with pytest.raises(ParityError, match=r"finite_mask alone [01]\.\d{6}.*export\.rewrites"):
        StageCache(store, "run-2").export(comp, samples, 18, 1.5, lambda: exp, rewrites)
    assert "finite_mask" not in parity_message(exports["image_encoder"][1], 1.5)


# --------------------------------------------------------------------------- cache keys


def test_cache_keys_differ_by_precision_and_calibration(exports, tmp_path):
    _, exp = exports["image_encoder"]
    identity = _local().identity()
    module = "lpcvlab.hubs.local"
    spec = exp.input
    a, b = _calibrated("w8a8", spec), _calibrated("w8a8", spec, n=9)
    keys = {
        runtime_key(exp.sha256, identity, module),
        runtime_key(exp.sha256, identity, module, ComponentPrecision("fp16")),
        runtime_key(exp.sha256, identity, module, a),
        runtime_key(exp.sha256, identity, module, b),
        runtime_key(exp.sha256, identity, module, ComponentPrecision("w8a16", a.calibration)),
    }
    assert len(keys) == 5
    assert runtime_key(exp.sha256, identity, module, FP32) == runtime_key(
        exp.sha256, identity, module
    )
    assert quantize_key(exp.sha256, a, module) != quantize_key(exp.sha256, b, module)

    # The stage cache keeps the quantized model: a second run quantizes nothing.
    store = RecordStore(tmp_path / "stages")
    inputs = _inputs(spec, 3)
    job = [ComponentJob(exp, inputs, ONLY_INFERENCE, precision=a)]
    first = CachedHub(_local(), StageCache(store, "run-1")).run_components(job)
    made = []
    original = emulate_module.emulate
    emulate_module.emulate = lambda *args: made.append(args) or original(*args)
    try:
        cache = StageCache(store, "run-2")
        again = CachedHub(_local(), cache).run_components(job)
        assert made == []
        assert cache.tags()["cache/image_encoder/quantize_from"] == "run-1"
        assert (
            again["image_encoder"].quantized.model.sha256
            == first["image_encoder"].quantized.model.sha256
        )
        np.testing.assert_array_equal(
            again["image_encoder"].inference.outputs, first["image_encoder"].inference.outputs
        )
        # New calibration data: quantized again.
        CachedHub(_local(), StageCache(store, "run-3")).run_components(
            [ComponentJob(exp, inputs, ONLY_INFERENCE, precision=b)]
        )
        assert len(made) == 1
    finally:
        emulate_module.emulate = original


# --------------------------------------------------------------------------- the gate


def test_fidelity_metrics_and_the_gate_around_the_measured_value():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((10, 16))
    out = ref + 0.05 * rng.standard_normal((10, 16))
    metrics = component_fidelity("enc", ref, out)
    cos = metrics["fidelity_cosine_min/enc"]
    assert 0.99 < cos < 1 and metrics["fidelity_cosine_mean/enc"] >= cos
    assert math.isfinite(metrics["fidelity_psnr/enc"])
    metrics |= metric_fidelity("recall_at_10", 0.70, 0.73) | {"recall_at_10": 0.70}
    assert metrics["recall_at_10_drop"] == pytest.approx(0.03)

    def verdict(cosine_min, drop_max):  # the collapse check: tests/test_fidelity_collapse.py
        return gate(
            FidelityConfig(cosine_min, drop_max, distinct_min=None), "recall_at_10", metrics
        )

    assert verdict(cos - 1e-3, 0.031).passed
    failed = verdict(cos + 1e-3, 0.031)
    assert not failed.passed and "enc cosine min" in failed.reasons[0]
    assert not verdict(cos - 1e-3, 0.029).passed
    assert verdict(None, None).passed and "nothing" in verdict(None, None).line()
    assert "FAILED" in failed.line() and "cosine >= " in failed.line()
    assert gate(FidelityConfig(), "recall_at_10", {"recall_at_10": 0.5}) is None  # all fp32

    metrics["latency_ms/enc"] = 10.0
    passed = score("recall_at_10", BudgetConfig(), metrics, FidelityConfig(cos - 1e-3, 0.05))
    assert passed.value == passed.raw == 0.70 and passed.tags() == {"fidelity_gate": "passed"}
    penalised = score(
        "recall_at_10", BudgetConfig(), metrics, FidelityConfig(cos + 1e-3, 0.05, 2.0)
    )
    assert penalised.value == pytest.approx(0.70 - 2.0)
    assert penalised.tags()["fidelity_gate"] == "failed"
    both = score("recall_at_10", BudgetConfig(5.0), metrics, FidelityConfig(cos + 1e-3, 0.05))
    assert both.value == pytest.approx(0.70 - 1.0 - 10.0 / 5.0)  # budget and gate penalties add


# --------------------------------------------------------------------------- compare


def test_compare_shows_precision_as_one_column_and_keeps_gate_failures_off_the_front(tmp_path):
    from lpcvlab.tracking.compare import build_comparison, plot_pareto, precision_label
    from lpcvlab.tracking.runstore import RunInfo

    def run(run_id, params, tags, recall, latency, cos=None):
        metrics = {"recall_at_10": recall, "objective": recall, "latency_ms/total": latency}
        metrics |= {"latency_ms/image_encoder": latency}
        if cos is not None:
            metrics["fidelity_cosine_min/image_encoder"] = cos
        params = {"track.objective": "recall_at_10", **params}
        return RunInfo(run_id, run_id, "FINISHED", "1", 0, params, metrics, tags)

    both = {"precision/image_encoder": "w8a8", "precision/text_encoder": "w8a8"}
    runs = [
        run("fp32", {"precision.name": "fp32"}, {"precision": "fp32"}, 0.70, 30.0),
        run(
            "w8a8", {"precision.name": "w8a8"}, both | {"fidelity_gate": "passed"}, 0.69, 9.0, 0.97
        ),
        run(
            "mixed",
            {"precision.name": "mixed", "precision.per_component.text_encoder": "w8a8"},
            {"precision/image_encoder": "fp16", "precision/text_encoder": "w8a8"}
            | {"fidelity_gate": "failed", "fidelity_gate_reasons": "recall_at_10 drop 0.1"},
            0.71,
            5.0,
            0.99,
        ),
    ]
    assert precision_label(runs[2]) == "image_encoder:fp16 text_encoder:w8a8"
    table = build_comparison(runs)
    assert table.swept == ["precision"]  # precision.name and per_component keys: one column
    assert [r["precision"] for r in table.rows] == [
        "fp32",
        "w8a8",
        "image_encoder:fp16 text_encoder:w8a8",
    ]
    assert [r["fidelity_gate"] for r in table.rows] == ["", "passed", "failed"]
    text = table.render()
    assert "fidelity_gate" in text and "fidelity_cosine_min/image_encoder" in text
    from lpcvlab.tracking.compare import accuracy_latency, pareto_front

    # The failed run is the fastest and the most accurate, and still not on the front.
    assert [table.runs[i].run_id for i in pareto_front(accuracy_latency(runs))] == ["w8a8", "fp32"]
    assert plot_pareto(table, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- the pipeline


def _store_run(client: MlflowClient, run_id: str):
    return client.get_run(run_id).data


@pytest.mark.slow
def test_mixed_precision_run_logs_fidelity_against_the_cached_fp32_run(
    cfg_factory, tmp_path, capsys
):
    npu_safe = ("backbone.activation=gelu_sigmoid", "export.rewrites=[finite_mask]")
    fp32_cfg = cfg_factory(*npu_safe)
    fp32 = pipeline.run(fp32_cfg, work_dir=tmp_path / "fp32")
    mixed = (
        *npu_safe,
        "precision=mixed",
        "precision.per_component.image_encoder=fp16",
        "precision.per_component.text_encoder=w8a8",
        "precision.calibration_samples=8",
    )
    res = pipeline.run(cfg_factory(*mixed), work_dir=tmp_path / "mixed")
    client = MlflowClient(fp32_cfg.tracking.uri)
    data = _store_run(client, res.run_id)
    m, t = data.metrics, data.tags
    assert t["precision"] == "mixed" and t["precision/image_encoder"] == "fp16"
    assert t["precision/text_encoder"] == "w8a8"
    assert t["calibration/text_encoder/source"] == "eval_spread"
    p = data.params
    assert p["calibration_samples/text_encoder"] == "8"
    assert "calibration/image_encoder/source" not in t
    assert "static QDQ" in t["precision_method/text_encoder"]
    assert "float16" in t["precision_method/image_encoder"]
    for comp in ("image_encoder", "text_encoder"):
        assert 0.9 < m[f"fidelity_cosine_min/{comp}"] < 1.0
        assert m[f"fidelity_cosine_mean/{comp}"] >= m[f"fidelity_cosine_min/{comp}"]
        assert f"fidelity_psnr/{comp}" in m and p[f"onnx_ops/{comp}/Sigmoid"] == "2"
        assert f"rewrite_cosine_min/{comp}/finite_mask" in m
    assert "activation/recall_at_10_before_swap" in m  # the swap's cost, measured in PyTorch
    assert int(p["onnx_ops_w8a8/text_encoder/QuantizeLinear"]) > 0
    assert "onnx_ops_fp16/image_encoder/Cast" in p
    # The fp32 outputs came from the fp32 run's stage cache: its metric is the fp32 run's.
    assert m["recall_at_10_fp32"] == fp32.metrics["recall_at_10"]
    assert m["recall_at_10_drop"] == pytest.approx(m["recall_at_10_fp32"] - m["recall_at_10"])
    assert fp32.run_id in t["fidelity/reference"]
    assert t["cache/text_encoder.fp32/inference_from"] == fp32.run_id
    assert t["fidelity_gate"] == "passed" and m["objective"] == m["recall_at_10"]
    assert "fidelity_gate" not in _store_run(client, fp32.run_id).tags
    out = capsys.readouterr().out
    assert (
        "Fidelity gate (cosine >= 0.95, recall_at_10 drop <= 0.02, "
        "distinct outputs >= 0.9 x distinct inputs): passed"
    ) in out
    assert "w8a8" in out and "vs fp32 cos min" in out

    # A threshold just above the measured cosine fails the gate; the sweeper gets a penalty.
    text_cos = m["fidelity_cosine_min/text_encoder"]
    strict = pipeline.run(
        cfg_factory(*mixed, f"fidelity.cosine_min={text_cos + 1e-4}"), work_dir=tmp_path / "strict"
    )
    data = _store_run(client, strict.run_id)
    assert data.tags["fidelity_gate"] == "failed"
    assert "text_encoder cosine min" in data.tags["fidelity_gate_reasons"]
    assert data.metrics["objective"] == pytest.approx(data.metrics["recall_at_10"] - 1.0)
    assert strict.objective.value == pytest.approx(strict.objective.raw - 1.0)
    assert "FAILED: text_encoder cosine min" in capsys.readouterr().out
