"""Weight averaging after fine-tuning, for any track: checkpoint averaging, then WiSE-FT.

* ``train.average=last|best`` with ``train.average_k=k``: the weights after each validation are
  kept (``checkpoints/average/epoch=N.pt``, weights only), the last k or the best k by the
  checkpoint's monitor, and averaged (``none``: the best checkpoint, as ModelCheckpoint chose).
* ``train.wise_alpha=α``: WiSE-FT between the starting weights (a snapshot taken before
  training) and those: ``(1 - α) * start + α * tuned``. α = 0 gives back the starting weights
  exactly (bitwise: they are copied, not computed), α = 1 the tuned ones.

Averages are computed in float64 and cast back, so averaging identical checkpoints changes
nothing. Integer buffers (counters) come from the tuned weights. :class:`WeightAveraging` is
what :func:`lpcvlab.training.fit.fit` applies once, after loading the best checkpoint; the run
records what was averaged (tag ``weights_after_training``, ``averaging/checkpoints``, metrics
``train/wise_alpha`` and ``train/averaged_checkpoints``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lpcvlab.config.schema import FinetuneConfig
from lpcvlab.errors import ConfigError
from lpcvlab.types import RunLog

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def snapshot(module: torch.nn.Module) -> State:
    """A copy of ``module``'s weights on the CPU (the module trains on; this stays)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _check_keys(states: Sequence[State]) -> None:
    first = set(states[0])
    for s in states[1:]:
        if set(s) != first:
            diff = sorted(first.symmetric_difference(s))[:5]
            raise ValueError(f"cannot average weights with different keys: {diff}")


def average_states(states: Sequence[State]) -> State:
    """The mean of ``states`` (floating tensors, in float64, cast back to their dtype)."""
    if not states:
        raise ValueError("nothing to average")
    _check_keys(states)
    out: State = {}
    for key, last in states[-1].items():
        if not torch.is_floating_point(last):
            out[key] = last.clone()
            continue
        total = states[0][key].to(torch.float64, copy=True)  # not 0 + x: that loses -0.0
        for s in states[1:]:
            total += s[key].to(torch.float64)
        out[key] = (total / len(states)).to(last.dtype)
    return out


def interpolate(start: State, tuned: State, alpha: float) -> State:
    """WiSE-FT: ``(1 - alpha) * start + alpha * tuned``; alpha 0 and 1 are exact copies."""
    _check_keys([start, tuned])
    if alpha == 0:
        return {k: v.clone() for k, v in start.items()}
    if alpha == 1:
        return {k: v.clone() for k, v in tuned.items()}
    out: State = {}
    for key, t in tuned.items():
        if not torch.is_floating_point(t):
            out[key] = t.clone()
            continue
        mixed = (1 - alpha) * start[key].to(torch.float64) + alpha * t.to(torch.float64)
        out[key] = mixed.to(t.dtype)
    return out


class KeepForAveraging(Callback):
    """Saves the weights after each validation (not the sanity check) and keeps the last ``k``
    or the best ``k`` by ``monitor`` (``higher``: larger is better)."""

    def __init__(
        self, directory: Path, mode: str, k: int, monitor: str | None, higher: bool = True
    ) -> None:
        self.directory = Path(directory)
        self.mode, self.k, self.monitor, self.higher = mode, int(k), monitor, higher
        self.kept: list[tuple[int, float, Path]] = []  # (epoch, score, file)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = int(trainer.current_epoch)
        score = float("nan")
        if self.monitor is not None and self.monitor in trainer.callback_metrics:
            score = float(trainer.callback_metrics[self.monitor])
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"epoch={epoch}.pt"
        torch.save(snapshot(pl_module), path)
        self.kept = [e for e in self.kept if e[2] != path] + [(epoch, score, path)]
        if self.mode == "best":
            sign = -1.0 if self.higher else 1.0
            ranked = sorted(self.kept, key=lambda e: (sign * e[1], -e[0]))  # ties: later epoch
        else:
            ranked = sorted(self.kept, key=lambda e: -e[0])
        for _, _, gone in ranked[self.k :]:
            gone.unlink(missing_ok=True)
        self.kept = sorted(ranked[: self.k], key=lambda e: e[0])

    def states(self) -> list[State]:
        return [torch.load(p, map_location="cpu", weights_only=True) for _, _, p in self.kept]


class WeightAveraging:
    """What ``fit`` does around training: snapshot the starting weights (when WiSE-FT needs
    them), keep checkpoints to average (when asked), and apply both once training is done."""

    def __init__(
        self,
        train: FinetuneConfig,
        module: torch.nn.Module,
        directory: Path,
        checkpoint: ModelCheckpoint,
    ) -> None:
        self.alpha = float(train.wise_alpha)
        self.average = str(train.average)
        self.start = snapshot(module) if self.alpha < 1 else None
        self.keeper: KeepForAveraging | None = None
        if self.average != "none":
            monitor = checkpoint.monitor
            if self.average == "best" and not monitor:
                raise ConfigError(
                    "train.average=best needs a monitored metric (train.checkpoint.monitor); "
                    "use train.average=last or set the monitor"
                )
            self.keeper = KeepForAveraging(
                directory, self.average, int(train.average_k), monitor, checkpoint.mode != "min"
            )

    @property
    def callbacks(self) -> list[Callback]:
        return [self.keeper] if self.keeper is not None else []

    def apply(self, module: torch.nn.Module, run: RunLog, best: Path | None) -> None:
        """Load the averaged / interpolated weights into ``module`` and record what they are."""
        what = f"best checkpoint {best.name}" if best is not None else "last weights"
        names: list[str] = []
        tuned: State | None = None
        if self.keeper is not None and self.keeper.kept:
            names = [p.stem for _, _, p in self.keeper.kept]
            tuned = average_states(self.keeper.states())
            what = f"mean of the {self.average} {len(names)} validations ({', '.join(names)})"
        elif self.keeper is not None:
            log.warning(
                "train.average=%s: no validation was kept; using the %s", self.average, what
            )
        final = tuned
        if self.start is not None:
            final = interpolate(self.start, tuned or snapshot(module), self.alpha)
            what += f", then WiSE-FT alpha={self.alpha:g} with the starting weights"
        if final is not None:
            module.load_state_dict(final)
        if self.keeper is None and self.start is None:
            return  # the defaults: the best checkpoint as it is
        log.info("weights after training: %s", what)
        tags: dict[str, Any] = {"weights_after_training": what}
        if names:
            tags["averaging/checkpoints"] = ",".join(names)
        run.set_tags(tags)
        run.log_metrics(
            {"train/wise_alpha": self.alpha, "train/averaged_checkpoints": float(len(names))}
        )
