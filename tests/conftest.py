"""Shared fixtures: composed configs (as the Lightning-Hydra template does) and tiny settings."""

from __future__ import annotations

import os

# One thread per test process (and the `python run.py` subprocesses that inherit it): the
# suite runs several workers at once, and OpenMP pools of one thread per core in each of them
# spin against each other. Set it yourself to test with more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lpcvlab_runs import seeded_store
from omegaconf import DictConfig

import lpcvlab.config  # noqa: F401  (registers the typed schemas Hydra composes with)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DATA = Path(__file__).resolve().parent / "data"


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny_overrides(tmp: Path, demo: bool = True) -> list[str]:
    """A Track 1 run that takes seconds: clip_tiny, few images, few timed iterations."""
    return [
        *(["data.demo.num_images=12"] if demo else []),
        "backbone=clip_tiny",
        f"tracking.uri={seeded_store(tmp)}",
        f"tracking.artifact_root={tmp}/artifacts",
        f"paths.cache_dir={tmp}/cache",
        "hub.profile_iterations=3",
        "hub.warmup_iterations=1",
        "export.parity_samples=4",
    ]


def build_track_for(cfg: DictConfig):
    """The track a run of ``cfg`` would build (typed settings, checked), as the pipeline does."""
    from lpcvlab.config import load_settings
    from lpcvlab.tracks import build_track

    return build_track(load_settings(cfg))


@pytest.fixture
def cfg_factory(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, demo: bool = True) -> DictConfig:
        return compose_config(*overrides, *tiny_overrides(tmp_path, demo=demo))

    return make
