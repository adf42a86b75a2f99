"""Benchmark: clips/s of lpcvlab's Track 2 training step against a plain PyTorch loop.

Run by hand::

    python benchmarks/bench_train_throughput.py [--videos 96] [--epochs 4] [--repeat 3] \
        [--workers 2] [--model auto] [--devices cpu,cuda]

Both sides train the same model from the same initial weights on the same data in the same
order: uint8 frame sequences like the ones random-clip training caches (128x171, random windows
of 16 frames and random 112 crops drawn by :class:`~lpcvlab.training.module.FrameWindowDataset`
in ``--workers`` DataLoader processes):

* lpcvlab: :class:`~lpcvlab.training.module.VideoClassifierModule` under ``pytorch_lightning``'s
  Trainer with the settings ``train=finetune`` resolves on that device (``precision: auto`` --
  float32 on a CPU, bf16/fp16 mixed precision on a GPU -- and ``channels_last_3d`` on a GPU);
* baseline: the loop of torchvision's video reference ``train_one_epoch`` (forward, loss,
  ``zero_grad``, ``backward``, ``step``) in float32, as that reference runs without ``--amp``.

The first epoch of each run is a warm-up (cuDNN autotuning, worker start-up); the rest are
timed, over ``--repeat`` runs of each side taken in turn, and the best epoch counts. The model
is ``video_tiny`` on a CPU (R(2+1)D-18 is minutes per epoch there) and ``r2plus1d_18`` on a GPU
(``--model`` to choose). On a CPU both sides compute in float32, so their final weights should
match; with mixed precision they cannot be bitwise equal, and the line says by how much they
differ. The last line gives the speed-up per device.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from lpcvlab.models.video import TinyVideoNet, VideoClassifier
from lpcvlab.training.fit import resolve_trainer
from lpcvlab.training.module import (
    ClipDataModule,
    FrameWindowDataset,
    VideoClassifierModule,
)


def make_frames(folder: Path, n: int, length: int, seed: int = 0) -> list[Path]:
    """``n`` cached frame sequences ``(3, length, 128, 171)`` uint8 (noise + a moving block)."""
    rng = np.random.default_rng(seed)
    paths = []
    for v in range(n):
        arr = rng.integers(0, 60, (3, length, 128, 171), dtype=np.uint8)
        for t in range(length):
            x = (t * 5 + v * 11) % 130
            arr[:, t, 40:80, x : x + 40] = np.array([200, 100 + v % 50, 40])[:, None, None]
        path = folder / f"v{v:03d}.npy"
        np.save(path, arr)
        paths.append(path)
    return paths


def build_model(name: str, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "video_tiny":
        return VideoClassifier(TinyVideoNet(classes))
    from torchvision.models import video as tv_video

    model = getattr(tv_video, name)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, classes)
    return VideoClassifier(model)


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        _sync(module.device)
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        _sync(module.device)
        self.seconds.append(time.perf_counter() - self._t0)


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_lpcvlab(
    net: nn.Module, data: ClipDataModule, device: str, epochs: int
) -> tuple[list[float], nn.Module, str]:
    trainer_cfg = resolve_trainer(
        {"accelerator": "gpu" if device == "cuda" else "cpu", "precision": "auto"}
    )
    module = VideoClassifierModule(
        net,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4),
        channels_last=device == "cuda",
    )
    timer = EpochTimer()
    trainer = pl.Trainer(
        **trainer_cfg,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    return timer.seconds, module.net.cpu(), str(trainer.precision)


def run_plain(
    net: nn.Module, data: ClipDataModule, device: str, epochs: int
) -> tuple[list[float], nn.Module]:
    """torchvision's references/video_classification ``train_one_epoch``, without --amp."""
    model = net.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4
    )
    loader = data.train_dataloader()
    seconds = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        _sync(device)
        t0 = time.perf_counter()
        for video, target in loader:
            video = video.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            output = model(video)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds, model.cpu()


def max_weight_difference(a: nn.Module, b: nn.Module) -> float:
    diffs = [
        float((x.float() - y.float()).abs().max())
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        if x.is_floating_point()
    ]
    return max(diffs) if diffs else 0.0


def bench(args: argparse.Namespace, device: str, frames: list[Path]) -> str:
    model_name = args.model
    if model_name == "auto":
        model_name = "r2plus1d_18" if device == "cuda" else "video_tiny"
    labels = [i % args.classes for i in range(len(frames))]
    dataset = FrameWindowDataset(frames, labels, num_frames=16, crop=112, seed=0)
    pin = device == "cuda"

    def data() -> ClipDataModule:
        return ClipDataModule(dataset, dataset, args.batch, args.workers, seed=0, pin_memory=pin)

    start = build_model(model_name, args.classes)
    timed = slice(1, None) if args.epochs > 1 else slice(None)
    t_ours: list[float] = []
    t_base: list[float] = []
    for _ in range(args.repeat):  # alternating, so that a busy moment hits both sides alike
        torch.manual_seed(0)
        seconds, ours, precision = run_lpcvlab(copy.deepcopy(start), data(), device, args.epochs)
        t_ours += seconds[timed]
        torch.manual_seed(0)
        seconds, base = run_plain(copy.deepcopy(start), data(), device, args.epochs)
        t_base += seconds[timed]
    clips = len(dataset)
    rate_ours = clips / min(t_ours)
    rate_base = clips / min(t_base)
    diff = max_weight_difference(ours, base)
    same = "identical" if diff == 0 else f"max |weight difference| {diff:.2e}"
    if precision != "32-true":
        same = f"{precision} vs float32, {same}"
    print(
        f"{device:>4} {model_name}: plain loop {rate_base:7.2f} clips/s | lpcvlab "
        f"({precision}{', channels_last_3d' if device == 'cuda' else ''}) {rate_ours:7.2f} "
        f"clips/s | speed-up {rate_ours / rate_base:5.2f}x | final weights {same}",
        flush=True,
    )
    return f"{device} {rate_ours / rate_base:.2f}x ({same})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--frames", type=int, default=24, help="frames per cached sequence")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4, help="the first is a warm-up")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--model", default="auto", help="auto | video_tiny | r2plus1d_18 | ...")
    ap.add_argument("--devices", default="cpu,cuda", help="those present are measured")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side, alternating")
    args = ap.parse_args()
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    pl.seed_everything(0, workers=True, verbose=False)
    print(
        f"{args.videos} videos of {args.frames} frames (128x171 uint8), batch {args.batch}, "
        f"{args.workers} DataLoader workers, {args.epochs} epochs (first one not timed) x "
        f"{args.repeat}, best epoch; "
        f"torch threads {torch.get_num_threads()}; "
        + (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        frames = make_frames(Path(tmp), args.videos, args.frames)
        results = [bench(args, device, frames) for device in devices]
    if not torch.cuda.is_available():
        results.append("GPU not measured: no CUDA device here")
    print("speed-up of lpcvlab's training step over the plain loop: " + "; ".join(results))


if __name__ == "__main__":
    main()
