"""backbone.image_size, backbone.context_length and backbone.activation: compose-time checks,
the model surgery, the exported inputs, the preprocessing and the logged costs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import build_track_for, compose_config
from mlflow.tracking import MlflowClient
from test_compose import _outcome

from lpcvlab import pipeline
from lpcvlab.data.images import tokenize
from lpcvlab.deploy.export import export_component
from lpcvlab.models.clip import GeluSigmoid, adapt_clip, build_clip, swap_activation
from lpcvlab.tracks.retrieval import IMAGE, TEXT


def _tiny(*overrides: str):
    return build_track_for(compose_config("backbone=clip_tiny", *overrides))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backbone.image_size=161"], "backbone.image_size=160 or 192"),
        (["backbone.context_length=78"], "backbone.context_length=77 or less"),
        (["backbone=mobileclip2_s0", "backbone.image_size=256"], "leave backbone.image_size=null"),
        (["backbone.activation=swish"], "backbone.activation"),
    ],
)
def test_impossible_levers_fail_at_compose_in_one_line(overrides, expected):
    message = _outcome("backbone=clip_tiny", *overrides)
    assert message is not None and expected in message and "\n" not in message


def test_the_levers_compose_for_a_vit():
    assert _outcome("backbone=clip_vit_b16", "backbone.image_size=256") is None
    assert _outcome("backbone=clip_vit_b16", "backbone.image_size=250") is not None


def test_image_size_resizes_the_positional_embedding_the_input_and_the_images(tmp_path):
    track = _tiny("backbone.image_size=160", f"paths.cache_dir={tmp_path}")
    assert track.image.size == 160  # the images are resized to the model's side
    bundle = track.build_model()
    visual = bundle.model.visual
    assert tuple(visual.positional_embedding.shape) == (5 * 5 + 1, 64)  # patch 32: 26 tokens
    image = next(c for c in bundle.components if c.name == IMAGE)
    assert image.input.shape == (1, 3, 160, 160)
    with torch.no_grad():
        assert bundle.model.encode_image(torch.rand(1, 3, 160, 160)).shape == (1, 64)
    exp = export_component(image, np.random.default_rng(0).random((2, 3, 160, 160), "f4"), tmp_path)
    graph = onnx.load(str(exp.path))
    dims = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 160, 160] and exp.parity_cosine_min >= 0.999
    pos = next(i for i in graph.graph.initializer if i.name.endswith("positional_embedding"))
    assert list(pos.dims) == [26, 64]  # the sequence length the graph runs


def test_interpolation_keeps_the_class_token_and_is_the_identity_at_the_same_size():
    cfg = compose_config("backbone=clip_tiny").backbone
    torch.manual_seed(0)
    model, _, _ = build_clip(cfg)
    pos = model.visual.positional_embedding.detach().clone()
    same = adapt_clip(
        model, build_track_for(compose_config("backbone=clip_tiny")).backbone.settings
    )
    assert torch.equal(same.visual.positional_embedding, pos)
    sized = build_track_for(compose_config("backbone=clip_tiny", "backbone.image_size=320"))
    adapt_clip(model, sized.backbone.settings)
    grown = model.visual.positional_embedding.detach()
    assert grown.shape == (10 * 10 + 1, 64) and torch.equal(grown[0], pos[0])


def test_context_length_cuts_the_text_tower_and_keeps_its_outputs():
    full = _tiny()
    cut = _tiny("backbone.context_length=32")
    torch.manual_seed(0)
    long_model, _ = full.backbone.build()
    torch.manual_seed(0)
    short_model, _ = cut.backbone.build()
    assert tuple(short_model.positional_embedding.shape) == (32, 64)
    assert tuple(short_model.attn_mask.shape) == (32, 32)
    captions = ["a red circle on the left of a blue square", "word " * 40]
    long_tokens, long_cut = tokenize(captions, full.backbone.tokenizer())
    short_tokens, short_cut = tokenize(captions, cut.backbone.tokenizer())
    assert long_tokens.shape == (2, 77) and short_tokens.shape == (2, 32)
    assert long_cut == [] and short_cut == [1]  # truncations counted at the new length
    with torch.no_grad():
        a = long_model.encode_text(torch.from_numpy(long_tokens[:1]))
        b = short_model.encode_text(torch.from_numpy(short_tokens[:1]))
    # causal attention: positions past the caption never changed the pooled EOT token
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    text = next(c for c in cut._bundle(short_model, "random").components if c.name == TEXT)
    assert text.input.shape == (1, 32)


def test_activation_swap_replaces_every_mlp_activation():
    torch.manual_seed(0)
    model, _, _ = build_clip(compose_config("backbone=clip_tiny").backbone)
    assert swap_activation(model, "relu") == 4  # 2 blocks per tower
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 4
    swap_activation(model, "gelu_sigmoid")
    assert sum(isinstance(m, GeluSigmoid) for m in model.modules()) == 4
    x = torch.linspace(-4, 4, 32)
    torch.testing.assert_close(GeluSigmoid()(x), x * torch.sigmoid(1.702 * x))
    gap = (GeluSigmoid()(x) - torch.nn.functional.gelu(x)).abs().max()
    assert 0 < gap < 0.03  # an approximation of the exact (erf) GELU, and a close one


@pytest.mark.slow
def test_a_run_logs_the_levers(cfg_factory, tmp_path):
    cfg = cfg_factory(
        "backbone.image_size=192", "backbone.context_length=32", "backbone.activation=relu"
    )
    res = pipeline.run(cfg, work_dir=tmp_path / "work")
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(res.run_id)
    assert run.data.tags["onnx_input/image_encoder"] == "image 1x3x192x192 float32"
    assert run.data.tags["onnx_input/text_encoder"] == "text 1x32 int64"
    m = run.data.metrics
    before, after = (
        m["activation/recall_at_10_before_swap"],
        m["activation/recall_at_10_after_swap"],
    )
    assert 0 <= before <= 1 and 0 <= after <= 1
    assert after == pytest.approx(m["recall_at_10"], abs=0.05)  # the swapped model is deployed
