"""What ``run.py`` does inside a Hydra job: run the pipeline, turn user errors into messages."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from lpcvlab.errors import LpcvlabError

log = logging.getLogger("lpcvlab")

# Libraries that narrate every step at INFO; their warnings still show.
_CHATTY = ("onnx_ir", "onnxscript", "torch.onnx", "torch._export", "torch.export", "alembic")


def quiet_third_party() -> None:
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def hydra_dirs() -> tuple[Path | None, Path | None]:
    """(job output dir, its .hydra dir) when running under Hydra, else (None, None)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    return out, out / hc.output_subdir if hc.output_subdir else None


def run_job(cfg: DictConfig) -> float | None:
    """Run one job; returns the track's headline metric (for sweepers), exits 1 on user error."""
    from lpcvlab import pipeline

    quiet_third_party()
    out_dir, hydra_dir = hydra_dirs()
    try:
        result = pipeline.run(cfg, work_dir=out_dir, hydra_dir=hydra_dir)
    except LpcvlabError as exc:
        log.error("%s", exc)
        print(f"\nerror: {exc}", file=sys.stderr)
        sys.exit(1)
    return result.metrics.get(str(cfg.track.objective))
