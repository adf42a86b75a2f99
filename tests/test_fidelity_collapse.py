"""The fidelity gate fails a quantized component whose outputs collapse (far fewer distinct
outputs than distinct inputs: its embeddings tie and the tie order decides Recall@10)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_config

from lpcvlab.config import load_settings
from lpcvlab.config.schema import FidelityConfig
from lpcvlab.deploy.precision.fidelity import component_fidelity, distinct_rows, gate
from lpcvlab.errors import ConfigError


def _tokens(rng, n_distinct, n):
    """Token rows with repeated captions: ``n`` rows, ``n_distinct`` different ones."""
    unique = rng.integers(1, 49000, (n_distinct, 77))
    return unique[np.arange(n) % n_distinct]


def test_distinct_rows_compares_values():
    a = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    assert distinct_rows(a) == 2  # -0.0 is 0.0
    assert distinct_rows(np.zeros((4, 3, 2), dtype=np.int64)) == 1


def test_collapsed_text_encoder_fails_the_gate_by_name():
    rng = np.random.default_rng(0)
    inputs = _tokens(rng, 90, 99)  # 99 captions, 9 repeated
    fp32 = rng.standard_normal((90, 32)).astype(np.float32)[np.arange(99) % 90]
    levels = rng.standard_normal((3, 32)).astype(np.float32)
    collapsed = levels[np.arange(99) % 3]
    m = component_fidelity("text_encoder", fp32, collapsed, inputs)
    assert m["distinct_inputs/text_encoder"] == 90.0
    assert m["distinct_outputs/text_encoder"] == 3.0
    assert m["fidelity_distinct_ratio/text_encoder"] == pytest.approx(3 / 90)
    # A healthy image encoder beside it: every output distinct.
    img_in = rng.random((12, 3, 8, 8), dtype=np.float32)
    img_ref = rng.standard_normal((12, 16)).astype(np.float32)
    m |= component_fidelity("image_encoder", img_ref, img_ref + 1e-4, img_in)
    assert m["fidelity_distinct_ratio/image_encoder"] == 1.0
    # Only the collapse is judged here (cosine and drop thresholds off).
    verdict = gate(FidelityConfig(None, None), "recall_at_10", m)
    assert verdict is not None and not verdict.passed
    (reason,) = verdict.reasons
    assert reason.startswith("text_encoder collapsed: 3 distinct outputs for 90 distinct inputs")
    assert "distinct outputs >= 0.9 x distinct inputs" in verdict.line()
    # Configurable: a lower threshold lets it through, null turns the check off.
    assert gate(FidelityConfig(None, None, 1.0, 0.03), "recall_at_10", m).passed
    off = gate(FidelityConfig(None, None, 1.0, None), "recall_at_10", m)
    assert off.passed and not any("distinct" in c for c in off.checks)


def test_without_inputs_the_fp32_outputs_count_the_distinct_inputs():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((20, 8)).astype(np.float32)
    out = ref.copy()
    out[10:] = out[0]  # half the outputs became the first one
    m = component_fidelity("video_classifier", ref, out)
    assert m["distinct_inputs/video_classifier"] == 20.0
    assert m["distinct_outputs/video_classifier"] == 10.0
    verdict = gate(FidelityConfig(None, None), "top1", m)
    assert not verdict.passed and "video_classifier collapsed" in verdict.reasons[0]


def test_distinct_min_is_a_config_key_with_a_range():
    s = load_settings(compose_config("fidelity.distinct_min=0.5"))
    assert s.fidelity.distinct_min == 0.5
    assert load_settings(compose_config()).fidelity.distinct_min == 0.9
    with pytest.raises(ConfigError, match=r"fidelity.distinct_min=1.5 must be <= 1"):
        load_settings(compose_config("fidelity.distinct_min=1.5"))
