"""Terminal output: stage headers and the closing results table."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence


def stage(name: str, detail: str = "") -> None:
    print(f"==> {name}" + (f": {detail}" if detail else ""), file=sys.stderr, flush=True)


def fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def is_terminal() -> bool:
    """Whether progress goes to a terminal (a log file gets periodic lines instead of bars)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


# Third-party lines with nothing for the user: Lightning's accelerator inventory on a machine
# that has none of them, its advertisement, its step-count notice; a deprecation warning raised
# inside Lightning (nothing the user can change); MLflow's store set-up and system-metrics
# sampler chatter. Real warnings (anything else) still show.
_NOISE_PREFIXES = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "IPU available:",
    "💡 Tip:",
    "Loading `train_dataloader` to estimate number of stepping batches",
)
_NOISE_LOGGERS_INFO = (
    "mlflow.system_metrics.system_metrics_monitor",
    "mlflow.store.db.utils",
    "mlflow.utils.autologging_utils",
)
_LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
_NOISE_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropNoise:
    """A logging filter dropping the records above, whatever their level."""

    def filter(self, record: object) -> bool:
        import logging

        assert isinstance(record, logging.LogRecord)
        message = record.getMessage()
        return not message.startswith(_NOISE_PREFIXES) and "litlogger" not in message


def filter_noise() -> None:
    """Silence the third-party lines listed above (idempotent)."""
    import logging
    import warnings

    for name in _NOISE_LOGGERS_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def plain_progress() -> None:
    """Off a terminal, tqdm's bars (decode, infer, calibration) are turned off through tqdm's
    own ``TQDM_DISABLE`` default: in a log file they are one long line of carriage returns; each
    stage still prints its ``==>`` line, and training prints :func:`training_progress` lines."""
    import os

    if is_terminal():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported
    if "tqdm.std" not in sys.modules or os.environ["TQDM_DISABLE"] != "1":
        return
    # Imported already (MLflow imports it): make disable=True the default of the class itself.
    from tqdm import std

    if getattr(std.tqdm.__init__, "_lpcvlab_plain", False):
        return
    original = std.tqdm.__init__

    def __init__(self: object, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("disable", True)
        original(self, *args, **kwargs)

    __init__._lpcvlab_plain = True  # type: ignore[attr-defined]
    std.tqdm.__init__ = __init__  # type: ignore[method-assign]


def training_progress(every_s: float = 30.0) -> list[object]:
    """Lightning callbacks for a run whose output is not a terminal: a line at each epoch's end
    (epoch, logged metrics, time) and one every ``every_s`` seconds within a long epoch, in
    place of the progress bar (the Trainer gets ``enable_progress_bar=False``). Empty on a
    terminal, where the bar stays."""
    if is_terminal():
        return []
    import time

    import pytorch_lightning as pl

    class EpochLines(pl.Callback):
        def __init__(self) -> None:
            self.start = self.last = time.monotonic()

        def _line(self, trainer: pl.Trainer, what: str) -> None:
            metrics = {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith(("train/loss", "val/")) and getattr(v, "numel", lambda: 1)() == 1
            }
            shown = " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            elapsed = time.monotonic() - self.start
            print(f"    {what} {shown} ({elapsed:.0f} s)".rstrip(), file=sys.stderr, flush=True)
            self.last = time.monotonic()

        def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
            if time.monotonic() - self.last >= every_s:
                total = trainer.num_training_batches
                self._line(
                    trainer,
                    f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: batch "
                    f"{args[-1] + 1 if isinstance(args[-1], int) else '?'}/{total}",
                )

        def on_train_epoch_end(self, trainer: pl.Trainer, module: object) -> None:
            self._line(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}:")

    return [EpochLines()]


def trainer_progress_kwargs() -> dict[str, bool]:
    """What the Trainer is given beside :func:`training_progress`: no bar off a terminal."""
    return {} if is_terminal() else {"enable_progress_bar": False}
