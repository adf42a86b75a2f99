"""Every option of every config group composes; a track selects its own defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CONF, REPO, compose_config
from omegaconf import OmegaConf

# Experiments and searches are global presets, tested in test_experiments.py.
# train_track is not chosen by users: config.yaml picks it from train and track.
PRESETS = {"experiment", "hparams_search", "train_track"}
GROUPS = sorted(
    p.name
    for p in CONF.iterdir()
    if p.is_dir() and not p.name.startswith(".") and p.name not in PRESETS
)
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_defaults_are_the_official_track1_sample():
    cfg = compose_config()
    assert cfg.track.name == "retrieval"
    assert cfg.backbone.name == "clip_vit_b16" and cfg.backbone.pretrained == "openai"
    assert cfg.preprocess.name == "lpcvc_sample"
    assert cfg.device.aihub_name == "XR2 Gen 2 (Proxy)"
    assert cfg.runtime.target_runtime == "qnn_dlc"
    assert "--truncate_64bit_io" in cfg.runtime.compile_options
    assert cfg.hub.name == "local" and cfg.data.name == "demo_retrieval"
    assert cfg.tracking.uri.startswith("sqlite:///") or cfg.tracking.uri
    assert cfg.seed == 0


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    node = OmegaConf.select(cfg, group)
    assert node is not None
    # Every option names itself, so runs can be told apart in MLflow.
    if "name" in node:
        assert node.name == option or group in ("track", "tracking", "paths")
    OmegaConf.to_container(cfg, resolve=True)  # all interpolations resolve


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "run.py", "--cfg", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "backbone:" in out and "name: clip_vit_b16" in out
