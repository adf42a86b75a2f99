"""Weights load from a file or an existing cache, never from the network."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from lpcvlab.errors import ConfigError
from lpcvlab.models.clip import _cached_checkpoint, build_clip
from lpcvlab.models.video import build_video_model

TINY_CLIP = {
    "name": "clip_tiny",
    "model_name": "clip_tiny",
    "tokenizer": "ViT-B-16",
    "pretrained": None,
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 224,
            "patch_size": 32,
            "width": 32,
            "layers": 1,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
}


def test_random_clip_is_tagged_and_announced(caplog):
    with caplog.at_level(logging.WARNING):
        _, _, weights = build_clip(OmegaConf.create(TINY_CLIP))
    assert weights == "random"
    assert "RANDOM WEIGHTS" in caplog.text


def test_clip_weights_from_a_file(tmp_path):
    torch.manual_seed(1)
    model, _, _ = build_clip(OmegaConf.create(TINY_CLIP))
    path = tmp_path / "clip_tiny.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(2)
    loaded, _, weights = build_clip(OmegaConf.create({**TINY_CLIP, "pretrained": str(path)}))
    assert weights == str(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_missing_checkpoint_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        build_clip(OmegaConf.create({**TINY_CLIP, "pretrained": str(tmp_path / "nope.pt")}))


def test_open_clip_tag_resolves_from_an_existing_hf_cache_only(tmp_path):
    assert _cached_checkpoint("ViT-B-32", "openai", str(tmp_path)) is None  # nothing fetched
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "open_clip_model.safetensors").write_bytes(b"weights")
    found = _cached_checkpoint("ViT-B-32", "openai", str(tmp_path))
    assert found == str(snap / "open_clip_model.safetensors")


def test_unknown_open_clip_tag_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not an open_clip tag"):
        _cached_checkpoint("ViT-B-32", "no_such_tag", str(tmp_path))


def _video_backbone(**kw):
    return OmegaConf.create({"name": "r3d", "arch": "r3d_18", "pretrained": None, **kw})


def test_video_head_sized_from_class_map_and_kinetics_checkpoint_loads(tmp_path, monkeypatch):
    from torchvision.models.video import r3d_18

    kinetics = r3d_18(weights=None)  # 400-class head, like the torchvision checkpoint
    path = tmp_path / "r3d_18-kinetics.pth"
    torch.save(kinetics.state_dict(), path)
    model, weights = build_video_model(_video_backbone(pretrained=str(path)), num_classes=92)
    assert weights == str(path) and model.fc.out_features == 92
    assert torch.equal(model.stem[0].weight, kinetics.stem[0].weight)

    # The kinetics400 tag is taken from the torch hub cache when the file is there.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _, weights = build_video_model(_video_backbone(pretrained="kinetics400"), 92)
    assert weights == "random"
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth").write_bytes(path.read_bytes())
    model, weights = build_video_model(_video_backbone(pretrained="kinetics400"), 92)
    assert weights == "kinetics400"
    assert torch.equal(model.stem[0].weight, kinetics.stem[0].weight)


def test_video_checkpoint_of_another_architecture_is_refused(tmp_path):
    from torchvision.models.video import mc3_18

    path = tmp_path / "mc3.pth"
    torch.save(mc3_18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit"):
        build_video_model(_video_backbone(arch="r2plus1d_18", pretrained=str(path)), 92)
