"""The LightningModule and DataModule for fine-tuning a video classifier on decoded clips."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lpcvlab.metrics import top_k_accuracy


def set_trainable(model: nn.Module, prefixes: Sequence[str]) -> tuple[int, int]:
    """Freeze every parameter whose name starts with none of ``prefixes`` (empty = train all).

    As in the official sample, only ``requires_grad`` changes; returns (trainable, total) counts.
    """
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad = not prefixes or any(name.startswith(pre) for pre in prefixes)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


class ClipDataset(Dataset):
    """Clips ``(3,T,H,W)`` in [0,1] from cached ``.npy`` files (memory-mapped) or arrays.

    Augmentation is frame-consistent: one flip and one shift per clip, applied to every frame.
    """

    def __init__(
        self,
        clips: Sequence[Path | np.ndarray],
        labels: Sequence[int],
        flip: bool = False,
        translate: int = 0,
        seed: int = 0,
    ) -> None:
        if len(clips) != len(labels):
            raise ValueError(f"{len(clips)} clips but {len(labels)} labels")
        self.clips = list(clips)
        self.labels = list(labels)
        self.flip = flip
        self.translate = translate
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.clips)

    def _load(self, i: int) -> np.ndarray:
        item = self.clips[i]
        arr = np.load(item, mmap_mode="r") if isinstance(item, Path | str) else item
        return np.asarray(arr[0] if arr.ndim == 5 else arr, dtype=np.float32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self._load(i).copy())
        if self.flip or self.translate:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            if self.flip and torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
            if self.translate:
                t = self.translate
                h, w = x.shape[-2:]
                padded = F.pad(x, (t, t, t, t), mode="replicate")
                dy, dx = torch.randint(0, 2 * t + 1, (2,), generator=g).tolist()
                x = padded[..., dy : dy + h, dx : dx + w]
        return x, self.labels[i]


class ClipDataModule(pl.LightningDataModule):
    def __init__(
        self, train: ClipDataset, val: ClipDataset, batch_size: int, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers = batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.train_set.epoch = self.trainer.current_epoch
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class VideoClassifierModule(pl.LightningModule):
    """Cross-entropy fine-tuning; logs ``train/loss``, ``val/loss``, ``val/top1``, ``val/top5``.

    ``net`` takes clips in [0,1] (it carries the normalisation, as the exported model does), so
    training sees exactly what the device will.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self._val_logits.append(logits.detach().cpu())
        self._val_labels.append(y.detach().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits).numpy()
        labels = torch.cat(self._val_labels).numpy()
        self._val_logits.clear()
        self._val_labels.clear()
        self.log("val/top1", top_k_accuracy(logits, labels, 1), prog_bar=True)
        self.log("val/top5", top_k_accuracy(logits, labels, 5))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check train.trainable")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}
