"""Hard negatives for contrastive training: a caption with one word swapped for another of its
group ("on the left" -> "on the right", "a red car" -> "a blue car"), added as an extra caption
that no image in the batch should match.

The best public 2026 Track 1 entry made its negatives by swapping spatial words; the groups are
configurable (``train.hard_negatives.word_groups``): a pair swaps with itself, a longer list (the
colours, the counts) replaces a word by another member. When a caption holds two different words
of the chosen group ("the left dog and the right cat") they trade places instead.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class HardNegatives:
    """Makes perturbed captions from word groups (matched as whole words, any case)."""

    def __init__(self, word_groups: Sequence[Sequence[str]]) -> None:
        self.groups = [[w.lower() for w in g] for g in word_groups if len(g) >= 2]
        self.group_of: dict[str, int] = {}
        for i, group in enumerate(self.groups):
            for word in group:
                self.group_of.setdefault(word, i)
        words = sorted(self.group_of, key=len, reverse=True)
        self.pattern = (
            re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
            if words
            else None
        )

    def can_perturb(self, caption: str) -> bool:
        """Whether ``caption`` holds a word of some group."""
        return self.pattern is not None and self.pattern.search(caption) is not None

    def perturb(self, caption: str, rng: random.Random) -> str | None:
        """A caption that differs from ``caption`` in one group's words, or None when it has no
        word of any group."""
        if self.pattern is None:
            return None
        found = list(self.pattern.finditer(caption))
        if not found:
            return None
        groups = sorted({self.group_of[m.group(0).lower()] for m in found})
        g = groups[rng.randrange(len(groups))]
        present = []
        for m in found:
            word = m.group(0).lower()
            if self.group_of[word] == g and word not in present:
                present.append(word)
        if len(present) >= 2:  # two different words of the group: they trade places
            a, b = present[0], present[1]
            mapping = {a: b, b: a}
        else:
            others = [w for w in self.groups[g] if w != present[0]]
            mapping = {present[0]: others[rng.randrange(len(others))]}

        def swap(m: re.Match[str]) -> str:
            word = m.group(0)
            new = mapping.get(word.lower())
            if new is None:
                return word
            return new.capitalize() if word[:1].isupper() else new

        out = self.pattern.sub(swap, caption)
        return out if out != caption else None


@dataclass
class MiningStats:
    """One mining pass over the training split."""

    mined: int  # negatives stored (images x per image)
    confused: int  # images whose most similar caption of another image beats their own best
    hit_at_10: float  # images with one of their own captions among their 10 most similar


class CaptionMiner:
    """``train.hard_negatives.kind=mined``: before each epoch, embed the training split with the
    current model and keep, for each image, the ``per_image`` captions of other images it finds
    most similar (captions equal to one of its own excluded); the dataset draws its negative
    from them. The pass also measures how often the model confuses them (``hit_at_10`` on the
    training split), so the gain over the epochs is logged with the count."""

    def __init__(self, per_image: int = 3, batch_size: int = 64) -> None:
        self.per_image = int(per_image)
        self.batch_size = int(batch_size)
        self.history: list[MiningStats] = []

    def embed(
        self,
        encode_image: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[torch.Tensor], torch.Tensor],
        images: Callable[[int, int], np.ndarray],
        n_images: int,
        tokens: torch.Tensor,
    ) -> torch.Tensor:
        """The (images x captions) cosine similarity under the current model."""
        b = self.batch_size
        with torch.no_grad():
            img = torch.cat(
                [
                    F.normalize(
                        encode_image(torch.from_numpy(images(i, min(i + b, n_images)))), dim=-1
                    )
                    for i in range(0, n_images, b)
                ]
            )
            txt = torch.cat(
                [
                    F.normalize(encode_text(tokens[i : i + b]), dim=-1)
                    for i in range(0, len(tokens), b)
                ]
            )
        return (img.float() @ txt.float().T).cpu()

    def mine(
        self, similarity: torch.Tensor, offsets: np.ndarray, captions: Sequence[str]
    ) -> tuple[list[list[int]], MiningStats]:
        """The confusing captions of each image (indices into ``captions``) and the pass's
        statistics."""
        sim = similarity.clone()
        n_img, n_cap = sim.shape
        text_index: dict[str, list[int]] = {}
        for c, text in enumerate(captions):
            text_index.setdefault(text, []).append(c)
        own = torch.zeros_like(sim, dtype=torch.bool)
        for i in range(n_img):
            for c in range(int(offsets[i]), int(offsets[i + 1])):
                own[i, text_index[captions[c]]] = True  # an equal caption is no negative
        best_own = sim.masked_fill(~own, -2.0).max(dim=1).values
        top10 = sim.topk(min(10, n_cap), dim=1).indices
        hit = own.gather(1, top10).any(dim=1).float().mean().item()
        others = sim.masked_fill(own, -2.0)
        k = min(self.per_image, max(n_cap - 1, 1))
        values, indices = others.topk(k, dim=1)
        mined = [
            [int(c) for c, v in zip(row, vals, strict=True) if v > -2.0]
            for row, vals in zip(indices.tolist(), values.tolist(), strict=True)
        ]
        stats = MiningStats(
            mined=sum(len(m) for m in mined),
            confused=int((values[:, 0] > best_own).sum()),
            hit_at_10=float(hit),
        )
        self.history.append(stats)
        return mined, stats
