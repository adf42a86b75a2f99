"""Track 1 fine-tuning: a LightningModule around an open_clip model, trained contrastively.

* Loss: symmetric InfoNCE with the model's own logit scale (clamped at 100, as CLIP does) over
  the batch; identical captions in a batch count as positives of each other's images (the demo
  and COCO repeat short captions), so they are not pushed apart. Optional hard negatives
  (:mod:`lpcvlab.training.hard_negatives`) are extra caption columns of the image-to-text side.
* Distillation (optional): ``weight * T^2 * KL(teacher || student)`` between the in-batch
  similarity distributions at temperature ``T``, in both directions (image->text rows and
  text->image columns, averaged), from teacher embeddings computed once
  (:mod:`lpcvlab.training.clip_distill`).
* Validation: every epoch the whole evaluation set is embedded and scored with
  :func:`lpcvlab.metrics.retrieval_recall`, the function the final score uses
  (``val/recall_at_10``, also every ``track.recall_ks`` and ``val/hit_at_10``).
* Optimiser: parameter groups per tower (``train.lr`` for the image tower and the logit scale,
  ``train.lr_text`` for the text tower), no weight decay on gains, biases, embeddings and the
  logit scale; the schedule steps every batch (:func:`warmup_cosine`).

The model sees exactly what the deployed encoders see: images in [0,1] as uploaded (host
mean/std applied by the dataset when the preprocessing asks for it on the host) and the in-graph
mean/std of the export wrapper applied here.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lpcvlab.data.images import ImagePreprocess
from lpcvlab.metrics import retrieval_recall
from lpcvlab.training.hard_negatives import CaptionMiner, HardNegatives, MiningStats
from lpcvlab.training.losses import temperature_kl

_BLOCK = re.compile(r"^(.*?(?:resblocks|blocks)\.\d+)\.")
_PROJECTION = re.compile(r"(^|\.)(proj|text_projection|head)(\.|$)")
_SCALE = ("logit_scale", "logit_bias")
# The input side of a tower (open_clip registers some of it after the blocks).
_INPUT = re.compile(
    r"(^|\.)(token_embedding|positional_embedding|class_embedding|cls_token|pos_embed|"
    r"patch_embed|conv1|stem|ln_pre)(\.|$)"
)


def _tower(name: str) -> str:
    if name in _SCALE:
        return "scale"
    return "image" if name.startswith("visual.") else "text"


def _is_projection(name: str) -> bool:
    """A tower's output projection (``visual.proj``, ``text_projection``, timm's ``head``), not
    a projection inside a block (those have an index in their name)."""
    return _PROJECTION.search(name) is not None and re.search(r"\.\d+\.", name) is None


def trainable_names(model: nn.Module, policy: str, blocks: int = 2) -> set[str]:
    """The parameter names ``train.unfreeze`` leaves trainable.

    ``all``: every one. ``projection``: the towers' output projections and the logit scale.
    ``last_blocks``: in each tower, the last ``blocks`` transformer/conv blocks (names with
    ``resblocks.N`` or ``blocks.N``) and every parameter registered after the first of them
    (final norms, heads), plus the projections and the logit scale; embeddings stay frozen.
    """
    names = [n for n, _ in model.named_parameters()]
    if policy == "all":
        return set(names)
    keep = {n for n in names if n in _SCALE or _is_projection(n)}
    if policy == "projection":
        return keep
    if policy != "last_blocks":
        raise ValueError(f"train.unfreeze={policy!r} is not all, projection or last_blocks")
    for tower in ("image", "text"):
        ordered = [n for n in names if _tower(n) == tower]
        block_ids: list[str] = []
        for n in ordered:
            m = _BLOCK.match(n)
            if m and m.group(1) not in block_ids:
                block_ids.append(m.group(1))
        if not block_ids:
            continue
        first = block_ids[-min(blocks, len(block_ids))]
        start = next(i for i, n in enumerate(ordered) if n.startswith(first + "."))
        keep.update(n for n in ordered[start:] if not _INPUT.search(n))
    return keep


def set_unfreeze(model: nn.Module, policy: str, blocks: int = 2) -> tuple[int, int]:
    """Apply ``train.unfreeze``; returns (trainable, total) parameter counts."""
    keep = trainable_names(model, policy, blocks)
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad = name in keep
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.1, min_lr: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first ``warmup`` share of the steps, then cosine decay to
    ``min_lr`` times each group's learning rate (stepped every batch)."""
    # Not SequentialLR(LinearLR, CosineAnnealingLR): its eta_min is one absolute floor for every
    # group (train.lr_text's would end at the other's floor) and its recursive form is ~3e-19 off.
    total = max(1, int(total_steps))
    ramp = max(1, int(round(warmup * total)))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        progress = min(1.0, (step - ramp) / max(1, total - ramp))
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class CaptionDataset(Dataset):
    """Training pairs: each image once per epoch with one of its captions (drawn per epoch from
    the seed), its pixels from the uint8 cache, scaled as the host uploads them, and, with hard
    negatives, a perturbed copy of that caption."""

    def __init__(
        self,
        pixels: np.ndarray,
        captions: Sequence[str],
        offsets: np.ndarray,
        tokenizer: Any,
        preprocess: ImagePreprocess,
        seed: int = 0,
        hard_negatives: HardNegatives | None = None,
    ) -> None:
        if len(offsets) != len(pixels) + 1:
            raise ValueError(f"{len(pixels)} images but {len(offsets) - 1} caption ranges")
        self.pixels = pixels
        self.captions = list(captions)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.seed = seed
        self.hard_negatives = hard_negatives
        self.epoch = 0
        self.mined: list[list[int]] | None = None  # per image, from CaptionMiner
        self._all_tokens: torch.Tensor | None = None

    def mine(self, module: ContrastiveModule, miner: CaptionMiner) -> MiningStats:
        """Replace each image's mined negatives with what ``module`` confuses now."""
        if self._all_tokens is None:
            self._all_tokens = torch.as_tensor(
                np.asarray(self.tokenizer(self.captions)), dtype=torch.long
            )
        device = module.device
        similarity = miner.embed(
            lambda x: module.encode_image(x.to(device)),
            lambda t: module.encode_text(t.to(device)),
            lambda a, b: self.preprocess.scale(np.asarray(self.pixels[a:b])),
            len(self.pixels),
            self._all_tokens,
        )
        mined, stats = miner.mine(similarity, self.offsets, self.captions)
        # a tensor that is no list of lists pickles poorly into workers: plain lists
        self.mined = mined
        return stats

    def __len__(self) -> int:
        return len(self.pixels)

    def __getstate__(self) -> dict[str, Any]:
        """For DataLoader workers started with spawn: the cache file's name, not its bytes."""
        state = self.__dict__.copy()
        filename = getattr(self.pixels, "filename", None)
        if isinstance(self.pixels, np.memmap) and filename:
            state["pixels"] = (str(filename), len(self.pixels))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["pixels"], tuple):
            filename, n = state["pixels"]
            state["pixels"] = np.load(filename, mmap_mode="r")[:n]
        self.__dict__.update(state)

    def _tokens(self, text: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.tokenizer([text]))[0], dtype=torch.long)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        c = lo + rng.randrange(hi - lo)
        caption = self.captions[c]
        tokens = self._tokens(caption)
        item = {
            "image": torch.from_numpy(self.preprocess.scale(self.pixels[i])),
            "text": tokens,
            "image_index": i,
            "caption_index": c,
        }
        if self.mined is not None:  # train.hard_negatives.kind=mined
            options = self.mined[i]
            negative = self.captions[options[rng.randrange(len(options))]] if options else None
            item["has_negative"] = negative is not None
            item["negative"] = self._tokens(negative) if negative else torch.zeros_like(tokens)
        elif self.hard_negatives is not None:
            negative = self.hard_negatives.perturb(caption, rng)
            item["has_negative"] = negative is not None
            item["negative"] = self._tokens(negative) if negative else torch.zeros_like(tokens)
        return item


class RetrievalDataModule(pl.LightningDataModule):
    """Training pairs, and the whole evaluation set (its images and its captions, two loaders)
    for validation."""

    def __init__(
        self,
        train: CaptionDataset,
        val_images: np.ndarray,
        val_texts: np.ndarray,
        batch_size: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_set = train
        self.val_images = torch.from_numpy(np.ascontiguousarray(val_images, dtype=np.float32))
        self.val_texts = torch.from_numpy(np.ascontiguousarray(val_texts, dtype=np.int64))
        self.batch_size, self.num_workers = batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            self.train_set.epoch = self.trainer.current_epoch
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            # A last batch of one pair has no negative to learn from.
            drop_last=len(self.train_set) > self.batch_size,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(TensorDataset(self.val_images), batch_size=self.batch_size),
            DataLoader(TensorDataset(self.val_texts), batch_size=self.batch_size),
        ]


@dataclass
class DistillTargets:
    """The teacher's L2-normalised embeddings of every training image and caption, and its
    logit scale: what the student's in-batch similarities are distilled towards."""

    image: torch.Tensor  # (n_images, D)
    text: torch.Tensor  # (n_captions, D)
    logit_scale: float
    weight: float
    temperature: float


@dataclass
class Validation:
    """The evaluation set's ground truth, as :func:`lpcvlab.metrics.recall_at_k` takes it."""

    text_ids: list[int]
    ground_truth: list[tuple[int, ...]]
    ks: list[int]


class ContrastiveModule(pl.LightningModule):
    """Contrastive fine-tuning of an open_clip model; logs ``train/loss`` (and its parts),
    ``train/logit_scale``, ``train/hard_negatives`` and ``val/recall_at_<k>``, ``val/hit_at_10``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        validation: Validation,
        scheduler: Callable[..., Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        lr_text: float | None = None,
        weight_decay_exclude_1d: bool = True,
        distill: DistillTargets | None = None,
    ) -> None:
        super().__init__()
        self.model = model  # checkpoint keys start with "model." (models.clip.CHECKPOINT_PREFIX)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.validation = validation
        self.lr_text = lr_text
        self.exclude_1d = weight_decay_exclude_1d
        self.distill = distill
        self.normalize = mean is not None
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._val: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        # train.hard_negatives.kind=mined: called before each epoch (CaptionDataset.mine)
        self.miner: Callable[[ContrastiveModule], MiningStats] | None = None

    def on_train_epoch_start(self) -> None:
        if self.miner is None:
            return
        was = self.training
        self.eval()
        stats = self.miner(self)
        self.train(was)
        self.log_dict(
            {
                "train/mined_negatives": float(stats.mined),
                "train/mined_confused_images": float(stats.confused),
                "train/mined_train_hit_at_10": stats.hit_at_10,
            },
            on_step=False,
            on_epoch=True,
        )

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            image = (image - self.mean) / self.std
        return self.model.encode_image(image)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        tokens = batch["text"]
        n = len(tokens)
        img = F.normalize(self.encode_image(batch["image"]), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        scale = self.model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T
        # Identical captions are positives of each other's images.
        same = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1).float()
        targets = same / same.sum(dim=1, keepdim=True)
        image_logits, image_targets = logits, targets
        made = 0
        if "negative" in batch:
            has = batch["has_negative"].bool()
            made = int(has.sum())
            if made:
                negatives = batch["negative"][has]
                neg = F.normalize(self.encode_text(negatives), dim=-1)
                extra = scale * img @ neg.T
                # A negative that is another image's own caption is no negative for it.
                clash = (tokens[:, None, :] == negatives[None, :, :]).all(dim=-1)
                extra = extra.masked_fill(clash, -1.0e4)
                image_logits = torch.cat([logits, extra], dim=1)
                image_targets = torch.cat([targets, torch.zeros_like(extra)], dim=1)
        # Cross-entropy against probability targets (a caption shared by several images).
        loss_i2t = F.cross_entropy(image_logits.float(), image_targets)
        loss_t2i = F.cross_entropy(logits.T.float(), targets)  # `same` is symmetric
        contrastive = (loss_i2t + loss_t2i) / 2
        loss = contrastive
        log = {"train/loss_contrastive": contrastive, "train/logit_scale": scale}
        if self.distill is not None:
            d = self.distill
            t_img = d.image[batch["image_index"].cpu()].to(img.device)
            t_txt = d.text[batch["caption_index"].cpu()].to(img.device)
            teacher = d.logit_scale * t_img @ t_txt.T
            kl = temperature_kl(logits, teacher, d.temperature) + temperature_kl(
                logits.T, teacher.T, d.temperature
            )
            distill = kl / 2 * d.temperature**2
            loss = loss + d.weight * distill
            log["train/loss_distill"] = distill
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict(log, on_step=False, on_epoch=True, batch_size=n)
        if "negative" in batch:
            self.log(
                "train/hard_negatives",
                float(made),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                batch_size=n,
            )
        return loss

    def validation_step(
        self, batch: Sequence[torch.Tensor], _: int, dataloader_idx: int = 0
    ) -> None:
        (x,) = batch
        emb = self.encode_image(x) if dataloader_idx == 0 else self.encode_text(x)
        self._val[dataloader_idx].append(emb.detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        images, texts = self._val[0], self._val[1]
        self._val = {0: [], 1: []}
        if self.trainer.sanity_checking or not images or not texts:
            return  # the sanity check sees a few batches, not the whole set
        v = self.validation
        res = retrieval_recall(
            torch.cat(images).numpy(), torch.cat(texts).numpy(), v.text_ids, v.ground_truth, v.ks
        )
        for k, value in res.recall.items():
            self.log(f"val/recall_at_{k}", value, prog_bar=k == 10)
        self.log("val/hit_at_10", res.hit_at_10)

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters by tower and weight decay (1-D gains/biases, embeddings and the
        logit scale get none); the text tower's groups carry ``lr_text`` when it is set."""
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            tower = _tower(name)
            no_decay = self.exclude_1d and (
                p.ndim < 2 or tower == "scale" or "embedding" in name or name.endswith("_token")
            )
            groups.setdefault((tower, no_decay), []).append(p)
        out = []
        for (tower, no_decay), params in sorted(groups.items()):
            group: dict[str, Any] = {"params": params, "name": f"{tower}{'/no_decay' * no_decay}"}
            if no_decay:
                group["weight_decay"] = 0.0
            if tower == "text" and self.lr_text is not None:
                group["lr"] = self.lr_text
            out.append(group)
        return out

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        if not groups:
            raise ValueError("no trainable parameters: check train.unfreeze")
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        return {
            "optimizer": opt,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(opt, total_steps=total),
                "interval": "step",
            },
        }
