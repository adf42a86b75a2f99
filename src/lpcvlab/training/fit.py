"""Run a fine-tuning job inside the pipeline's MLflow run (one run, not two), for any track.

Lightning's MLflow logger writes into the run the pipeline already owns; checkpoints go to the
job's output folder and the best one becomes an artifact. Ctrl-C keeps the last checkpoint, logs
it, and leaves the run KILLED; ``train.resume_from`` (a checkpoint path or an MLflow run ID)
continues from it.
"""

from __future__ import annotations

import logging
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from lpcvlab.config.schema import FinetuneConfig
from lpcvlab.config.teacher import CHECKPOINT_KEY
from lpcvlab.errors import ConfigError
from lpcvlab.training.averaging import WeightAveraging
from lpcvlab.types import RunLog
from lpcvlab.util import console

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_RESUMABLE = ("interrupted.ckpt", "last.ckpt")  # newest state first


EPOCH_STEPPED = ("val/",)  # metrics logged with the epoch as their step


class SharedRunMLFlowLogger(MLFlowLogger):
    """Logs metrics into an existing run and leaves its params and status to the pipeline.

    Validation metrics (``val/*``, once per epoch) take the epoch as their step, so that their
    charts read per epoch; the rest keep Lightning's step (optimizer steps), per-step loss
    included. Lightning adds ``epoch`` to what it logs at an epoch's end.
    """

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        epoch = metrics.get("epoch")
        stepped = {k: v for k, v in metrics.items() if k.startswith(EPOCH_STEPPED)}
        if epoch is None or not stepped:
            return super().log_metrics(metrics, step)
        super().log_metrics(stepped, int(epoch))
        rest = {k: v for k, v in metrics.items() if k not in stepped}
        if rest:
            super().log_metrics(rest, step)

    def log_hyperparams(self, params: Any) -> None:  # the resolved config is already logged
        return None

    def finalize(self, status: str = "success") -> None:  # the pipeline ends the run
        return None


class SaveOnException(Callback):
    """Saves ``interrupted.ckpt`` when training stops on Ctrl-C or an error, so it can resume.

    (Lightning's OnExceptionCheckpoint also makes every plain ``fit`` look for a "last"
    checkpoint to resume from; this one does nothing until something goes wrong.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.exception: BaseException | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc: BaseException
    ) -> None:
        self.exception = exc  # Lightning swallows a KeyboardInterrupt: keep which one it was
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(self.path))

    def interrupt(self) -> KeyboardInterrupt:
        """The interrupt to raise again: the one that stopped training (SIGTERM included)."""
        if isinstance(self.exception, KeyboardInterrupt):
            return self.exception
        return KeyboardInterrupt()


class RecordInCheckpoint(Callback):
    """Writes what built the model (backbone config, track) into every checkpoint, so that a
    checkpoint alone can be rebuilt, e.g. as a distillation teacher."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = self.record


AUTO_PRECISION = "auto"


def resolve_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """The Trainer config with ``precision: auto`` resolved: mixed precision on a GPU
    (``bf16-mixed`` where the GPU has bfloat16, else ``16-mixed``), ``32-true`` on a CPU
    (Lightning's CPU autocast is bfloat16, slower than float32 on most CPUs)."""
    out = dict(trainer)
    if out.get("precision") == AUTO_PRECISION:
        accelerator = str(out.get("accelerator", "auto"))
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        if gpu:
            out["precision"] = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            out["precision"] = "32-true"
    return out


@dataclass
class FitResult:
    best_checkpoint: Path | None
    best_score: float  # the checkpoint monitor's best value (nan without one)
    monitor: str | None  # e.g. "val/top1"
    epochs: int


def resolve_resume(resume_from: str | None, run: RunLog, work_dir: Path) -> Path | None:
    """A checkpoint path as given, or the newest resumable checkpoint logged by an MLflow run."""
    if not resume_from:
        return None
    if _RUN_ID.match(str(resume_from)):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=run.tracking_uri)
        names = {a.path for a in client.list_artifacts(str(resume_from), "checkpoints")}
        for name in _RESUMABLE:
            if f"checkpoints/{name}" in names:
                dest = work_dir / "resume"
                dest.mkdir(parents=True, exist_ok=True)
                return Path(
                    client.download_artifacts(str(resume_from), f"checkpoints/{name}", str(dest))
                )
        raise ConfigError(
            f"train.resume_from={resume_from}: that MLflow run has no checkpoints/last.ckpt "
            "or checkpoints/interrupted.ckpt to resume from"
        )
    path = Path(resume_from)
    if not path.is_file():
        raise ConfigError(f"train.resume_from={resume_from}: no such checkpoint file or run ID")
    return path


def fit(
    train: FinetuneConfig,
    module: pl.LightningModule,
    data: pl.LightningDataModule,
    run: RunLog,
    work_dir: Path,
    record: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``module`` with the Trainer and checkpoint of ``train``, inside the pipeline's MLflow
    run, and load the best checkpoint's weights back into it (the track builds the module: its
    loss, freezing policy and optimizer; ``record`` goes into every checkpoint).

    The run was seeded at its start (:func:`lpcvlab.util.seeding.seed_everything`, which also tells
    Lightning to seed DataLoader workers).
    """
    ckpt_dir = work_dir / "checkpoints"
    checkpoint: ModelCheckpoint = instantiate(train.checkpoint, dirpath=str(ckpt_dir))
    on_interrupt = SaveOnException(ckpt_dir / "interrupted.ckpt")
    callbacks: list[Callback] = [checkpoint, on_interrupt]
    if record is not None:
        callbacks.append(RecordInCheckpoint(record))
    # train.average / train.wise_alpha: starting weights and checkpoints kept for after training
    averaging = WeightAveraging(train, module, ckpt_dir / "average", checkpoint)
    callbacks += averaging.callbacks
    callbacks += console.training_progress()  # lines instead of the bar in a log file
    logger = SharedRunMLFlowLogger(tracking_uri=run.tracking_uri, run_id=run.run_id)
    trainer: pl.Trainer = instantiate(
        resolve_trainer(train.trainer),
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(work_dir),
        enable_model_summary=False,
        **console.trainer_progress_kwargs(),
    )
    run.set_tags(
        {
            "train/accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator"),
            "train/strategy": type(trainer.strategy).__name__.removesuffix("Strategy"),
            "train/precision": str(trainer.precision),
            "train/world_size": str(trainer.world_size),
        }
    )
    ckpt_path = resolve_resume(train.resume_from, run, work_dir)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
        run.set_tags({"resumed_from": str(train.resume_from)})
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after saving; make it an interrupt again.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if trainer.interrupted:
            _log_checkpoints(run, ckpt_dir)
            raise on_interrupt.interrupt() from None
        raise
    except BaseException:
        _log_checkpoints(run, ckpt_dir)
        raise
    if trainer.interrupted:  # interrupted without the SystemExit path (e.g. in a test)
        _log_checkpoints(run, ckpt_dir)
        raise on_interrupt.interrupt()
    if trainer.global_rank != 0:  # a DDP worker: rank 0 keeps the checkpoints and goes on
        return FitResult(None, float("nan"), checkpoint.monitor, trainer.current_epoch)
    best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    best_score = (
        float(checkpoint.best_model_score)
        if checkpoint.best_model_score is not None
        else float("nan")
    )
    if best is not None and best.is_file():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        run.log_artifact(best, "checkpoints")
        run.set_tags({"best_checkpoint": best.name})
    if checkpoint.last_model_path and Path(checkpoint.last_model_path).is_file():
        run.log_artifact(Path(checkpoint.last_model_path), "checkpoints")
    averaging.apply(module, run, best if best is not None and best.is_file() else None)
    monitor = checkpoint.monitor
    if monitor:
        run.log_metrics({f"train/best_{monitor.replace('/', '_')}": best_score})
    return FitResult(best, best_score, monitor, trainer.current_epoch)


def _log_checkpoints(run: RunLog, ckpt_dir: Path) -> None:
    for p in sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []:
        run.log_artifact(p, "checkpoints")
