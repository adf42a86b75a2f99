"""The records the Track 1 readers share: a skipped file or row, and a training split of
captioned images. Their own module, so the official-layout reader (``track1``) and the COCO
reader (``coco``) both import them and neither imports the other's internals."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Skip:
    """A file or row left out of a split, and why (reported, never dropped silently)."""

    file: str
    row: int | None
    reason: str


@dataclass(frozen=True)
class CaptionImage:
    """One training image and its captions (one or more)."""

    name: str
    path: Path
    captions: tuple[str, ...]
    row: int  # CSV line (official layout) or index in the JSON ``images`` list (COCO)
    where: str  # the row or entry, for messages ("row 12 of img_list.csv", "images[3] of ...")


@dataclass
class CaptionSplit:
    """A training split as read: its images in file order, what was skipped, and the metadata
    files (relative to ``root``) that belong to its content hash."""

    root: Path
    images: list[CaptionImage]
    skipped: list[Skip] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict[str, float]:
        return {
            "images": len(self.images),
            "captions": sum(len(i.captions) for i in self.images),
            "skipped_images": len(self.skipped),
            **self.counts,
        }
