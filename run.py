"""Hydra entry point: ``python run.py`` (the Track 1 demo), ``python run.py -m ...`` (sweeps)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

import lpcvlab.config  # noqa: F401  (registers the typed schemas before Hydra composes)

CONF, CONFIG = "conf", "config"


@hydra.main(version_base="1.3", config_path=CONF, config_name=CONFIG)
def main(cfg: DictConfig) -> float | None:
    from lpcvlab.app import run_job

    return run_job(cfg)


if __name__ == "__main__":
    from lpcvlab.app import hydra_entry

    hydra_entry(main, Path(__file__).resolve().parent / CONF, CONFIG)
