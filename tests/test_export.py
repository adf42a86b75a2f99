"""Export of clip_tiny: checked ONNX, content-hashed names, parity, baked-in normalisation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lpcvlab.config.schema import LocalHubConfig
from lpcvlab.deploy.export import export_component
from lpcvlab.errors import ParityError
from lpcvlab.hubs.local import LocalHub
from lpcvlab.metrics import cosine_per_sample


@pytest.fixture(scope="module")
def tiny_bundle():
    from conftest import build_track_for, compose_config

    return build_track_for(compose_config("backbone=clip_tiny")).build_model()


def _inputs(rng, spec, n=3):
    if spec.dtype == "int64":
        x = rng.integers(1, 49000, size=(n, *spec.shape[1:]))
        x[:, 0], x[:, -1] = 49406, 49407  # SOT ... EOT
        return x.astype(np.int64)
    return rng.random((n, *spec.shape[1:]), dtype=np.float32)


def test_export_checks_hashes_and_matches_torch(tiny_bundle, tmp_path):
    rng = np.random.default_rng(0)
    for comp in tiny_bundle.components:
        res = export_component(comp, _inputs(rng, comp.input), tmp_path)
        assert res.path.name == f"{comp.name}-{res.sha256[:16]}.onnx"
        model = onnx.load(str(res.path))
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == [comp.input.name]
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert tuple(dims) == comp.input.shape
        assert res.parity_cosine_min >= 0.999 and res.parity_samples == 3


def test_same_model_same_file(tiny_bundle, tmp_path):
    comp = tiny_bundle.components[0]
    x = _inputs(np.random.default_rng(0), comp.input, 1)
    a = export_component(comp, x, tmp_path)
    b = export_component(comp, x, tmp_path)
    assert a.path == b.path and a.sha256 == b.sha256


def test_parity_below_threshold_fails_loudly(tiny_bundle, tmp_path):
    comp = tiny_bundle.components[1]
    x = _inputs(np.random.default_rng(0), comp.input, 2)
    with pytest.raises(ParityError, match="text_encoder: ONNX output disagrees"):
        export_component(comp, x, tmp_path, parity_threshold=1.5)


def test_mean_std_baked_into_the_image_encoder(tiny_bundle, tmp_path):
    """The baked encoder on /255 input == the plain encoder on host-normalised input."""
    from lpcvlab.models.clip import ImageEncoder
    from lpcvlab.types import Component

    mean = [0.48145466, 0.4578275, 0.40821073]
    std = [0.26862954, 0.26130258, 0.27577711]
    plain = tiny_bundle.components[0]
    baked = Component(plain.name, ImageEncoder(tiny_bundle.model, mean, std), plain.input)
    x = np.random.default_rng(1).random((2, 3, 224, 224), dtype=np.float32)
    x_host = (
        (x - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    ).astype(np.float32)
    rt = LocalHub(LocalHubConfig(profile_iterations=1, warmup_iterations=0))
    out_baked = rt.infer(rt.compile(export_component(baked, x, tmp_path / "a")), x).outputs
    out_host = rt.infer(rt.compile(export_component(plain, x_host, tmp_path / "b")), x_host)
    assert cosine_per_sample(out_baked, out_host.outputs).min() > 0.9999


def test_cosine_per_sample_edge_cases():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_per_sample(a, b), [1.0, 1.0, 0.0])
