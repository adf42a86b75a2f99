"""Stage records (lpcvlab.types, converted by pydantic): a record the hand-written conversion
wrote before reads back into the same result and is written again as the same JSON text."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lpcvlab.types import CompileResult, ExportResult, ProfileResult, QuantizeResult, TensorSpec

# Written by the previous to_record (the stage cache's files hold these), PATH the export's file.
INPUT = '{"name": "image", "shape": [1, 3, 224, 224], "dtype": "float32", "channel_last": false}'
EXPORT = (
    '{"path": "PATH", "size": 123, "sha256": "abab", "input": ' + INPUT + ', "output_name": '
    '"output_0", "parity_cosine_min": 0.9999999999998, "parity_samples": 8, "seconds": 1.25, '
    '"rewrite_sites": {"finite_mask": 2}, "rewrite_cosine_min": {"finite_mask": 0.99999}, '
    '"op_counts": {"Add": 3}, "op_counts_plain": {"Add": 4}}'
)
QUANTIZE = (
    '{"precision": "w8a8", "method": "onnxruntime static QDQ", "seconds": 2.0, "model": '
    + EXPORT
    + ', "calibration_samples": 8, "calibration_sha256": "ffff", "calibration_source": '
    '"eval_spread", "job_id": null, "job_url": null}'
)
COMPILE = (
    '{"runtime": "qnn_dlc", "device": "XR2 Gen 2 (Proxy)", "job_id": "j2", "job_url": '
    '"https://hub/j2", "io": {"inputs": [{"name": "image", "shape": [1, 3, 224, 224], "dtype": '
    '"uint8", "scale": 0.00392156, "zero_point": 0}], "outputs": [{"name": "output_0", "shape": '
    '[1, 512], "dtype": "float32", "scale": null, "zero_point": null}]}, "artifact": '
    '"/models/a.dlc", "artifact_sha256": "eeee", "toolchain": "2.45"}'
)
PROFILE = (
    '{"latency_ms": 1.5, "peak_memory_mb": [1.0, 2.0], "compute_units": {"NPU": 300}, "raw": '
    '{"a": Infinity, "b": [1, null]}, "job_id": "j3", "job_url": null}'
)


def _file(tmp_path: Path) -> Path:
    path = (tmp_path / "image_encoder.onnx").resolve()
    path.write_bytes(b"x" * 123)
    return path


def test_stored_records_read_back_and_write_the_same_json(tmp_path):
    path = _file(tmp_path)
    export_text = EXPORT.replace("PATH", str(path))
    exported = ExportResult.from_record("image_encoder", json.loads(export_text))
    assert exported is not None and exported.path == path and exported.component == "image_encoder"
    assert exported.input == TensorSpec("image", (1, 3, 224, 224), "float32")
    assert exported.rewrite_sites == {"finite_mask": 2} and exported.parity_samples == 8
    assert json.dumps(exported.to_record()) == export_text

    quantize_text = QUANTIZE.replace("PATH", str(path))
    quantized = QuantizeResult.from_record("image_encoder", json.loads(quantize_text))
    assert quantized is not None and quantized.model == exported
    assert json.dumps(quantized.to_record()) == quantize_text

    compiled = CompileResult.from_record(exported, json.loads(COMPILE))
    assert compiled.component == "image_encoder" and compiled.handle is None
    assert compiled.artifact == Path("/models/a.dlc") and compiled.io is not None
    assert compiled.io.inputs[0].quantized and compiled.io.inputs[0].zero_point == 0
    assert json.dumps(compiled.to_record()) == COMPILE

    profile = ProfileResult.from_record("image_encoder", json.loads(PROFILE))
    assert profile.peak_memory_mb == (1.0, 2.0) and math.isinf(profile.raw["a"])
    assert json.dumps(profile.to_record()) == PROFILE  # the hub's raw summary kept as it was


def test_a_replaced_or_missing_file_is_not_reused(tmp_path):
    path = _file(tmp_path)
    record = json.loads(EXPORT.replace("PATH", str(path)))
    assert ExportResult.from_record("c", {**record, "size": 124}) is None
    quantize = json.loads(QUANTIZE.replace("PATH", str(tmp_path / "gone.onnx")))
    assert QuantizeResult.from_record("c", quantize) is None
