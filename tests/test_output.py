"""Quiet, readable output: third-party noise filtered (real warnings kept), progress as lines
in a log file, and `python run.py --help` as lpcvlab's own help."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
from lpcvlab_runs import REPO

from lpcvlab.util import console


def test_help_is_lpcvlabs_own_and_lists_every_option_of_each_group():
    proc = subprocess.run(
        [sys.executable, "run.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("lpcvlab:") and "schema/" not in out and "Powered by Hydra" not in out
    assert "python run.py backbone=clip_tiny" in out and "lpcvlab reproduce" in out
    # group=  a | b | c, continued on lines starting with "|"
    listed: dict[str, set[str]] = {}
    group = None
    for line in out.splitlines():
        m = re.match(r"^  ([\w/]+)=\s+(.*)$", line)
        if m:
            group = m.group(1)
            listed[group] = set()
            rest = m.group(2)
        elif group and re.match(r"^\s+\|", line):
            rest = line
        else:
            group = None
            continue
        listed[group] |= {o.strip() for o in rest.split("|") if o.strip()}
    for name in listed:
        if name == "hydra/launcher":
            continue
        options = {p.stem for p in (REPO / "conf" / name).glob("*.yaml")}
        assert listed[name] == options, name
    assert {"track", "backbone", "data", "train", "precision", "hub", "experiment"} <= set(listed)
    assert "slurm" in listed["hydra/launcher"]


def test_third_party_noise_is_dropped_and_real_warnings_kept(caplog):
    console.filter_noise()
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("TPU available: False, using: 0 TPU cores")
        rank_zero.info("💡 Tip: For seamless cloud logging, try installing [litlogger](...)")
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").info("Started monitoring")
        rank_zero.warning("The dataloader does not have many workers")
        rank_zero.info("`Trainer.fit` stopped: `max_epochs=8` reached.")
    text = caplog.text
    assert "GPU available" not in text and "TPU" not in text and "litlogger" not in text
    assert "Started monitoring" not in text
    assert "does not have many workers" in text and "max_epochs=8" in text
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.filter_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", stacklevel=1)
        warnings.warn("a real deprecation", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real deprecation"]


def test_training_progress_is_lines_off_a_terminal(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(console, "is_terminal", lambda: True)
    assert console.training_progress() == [] and console.trainer_progress_kwargs() == {}
    monkeypatch.setattr(console, "is_terminal", lambda: False)
    assert console.trainer_progress_kwargs() == {"enable_progress_bar": False}
    (lines,) = console.training_progress(every_s=0.0)
    trainer = SimpleNamespace(
        callback_metrics={"train/loss": torch.tensor(1.5), "val/recall_at_10": torch.tensor(0.5)},
        current_epoch=2,
        max_epochs=8,
        num_training_batches=13,
    )
    lines.on_train_batch_end(trainer, None, None, None, 4)
    lines.on_train_epoch_end(trainer, None)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("    epoch 3/8: batch 5/13 train/loss 1.5000 val/recall_at_10 0.5000")
    assert err[1].startswith("    epoch 3/8: train/loss 1.5000 val/recall_at_10 0.5000 (")
    assert "\r" not in "".join(err)


def test_bars_are_off_in_a_log_file(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(console, "is_terminal", lambda: False)
    from tqdm import std

    original = std.tqdm.__init__
    try:
        console.plain_progress()
        import os

        assert os.environ["TQDM_DISABLE"] == "1"
        assert std.tqdm(range(3)).disable  # imported before: the class default changed too
        assert not std.tqdm(range(3), disable=False).disable  # an explicit choice still wins
    finally:
        std.tqdm.__init__ = original
