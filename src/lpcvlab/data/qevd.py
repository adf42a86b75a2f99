"""QEVD (LPCVC 2026 Track 2): the dataset layout and its reader, as runs use it.

Layout read here (as the official sample's ``refactor_dataset.py`` produces it; ``lpcvlab qevd
organise`` builds it, see :mod:`lpcvlab.data.qevd_tools`)::

    root/{train,val}/<class folder>/<video>.mp4

A class folder is a class-map key (the label with spaces replaced by ``_``, e.g. ``elbow_plank``).
Samples are listed in sorted full-path order, the order of the official ``manifest.jsonl``; note
that ``-`` sorts before ``/``, so ``cross-legged_hamstring_stretch/...`` comes before
``cross/...`` (a per-folder sort would get this wrong). Files in class folders that are not
videos are left out but counted and named (``QevdSplit.non_video_files``); hidden files (and
files in hidden folders) are left out silently.

The official preprocessed set and results files: :mod:`lpcvlab.data.formats`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lpcvlab.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
VIDEO_EXTENSIONS = (".mp4",)
LINK_MODES = ("copy", "hardlink", "symlink")  # how `lpcvlab qevd organise` places the videos


# --------------------------------------------------------------------------- class map


def load_class_map(path: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """``{class folder name: index}``; default: the official 92-class map shipped here.

    Validated: a JSON object of string keys to integer indices that are exactly 0..N-1.
    """
    if path is None:
        source = "lpcvlab/resources/track2_class_map.json"
        text = (
            resources.files("lpcvlab")
            .joinpath("resources/track2_class_map.json")
            .read_text(encoding="utf-8")
        )
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"class map {source} not found") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"class map {source} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"class map {source} must be a non-empty JSON object {{name: index}}")
    out: dict[str, int] = {}
    for name, idx in data.items():
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise DataError(f"class map {source}: index of {name!r} is {idx!r}, not an integer")
        out[name] = idx
    indices = sorted(out.values())
    if indices != list(range(len(out))):
        dup = sorted(i for i, c in Counter(indices).items() if c > 1)
        gaps = sorted(set(range(len(out))) - set(indices))
        raise DataError(
            f"class map {source}: indices must be exactly 0..{len(out) - 1} once each "
            f"(duplicated: {dup[:5]}, missing: {gaps[:5]}, out of range: "
            f"{[i for i in indices if i < 0 or i >= len(out)][:5]})"
        )
    return out


def class_folder_name(label: str) -> str:
    """Label as written in the QEVD JSON (``"elbow plank"``) -> class folder (``elbow_plank``)."""
    return label.strip().replace(" ", "_")


# --------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class VideoSample:
    path: Path
    label: int
    class_name: str


@dataclass
class QevdSplit:
    """One split's videos in sorted full-path order (the official manifest order)."""

    name: str
    root: Path
    samples: list[VideoSample]
    class_map: dict[str, int]
    non_video_files: list[Path] = field(default_factory=list)  # in class folders, not hidden

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


def is_video_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


def _is_hidden(p: Path, below: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(below).parts)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _check_class_folders(root: Path, splits: Sequence[str], class_map: Mapping[str, int]) -> None:
    unknown: list[str] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(
                f"split folder {split_dir} is missing: expected {root}/{{train,val}}/<class>/"
                "<video>.mp4 (run `lpcvlab qevd organise` to build it from the raw QEVD parts)"
            )
        for d in _class_dirs(split_dir):
            if d.name not in class_map:
                unknown.append(str(d))
    if unknown:
        hints = []
        for u in unknown[:5]:
            guess = class_folder_name(Path(u).name)
            if guess in class_map:
                hints.append(f"{Path(u).name!r} -> {guess!r}")
        hint = f" (rename: {', '.join(hints)})" if hints else ""
        raise DataError(
            f"{len(unknown)} class folder(s) are not in the class map: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}{hint}; "
            "fix the folder names or pass the class map they were made with"
        )


def read_split(
    root: str | os.PathLike[str], split: str, class_map: Mapping[str, int] | None = None
) -> QevdSplit:
    """List ``root/<split>/<class>/*.mp4`` with labels; folders are validated before anything.

    Other files under the class folders (not hidden ones) are listed in ``non_video_files``.
    """
    cmap = dict(class_map) if class_map is not None else load_class_map()
    base = Path(root)
    _check_class_folders(base, [split], cmap)
    found: list[tuple[str, Path, str]] = []
    others: list[Path] = []
    for d in _class_dirs(base / split):
        for p in d.rglob("*"):
            if is_video_file(p):
                found.append((str(p), p, d.name))
            elif p.is_file() and not _is_hidden(p, d):
                others.append(p)
    if not found:
        raise DataError(
            f"split {base / split} has no {'/'.join(VIDEO_EXTENSIONS)} videos under its class "
            "folders; check the path or re-run `lpcvlab qevd organise`"
        )
    found.sort(key=lambda t: t[0])
    samples = [VideoSample(path=p, label=cmap[c], class_name=c) for _, p, c in found]
    others.sort(key=str)
    if others:
        log.warning(
            "%d file(s) in the class folders of %s are not %s videos and are ignored: %s",
            len(others),
            base / split,
            "/".join(VIDEO_EXTENSIONS),
            ", ".join(str(p) for p in others[:5]) + (" ..." if len(others) > 5 else ""),
        )
    return QevdSplit(name=split, root=base, samples=samples, class_map=cmap, non_video_files=others)


def read_dataset(
    root: str | os.PathLike[str],
    splits: Sequence[str] = SPLITS,
    class_map: Mapping[str, int] | None = None,
) -> dict[str, QevdSplit]:
    """Every split of ``root``; all class folders of all splits are checked first."""
    cmap = dict(class_map) if class_map is not None else load_class_map()
    _check_class_folders(Path(root), splits, cmap)
    return {s: read_split(root, s, cmap) for s in splits}
