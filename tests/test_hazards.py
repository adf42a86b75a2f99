"""The device-hazard check (export.lint): every rule on a small graph that triggers it and on one
that does not, and what a run records and prints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpcvlab.config import load_settings
from lpcvlab.deploy import hazards
from lpcvlab.deploy.hazards import RULES, DeviceLint, Target, check_graph, lint_mode
from lpcvlab.errors import ConfigError
from lpcvlab.types import TensorSpec

QNN = Target("XR2 Gen 2 (Proxy)", "qnn_dlc", "qnn_dlc", "--truncate_64bit_io", "fp32", "retrieval")
IMAGE = TensorSpec("image", (1, 3, 8, 8), "float32")


def _save(path: Path, nodes, inputs, outputs, inits=(), opset: int = 18) -> Path:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save_model(model, str(path))
    return path


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _unary(tmp: Path, op: str, name: str = "g.onnx", shape=(1, 4)) -> Path:
    return _save(
        tmp / name, [helper.make_node(op, ["x"], ["y"], name=f"the_{op.lower()}")],
        [_float("x", shape)], [_float("y", shape)],
    )  # fmt: skip


def _attention(tmp: Path, length: int) -> Path:
    """Scores ``q @ k^T`` over ``length`` tokens, then Softmax: what attention compiles to."""
    return _save(
        tmp / f"attn{length}.onnx",
        [
            helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Softmax", ["s"], ["y"], axis=-1, name="attn_softmax"),
        ],
        [_float("q", (1, length, 4))],
        [_float("y", (1, length, length))],
    )


def _rules(found) -> set[str]:
    return {h.rule for h in found}


def test_every_rule_has_a_reason_a_fix_and_a_source():
    for rule in RULES.values():
        assert rule.reason and rule.fix and rule.source, rule.id
        assert rule.level in ("error", "note")
    assert set(RULES) >= {
        "erf",
        "seq_len",
        "int64_io",
        "unsupported_op",
        "dynamic_shape",
        "size",
        "w8a16_runtime",
        "io_contract",
    }


def test_erf(tmp_path):
    found = check_graph(_unary(tmp_path, "Erf"), "image_encoder", QNN)
    (erf,) = [h for h in found if h.rule == "erf"]
    assert erf.nodes == ("the_erf",) and erf.fix == "backbone.activation=gelu_sigmoid"
    assert "unsupported_op" not in _rules(found)  # reported once, by its own rule
    assert check_graph(_unary(tmp_path, "Sigmoid", "ok.onnx"), "image_encoder", QNN) == []


@pytest.mark.parametrize(
    ("length", "rule"),
    [(257, "seq_len"), (17, "seq_len"), (1031, "seq_len"), (1600, "seq_len")]
    + [(196, "seq_len_risky"), (50, None), (77, None), (7, None), (197, None)],
)
def test_seq_len(tmp_path, length, rule):
    found = check_graph(_attention(tmp_path, length), "image_encoder", QNN)
    assert _rules(found) == ({rule} if rule else set())
    if rule == "seq_len_risky":
        assert found[0].level == "note"  # reported, never a reason to stop
        assert hazards.LintReport("c", found).tag() == "ok"
    if rule == "seq_len":
        assert found[0].nodes == ("attn_softmax",) and str(length) in found[0].message


def _int64_graph(tmp: Path) -> Path:
    return _save(
        tmp / "text.onnx",
        [helper.make_node("Cast", ["text"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("text", TensorProto.INT64, [1, 77])],
        [_float("y", (1, 77))],
    )


def test_int64_io(tmp_path):
    path = _int64_graph(tmp_path)
    assert check_graph(path, "text_encoder", QNN) == []  # --truncate_64bit_io is set
    bare = Target("XR2 Gen 2 (Proxy)", "qnn_dlc", "qnn_dlc", "", "fp32", "retrieval")
    (found,) = check_graph(path, "text_encoder", bare)
    assert found.rule == "int64_io" and found.nodes == ("text",)
    assert "--truncate_64bit_io" in found.fix


def test_unsupported_op(tmp_path):
    path = _save(
        tmp_path / "nms.onnx",
        [helper.make_node("NonZero", ["x"], ["y"], name="nz")],
        [_float("x", (1, 4))],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 4])],
    )
    (found,) = [h for h in check_graph(path, "c", QNN) if h.rule == "unsupported_op"]
    assert found.nodes == ("nz",) and "NonZero" in found.message
    onnx_rt = Target("XR2 Gen 2 (Proxy)", "onnx", "onnx", "--truncate_64bit_io")
    assert "unsupported_op" not in _rules(check_graph(path, "c", onnx_rt))  # the EP falls back
    assert check_graph(_unary(tmp_path, "Relu", "ok.onnx"), "c", QNN) == []


def test_dynamic_shape(tmp_path):
    path = _unary(tmp_path, "Relu", shape=("batch", 4))
    (found,) = check_graph(path, "c", QNN)
    assert found.rule == "dynamic_shape" and set(found.nodes) == {"x", "y"}
    assert "batch" in found.message
    assert check_graph(_unary(tmp_path, "Relu", "ok.onnx", shape=(1, 4)), "c", QNN) == []


def _weighted(tmp: Path, external: bool) -> Path:
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    path = _save(
        tmp / "w.onnx",
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_float("x", (1, 64))],
        [_float("y", (1, 64))],
        [w],
    )
    if external:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, location="w.data")
    return path


def test_size(tmp_path):
    small = dict(size_limit_bytes=4096)  # the 2 GiB limit, scaled down to a test graph
    inline = _weighted(tmp_path, external=False)  # 16 KiB of weights in the graph file
    (found,) = check_graph(inline, "c", Target("d", "qnn_dlc", "qnn_dlc", **small))
    assert found.rule == "size" and "protobuf" in found.message
    assert check_graph(inline, "c", Target("d", "qnn_dlc", "qnn_dlc")) == []  # under 2 GiB
    (tmp_path / "ext").mkdir()
    external = _weighted(tmp_path / "ext", external=True)
    assert check_graph(external, "c", Target("d", "qnn_dlc", "qnn_dlc", **small)) == []
    (flat,) = check_graph(
        external, "c", Target("d", "tflite", "tflite", "--truncate_64bit_io", **small)
    )
    assert flat.rule == "size" and "flatbuffer" in flat.message


def test_w8a16_runtime(tmp_path):
    path = _unary(tmp_path, "Relu")
    w8a16 = Target("XR2 Gen 2 (Proxy)", "qnn_dlc", "qnn_dlc", "", "w8a16", "retrieval")
    (found,) = check_graph(path, "image_encoder", w8a16)
    assert found.rule == "w8a16_runtime" and "precision=fp16" in found.fix
    w8a8 = Target("XR2 Gen 2 (Proxy)", "qnn_dlc", "qnn_dlc", "", "w8a8", "retrieval")
    assert check_graph(path, "image_encoder", w8a8) == []


def _video(tmp: Path, frames: int = 16) -> tuple[Path, TensorSpec]:
    shape = (1, 3, frames, 112, 112)
    path = _save(
        tmp / f"video{frames}.onnx",
        [helper.make_node("ReduceMean", ["video"], ["class_probs"], axes=[2, 3, 4], keepdims=0)],
        [_float("video", shape)],
        [_float("class_probs", (1, 3))],
        opset=13,
    )
    return path, TensorSpec("video", shape, "float32")


def test_io_contract_of_the_export(tmp_path):
    """The export's I/O as the compile options will make it, against track.contract: Track 2's
    channel-last video of track.contract.frames frames, Track 1's tokens int32 after
    --truncate_64bit_io; a contract of 8 frames accepts an 8-frame export."""
    from conftest import compose_config

    s = load_settings(compose_config("track=video"))
    video = hazards.targets_of(s)["video_classifier"]
    video = dataclasses.replace(video, compile_options="--truncate_64bit_io")
    path, spec = _video(tmp_path)
    assert check_graph(path, "video_classifier", video, spec) == []  # channel-last on device
    ncthw = dataclasses.replace(video, channel_last_inputs=frozenset())
    (found,) = check_graph(path, "video_classifier", ncthw, spec)
    assert found.rule == "io_contract" and "got video 1x3x16x112x112 float32" in found.message
    path8, spec8 = _video(tmp_path, frames=8)
    (frames,) = check_graph(path8, "video_classifier", video, spec8)
    assert frames.message == (
        "input video: expected video 1x16x112x112x3 float32, got video 1x8x112x112x3 float32 "
        "(track.contract)"
    )
    eight = hazards.targets_of(
        load_settings(compose_config("track=video", "track.contract.frames=8"))
    )
    assert check_graph(path8, "video_classifier", eight["video_classifier"], spec8) == []
    # Track 1: int64 tokens are the contract's int32 once truncated on the device; the output
    # the harness reads is output_0, and this graph names it y.
    text = hazards.targets_of(load_settings(compose_config()))["text_encoder"]
    tokens = _int64_graph(tmp_path)
    found = check_graph(tokens, "text_encoder", text, TensorSpec("text", (1, 77), "int64"))
    assert [h.message for h in found if h.rule == "io_contract"] == [
        "output output_0: expected output_0 float32, got outputs y 1x77 float32 (track.contract)"
    ]


def test_lint_mode_defaults_per_hub():
    assert lint_mode(None, "aihub") == "error" and lint_mode(None, "local") == "warn"
    assert lint_mode("off", "aihub") == "off"
    from conftest import compose_config

    with pytest.raises(ConfigError, match="export.lint='loud'"):
        load_settings(compose_config("export.lint=loud"))
    assert load_settings(compose_config("hub=aihub")).export.lint is None


class _Log:
    def __init__(self):
        self.metrics, self.tags, self.artifacts = {}, {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics |= metrics

    def set_tags(self, tags):
        self.tags |= tags

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((artifact_path, json.loads(Path(path).read_text())))


def test_device_lint_records_and_stops(tmp_path, capsys):
    erf, ok = _unary(tmp_path, "Erf"), _unary(tmp_path, "Relu", "ok.onnx")
    targets = {"image_encoder": QNN, "text_encoder": QNN}
    rec = _Log()
    DeviceLint("warn", targets, tmp_path).check(
        rec, {"image_encoder": ("export", erf), "text_encoder": ("export", ok)},
        {"image_encoder": IMAGE, "text_encoder": IMAGE},
    )  # fmt: skip
    assert rec.tags == {"lint/image_encoder": "erf", "lint/text_encoder": "ok"}
    assert rec.metrics == {"lint_hazards/image_encoder": 1.0, "lint_hazards/text_encoder": 0.0}
    (where, record), _ = rec.artifacts
    assert where == "lint" and record["findings"][0]["nodes"] == ["the_erf"]
    assert record["findings"][0]["rule"] == "erf" and record["findings"][0]["message"]
    assert "image_encoder: erf:" in capsys.readouterr().err

    strict = DeviceLint("error", targets, tmp_path)
    with pytest.raises(ConfigError) as exc:
        strict.check(_Log(), {"image_encoder": ("export", erf)}, {"image_encoder": IMAGE})
    lines = str(exc.value).splitlines()
    assert len(lines) == 2 and "image_encoder: erf:" in lines[1] and "gelu_sigmoid" in lines[1]
    off = _Log()
    DeviceLint("off", targets, tmp_path).check(
        off, {"image_encoder": ("export", erf)}, {"image_encoder": IMAGE}
    )
    assert off.tags == {} and off.metrics == {}


def test_a_deployed_graph_adds_to_the_components_report(tmp_path):
    """hub=local: the fp16 / quantized graph is checked too, under the same component."""
    lint = DeviceLint("warn", {"image_encoder": QNN}, tmp_path)
    rec = _Log()
    relu = _unary(tmp_path, "Relu")
    lint.check(rec, {"image_encoder": ("export", relu)}, {"image_encoder": IMAGE})
    assert rec.tags["lint/image_encoder"] == "ok"
    lint.check(
        rec, {"image_encoder": ("w8a8", _unary(tmp_path, "Erf", "q.onnx"))},
        {"image_encoder": IMAGE},
    )  # fmt: skip
    assert rec.tags["lint/image_encoder"] == "erf"
    record = rec.artifacts[-1][1]
    assert [g["graph"] for g in record["graphs"]] == ["export", "w8a8"]
    assert record["findings"][0]["graph"] == "w8a8"


def test_track2_frame_count_follows_num_frames_and_the_contract(tmp_path):
    """`track=video preprocess.video.num_frames=8` exports (1,3,8,112,112); the lint flags it
    against a 16-frame contract and accepts it under track.contract.frames=8."""
    from conftest import build_track_for, compose_config

    from lpcvlab.deploy.export import export_component

    found = {}
    for frames in (16, 8):
        cfg = compose_config(
            "track=video",
            "preprocess.video.num_frames=8",
            f"track.contract.frames={frames}",
            f"paths.cache_dir={tmp_path}/cache",
        )
        (comp,) = build_track_for(cfg).build_model().components
        assert comp.input.shape == (1, 3, 8, 112, 112)
        samples = np.random.default_rng(0).random((1, 3, 8, 112, 112), dtype=np.float32)
        exp = export_component(comp, samples, tmp_path / f"onnx{frames}")
        target = hazards.targets_of(load_settings(cfg))["video_classifier"]
        found[frames] = check_graph(exp.path, "video_classifier", target, exp.input)
    (hazard,) = found[16]
    assert hazard.rule == "io_contract" and "got video 1x8x112x112x3 float32" in hazard.message
    assert found[8] == []
