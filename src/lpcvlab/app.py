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


def sweep_job() -> tuple[bool, dict[str, str]]:
    """(is this job part of a multirun, tags naming it: job number and its overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False, {}
    hc = HydraConfig.get()
    return True, {
        "sweep_job": str(hc.job.num),
        "sweep_overrides": " ".join(str(o) for o in hc.overrides.task)[:5000],
    }


def run_job(cfg: DictConfig) -> float | None:
    """Run one job; returns the objective for sweepers (``track.objective``, budget applied).

    A user error (:class:`LpcvlabError`) in a single run prints its message and exits 1. In a
    multirun it is logged and the job returns None instead: raising would make Hydra's basic
    sweeper abort the sweep (and skip its end-of-sweep callbacks), while None lets it go on, and
    the Optuna sweeper records the trial as failed (see ``max_failure_rate``). The job's MLflow
    run is FAILED either way and the sweep's parent run counts it.
    """
    from lpcvlab import pipeline

    quiet_third_party()
    out_dir, hydra_dir = hydra_dirs()
    multirun, tags = sweep_job()
    try:
        if cfg.get("reproduce"):
            from lpcvlab.reproduce import reproduce_from_hydra

            return reproduce_from_hydra(cfg, out_dir)
        result = pipeline.run(cfg, work_dir=out_dir, hydra_dir=hydra_dir, extra_tags=tags)
    except LpcvlabError as exc:
        log.error("%s", exc)
        if multirun:
            from lpcvlab.sweep import note_job_failure

            note_job_failure(f"{type(exc).__name__}: {exc}")
            return None
        print(f"\nerror: {exc}", file=sys.stderr)
        sys.exit(1)
    assert result.objective is not None
    return result.objective.value
