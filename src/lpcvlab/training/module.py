"""The LightningModule and DataModule for fine-tuning a video classifier on decoded clips:
random windows and crops of cached frame sequences (or the official clip), optionally
distilled from a teacher's cached logits."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lpcvlab.data.frames import window_starts
from lpcvlab.metrics import top_k_accuracy
from lpcvlab.training.losses import distillation_loss


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


def _key(key: int | tuple[int, int]) -> tuple[int, int]:
    """(item, epoch) from what the sampler yields: an item, or (item, epoch) from
    :class:`EpochSampler` (how the epoch reaches DataLoader worker processes)."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), 0


def _augment(x: torch.Tensor, rng: np.random.Generator, flip: bool, translate: int) -> torch.Tensor:
    """One flip and one shift for every frame of a clip ``(3, T, H, W)``."""
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    if translate:
        t = translate
        h, w = x.shape[-2:]
        padded = F.pad(x, (t, t, t, t), mode="replicate")
        dy, dx = (int(v) for v in rng.integers(0, 2 * t + 1, size=2))
        x = padded[..., dy : dy + h, dx : dx + w]
    return x


class EpochSampler(Sampler):
    """Shuffles items anew each epoch and yields ``(item, epoch)``, so that a dataset's random
    choices (window, crop, flip) differ between epochs even in DataLoader worker processes and
    stay reproducible: everything is drawn from (seed, epoch, item). Lightning calls
    :meth:`set_epoch` before each epoch (also through its distributed sampler wrapper)."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = int(size), int(seed), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.size)
        else:
            order = np.arange(self.size)
        return iter([(int(i), self.epoch) for i in order])


class ClipDataset(Dataset):
    """Clips ``(3,T,H,W)`` in [0,1] from cached ``.npy`` files (memory-mapped) or arrays: the
    official clip of each video (``train.clip_sampling=first``) and validation.

    Augmentation is frame-consistent: one flip and one shift per clip, applied to every frame,
    drawn from (seed, epoch, item). ``targets`` (teacher logits, one row per clip) come with
    each clip when given.
    """

    def __init__(
        self,
        clips: Sequence[Path | np.ndarray],
        labels: Sequence[int],
        flip: bool = False,
        translate: int = 0,
        seed: int = 0,
        targets: np.ndarray | None = None,
    ) -> None:
        if len(clips) != len(labels):
            raise ValueError(f"{len(clips)} clips but {len(labels)} labels")
        self.clips = list(clips)
        self.labels = list(labels)
        self.flip = flip
        self.translate = translate
        self.seed = seed
        self.targets = targets

    def __len__(self) -> int:
        return len(self.clips)

    def set_targets(self, targets: np.ndarray) -> None:
        """The teacher's logits, one row per clip."""
        if len(targets) != len(self.clips):
            raise ValueError(f"teacher logits for {len(targets)} clips, not {len(self.clips)}")
        self.targets = targets

    def _load(self, i: int) -> np.ndarray:
        item = self.clips[i]
        arr = np.load(item, mmap_mode="r") if isinstance(item, Path | str) else item
        return np.asarray(arr[0] if arr.ndim == 5 else arr, dtype=np.float32)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        i, epoch = _key(key)
        x = torch.from_numpy(self._load(i).copy())
        if self.flip or self.translate:
            rng = np.random.default_rng([self.seed, epoch, i])
            x = _augment(x, rng, self.flip, self.translate)
        if self.targets is not None:
            return x, self.labels[i], torch.from_numpy(self.targets[i])
        return x, self.labels[i]


class FrameWindowDataset(Dataset):
    """Random-clip training as torchvision's video recipe: each video's cached uint8 frame
    sequence ``(3, L, h, w)`` (:func:`~lpcvlab.data.decode.decode_frame_sequence`), a window of
    ``num_frames`` consecutive frames among its candidate windows (starts ``clip_step`` apart,
    torchvision's ``step_between_clips``) and a random ``crop`` square, per video per epoch.

    ``clips_per_video`` items per video: item ``j`` is slot ``j % clips_per_video`` of video
    ``j // clips_per_video``; the slots of one video take distinct windows of one permutation
    (as torchvision's ``RandomClipSampler``) while the video has enough. ``targets[v]`` holds
    the teacher's logits for each candidate window of video ``v`` (distillation), returned with
    the window chosen. A video's length is read from its file's header when first needed (in
    the worker that needs it), so building the dataset opens no file.
    """

    def __init__(
        self,
        frames: Sequence[Path],
        labels: Sequence[int],
        num_frames: int,
        crop: int,
        clips_per_video: int = 1,
        clip_step: int = 1,
        flip: bool = False,
        translate: int = 0,
        seed: int = 0,
        targets: Sequence[np.ndarray] | None = None,
    ) -> None:
        if len(frames) != len(labels):
            raise ValueError(f"{len(frames)} videos but {len(labels)} labels")
        self.frames = [Path(p) for p in frames]
        self.labels = list(labels)
        self.num_frames, self.crop = int(num_frames), int(crop)
        self.clips_per_video, self.clip_step = int(clips_per_video), int(clip_step)
        self.flip, self.translate, self.seed = flip, int(translate), int(seed)
        self._shapes: dict[int, tuple[int, ...]] = {}
        self.targets: list[np.ndarray] | None = None
        if targets is not None:
            self.set_targets(targets)

    def set_targets(self, targets: Sequence[np.ndarray]) -> None:
        """The teacher's logits, one row per candidate window of each video."""
        if len(targets) != len(self.frames):
            raise ValueError(f"teacher logits for {len(targets)} videos, not {len(self.frames)}")
        for v, t in enumerate(targets):
            if len(t) != len(self.windows(v)):
                raise ValueError(
                    f"{self.frames[v]}: {len(t)} teacher rows for {len(self.windows(v))} windows"
                )
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.frames) * self.clips_per_video

    def shape(self, video: int) -> tuple[int, ...]:
        """``(3, L, h, w)`` of a video's frame sequence (its header, read once)."""
        if video not in self._shapes:
            self._shapes[video] = tuple(np.load(self.frames[video], mmap_mode="r").shape)
        return self._shapes[video]

    def windows(self, video: int) -> list[int]:
        """Start frames of a video's candidate windows, ``clip_step`` apart."""
        return window_starts(self.shape(video)[1], self.num_frames, self.clip_step)

    def choose(self, key: int | tuple[int, int]) -> tuple[int, int, int, int]:
        """(video, window number, top, left) of an item in an epoch."""
        j, epoch = _key(key)
        video, slot = divmod(j, self.clips_per_video)
        windows = np.random.default_rng([self.seed, epoch, video]).permutation(
            len(self.windows(video))
        )
        window = int(windows[slot % len(windows)])
        rng = np.random.default_rng([self.seed, epoch, video, slot, 1])
        _, _, h, w = self.shape(video)
        top = int(rng.integers(0, h - self.crop + 1))
        left = int(rng.integers(0, w - self.crop + 1))
        return video, window, top, left

    def clip(self, video: int, window: int, top: int, left: int) -> torch.Tensor:
        """Window ``window`` of ``video`` cropped at (top, left): ``(3, T, crop, crop)`` in
        [0,1]. Window 0 with the centre crop is the official clip (to uint8 precision)."""
        arr = np.load(self.frames[video], mmap_mode="r")
        s = self.windows(video)[window]
        c = self.crop
        x = np.ascontiguousarray(arr[:, s : s + self.num_frames, top : top + c, left : left + c])
        return torch.from_numpy(x).to(torch.float32).div_(255)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        video, window, top, left = self.choose(key)
        x = self.clip(video, window, top, left)
        if self.flip or self.translate:
            j, epoch = _key(key)
            rng = np.random.default_rng([self.seed, epoch, j, 2])
            x = _augment(x, rng, self.flip, self.translate)
        if self.targets is not None:
            return x, self.labels[video], torch.from_numpy(self.targets[video][window])
        return x, self.labels[video]


class ClipDataModule(pl.LightningDataModule):
    """Training items through :class:`EpochSampler` (a new order and new random clips each
    epoch); validation in order. Worker processes stay alive between epochs."""

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed, self.pin_memory = seed, pin_memory

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, EpochSampler(len(self.train_set), self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, None)


class VideoClassifierModule(pl.LightningModule):
    """Cross-entropy fine-tuning; logs ``train/loss``, ``val/loss``, ``val/top1``, ``val/top5``.

    ``net`` takes clips in [0,1] (it carries the normalisation, as the exported model does), so
    training sees exactly what the device will. With ``distill`` (weight, temperature), batches
    carry the teacher's logits and the loss adds ``weight * T^2 * KL(teacher || student)`` at
    temperature ``T`` (``train/ce`` and ``train/kd`` are logged apart). ``channels_last``
    keeps the 3D convolutions' activations in ``channels_last_3d`` (faster on GPUs with
    tensor cores). Several processes (DDP): validation logits are gathered from every rank
    before scoring, so ``val/top1`` is over the whole validation set on every rank.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        distill: tuple[float, float] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.distill = distill
        self.channels_last = channels_last
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.net(x)

    def training_step(self, batch: Sequence[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        n = len(y)
        sync = self._distributed()
        if self.distill is not None:
            weight, temperature = self.distill
            kd = distillation_loss(logits, batch[2], temperature)
            self.log("train/ce", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=sync)
            self.log("train/kd", kd, on_step=False, on_epoch=True, batch_size=n, sync_dist=sync)
            loss = loss + weight * kd
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=n,
            sync_dist=sync,
        )
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], _: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log(
            "val/loss",
            F.cross_entropy(logits.float(), y),
            on_epoch=True,
            batch_size=len(y),
            sync_dist=self._distributed(),
        )
        self._val_logits.append(logits.detach().float())
        self._val_labels.append(y.detach())

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = torch.cat(self._val_logits)
        labels = torch.cat(self._val_labels)
        self._val_logits.clear()
        self._val_labels.clear()
        if self._distributed():  # every rank holds an equal share (the sampler pads)
            logits = self.all_gather(logits).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        logits_np, labels_np = logits.cpu().numpy(), labels.cpu().numpy()
        sync = self._distributed()  # equal on every rank already; says so to Lightning
        self.log("val/top1", top_k_accuracy(logits_np, labels_np, 1), prog_bar=True, sync_dist=sync)
        self.log("val/top5", top_k_accuracy(logits_np, labels_np, 5), sync_dist=sync)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check train.trainable")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}
