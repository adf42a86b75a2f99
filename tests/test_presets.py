"""Presets and weights that behave: every preset with a tiny backbone runs or refuses when the
config is loaded, in one line with the override to use; missing weights are reported there."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.errors import HydraException
from lpcvlab_runs import REPO, TINY, all_runs, explain, run_py, store_overrides

from lpcvlab.config import composition_error, load_settings
from lpcvlab.config import weights as weights_module
from lpcvlab.errors import ConfigError

PRESETS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
TINY_OF = {"retrieval": ("clip_tiny", "demo_retrieval"), "video": ("video_tiny", "demo_video")}
# `key=value` the user can type: the override a refusal must give.
OVERRIDE = re.compile(r"\b[a-z_]+(\.[a-z_0-9]+)*=[\w/.<>-]+")


def preset_track(name: str) -> str:
    return str(compose_config(f"experiment={name}").track.name)


def load_or_message(*overrides: str) -> str | None:
    """None when the config composes and passes every check, else the one-line message."""
    try:
        load_settings(compose_config(*overrides))
    except ConfigError as exc:
        return str(exc)
    except HydraException as exc:
        message = composition_error(exc)
        assert message is not None, f"{overrides}: Hydra's own report, not one line: {exc}"
        return message
    return None


@pytest.fixture(autouse=True)
def _report_every_miss(monkeypatch):
    monkeypatch.setattr(weights_module, "_reported", set())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_with_its_tracks_tiny_backbone_passes_the_checks(name):
    backbone, data = TINY_OF[preset_track(name)]
    assert load_or_message(f"experiment={name}", f"backbone={backbone}", f"data={data}") is None


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("backbone", ["clip_tiny", "video_tiny"])
def test_every_preset_with_a_tiny_backbone_runs_or_refuses_in_one_line(name, backbone):
    data = {"clip_tiny": "demo_retrieval", "video_tiny": "demo_video"}[backbone]
    message = load_or_message(f"experiment={name}", f"backbone={backbone}", f"data={data}")
    if message is None:
        return
    assert "\n" not in message
    assert OVERRIDE.search(message) or "remove" in message, message


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["backbone=clip_tiny", "backbone.pretrained=openai"], "backbone.pretrained=null"),
        (["track=video", "backbone.pretrained=kinetics400"], "backbone.pretrained=null"),
        (["track=video", "backbone=r3d_18", "backbone.pretrained=openai"], "=kinetics400"),
        (["backbone=clip_vit_b16", "backbone.pretrained=laion"], "backbone.pretrained=TAG"),
        (["track=video", "backbone=clip_tiny"], "backbone=video_tiny"),
    ],
)
def test_weights_that_can_never_load_are_refused_with_the_override(overrides, fix):
    message = load_or_message(*overrides)
    assert message is not None and "\n" not in message
    assert fix in message
    assert "use kinetics400, a checkpoint path, or null" not in message


def test_a_missing_checkpoint_file_says_where_it_was_looked_for(tmp_path):
    missing = tmp_path / "ckpt" / "ViT-B-16.pt"
    message = load_or_message("backbone=clip_tiny", f"backbone.pretrained={missing}")
    assert message is not None
    assert str(missing) in message and "backbone.pretrained=null" in message
    assert "put the file there" in message


def test_a_cache_miss_is_reported_at_load_with_the_place_and_the_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lpcvlab.config.weights"):
        load_settings(compose_config("backbone=clip_vit_b32", f"backbone.cache_dir={tmp_path}"))
    text = caplog.text
    assert "backbone.pretrained=openai (backbone=clip_vit_b32)" in text
    assert str(tmp_path) in text and "ViT-B-32.pt" in text
    assert "timm/vit_base_patch32_clip_224.openai" in text
    assert "backbone.pretrained=null" in text and "RANDOM" in text


def test_kinetics_miss_names_the_torch_hub_file_and_a_hit_is_silent(tmp_path, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with caplog.at_level(logging.WARNING, logger="lpcvlab.config.weights"):
        load_settings(compose_config("track=video", "backbone=r3d_18"))
    assert f"{tmp_path / 'hub' / 'checkpoints'} (file r3d_18-b3b3357e.pth)" in caplog.text

    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth").write_bytes(b"weights")
    monkeypatch.setattr(weights_module, "_reported", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lpcvlab.config.weights"):
        load_settings(compose_config("track=video", "backbone=r3d_18"))
    assert "not on this machine" not in caplog.text


def test_the_model_stage_no_longer_contradicts_itself():
    from omegaconf import OmegaConf

    from lpcvlab.models.video import load_video

    tiny = {"name": "video_tiny", "arch": "video_tiny", "pretrained": "kinetics400"}
    tiny = OmegaConf.create(tiny)
    with pytest.raises(ConfigError) as info:
        load_video(tiny, 4)
    assert "use kinetics400" not in str(info.value)
    assert "backbone.pretrained=null" in str(info.value)


@pytest.mark.slow
def test_a_baseline_preset_runs_end_to_end_with_the_tiny_backbone(tmp_path: Path):
    """track1_baseline used to pin backbone.pretrained=openai and fail with clip_tiny."""
    proc = run_py(
        "experiment=track1_baseline",
        "data=demo_retrieval",
        *TINY,
        *store_overrides(tmp_path),
    )
    assert proc.returncode == 0, explain(proc)
    # Quiet output off a terminal: progress as lines (export before and after), no bars.
    out = proc.stdout + proc.stderr
    assert "exported image_encoder in" in out and "exported text_encoder in" in out
    assert "\r" not in out and "Creating initial MLflow database" not in out
    (run,) = all_runs(tmp_path)
    assert run.status == "FINISHED"
    assert run.tags["backbone"] == "clip_tiny" and run.tags["weights"] == "random"
