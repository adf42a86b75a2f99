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
from collections.abc import Sequence


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
