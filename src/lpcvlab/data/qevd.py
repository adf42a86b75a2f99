"""QEVD (LPCVC 2026 Track 2): dataset layout, organiser, checker and the official file formats.

Layout read and written here (as the official sample's ``refactor_dataset.py`` produces it)::

    root/{train,val}/<class folder>/<video>.mp4

A class folder is a class-map key (the label with spaces replaced by ``_``, e.g. ``elbow_plank``).
Samples are listed in sorted full-path order, the order of the official ``manifest.jsonl``; note
that ``-`` sorts before ``/``, so ``cross-legged_hamstring_stretch/...`` comes before
``cross/...`` (a per-folder sort would get this wrong).

Labels JSON for :func:`organise`: the QEVD release's ``fine_grained_labels_release.json``, as the
official sample reads it — a JSON list of objects::

    [{"video_path": "./00000000.mp4", "label": "elbow plank", "split": "train"}, ...]

``video_path`` is matched by file name against the ``*.mp4`` files found under the raw parts
(``QEVD-FIT-300k-Part-1`` ...); ``file`` and ``class`` are accepted as aliases of
``video_path`` and ``label``. ``split`` may be omitted when ``val_fraction`` is given (then
every entry is re-split, stratified per class, reproducibly from ``seed``). Entries whose split
is not ``train``/``val`` are counted and left out.

Official files: preprocessed tensors are one ``.npy`` per video, ``(1, 3, 16, 112, 112)``
float32, at ``out_dir/<class>/<video stem>.npy``, listed in ``out_dir/manifest.jsonl`` with the
keys ``video_path``, ``label`` (the class folder name, which the organisers' ``evaluate.py`` maps
through ``class_map.json``), ``tensor_path``, ``shape``, ``dtype`` (``"torch.float32"``, as the
official ``preprocess_and_save.py`` writes it). Results are HDF5 with group ``data/0`` holding
``batch_0 .. batch_{N-1}``, each ``(1, num_classes)`` logits, in manifest order.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from lpcvlab.data.video import (
    WORKER_CRASHED,
    SkippedVideo,
    VideoDecodeError,
    VideoPreprocess,
    decode_videos,
    parallel_map,
    verify_video,
)
from lpcvlab.errors import ConfigError, DataError

SPLITS = ("train", "val")
VIDEO_EXTENSIONS = (".mp4",)
MANIFEST_KEYS = ("video_path", "label", "tensor_path", "shape", "dtype")
MANIFEST_DTYPE = "torch.float32"
RESULTS_GROUP = "data/0"
LINK_MODES = ("copy", "hardlink", "symlink")

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.class_name for s in self.samples).items()))


def _is_video(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")


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
    """List ``root/<split>/<class>/*.mp4`` with labels; folders are validated before anything."""
    cmap = dict(class_map) if class_map is not None else load_class_map()
    base = Path(root)
    _check_class_folders(base, [split], cmap)
    found: list[tuple[str, Path, str]] = []
    for d in _class_dirs(base / split):
        for p in d.rglob("*"):
            if _is_video(p):
                found.append((str(p), p, d.name))
    if not found:
        raise DataError(
            f"split {base / split} has no {'/'.join(VIDEO_EXTENSIONS)} videos under its class "
            "folders; check the path or re-run `lpcvlab qevd organise`"
        )
    found.sort(key=lambda t: t[0])
    samples = [VideoSample(path=p, label=cmap[c], class_name=c) for _, p, c in found]
    return QevdSplit(name=split, root=base, samples=samples, class_map=cmap)


def read_dataset(
    root: str | os.PathLike[str],
    splits: Sequence[str] = SPLITS,
    class_map: Mapping[str, int] | None = None,
) -> dict[str, QevdSplit]:
    """Every split of ``root``; all class folders of all splits are checked first."""
    cmap = dict(class_map) if class_map is not None else load_class_map()
    _check_class_folders(Path(root), splits, cmap)
    return {s: read_split(root, s, cmap) for s in splits}


# --------------------------------------------------------------------------- organise


@dataclass
class OrganiseResult:
    out_root: Path
    counts: dict[str, int]  # split -> videos now in the layout (written or already there)
    written: int
    already_present: int
    missing: list[str]  # label entries whose video is in no raw part (allow_missing=True)
    ignored_splits: dict[str, int]  # split value -> entries left out
    mode: str


@dataclass(frozen=True)
class _Entry:
    name: str  # video file name
    folder: str  # class folder
    split: str | None


def _read_label_entries(labels_json: Path) -> list[_Entry]:
    try:
        data = json.loads(labels_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"labels file {labels_json} not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"labels file {labels_json} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(
            f"labels file {labels_json} must be a JSON list of "
            '{"video_path": ..., "label": ..., "split": ...} objects'
        )
    entries = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{labels_json}: entry {i} is not an object")
        video = item.get("video_path", item.get("file"))
        label = item.get("label", item.get("class"))
        split = item.get("split")
        if not isinstance(video, str) or not video.strip():
            raise DataError(f"{labels_json}: entry {i} has no 'video_path' string")
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"{labels_json}: entry {i} ({video}) has no 'label' string")
        if split is not None and (not isinstance(split, str) or not _SPLIT_NAME.match(split)):
            raise DataError(f"{labels_json}: entry {i} ({video}) has an invalid split {split!r}")
        entries.append(_Entry(Path(video).name, class_folder_name(label), split))
    if not entries:
        raise DataError(f"labels file {labels_json} has no entries")
    return entries


def _index_raw_parts(raw_parts: Sequence[Path]) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for part in raw_parts:
        if not part.is_dir():
            raise DataError(f"raw QEVD part {part} is not a folder")
        for p in part.rglob("*"):
            if _is_video(p):
                index.setdefault(p.name, []).append(p)
    return index


def _assign_val(entries: list[_Entry], val_fraction: float, seed: int) -> list[_Entry]:
    by_class: dict[str, list[_Entry]] = {}
    for e in entries:
        by_class.setdefault(e.folder, []).append(e)
    out = []
    for folder in sorted(by_class):
        group = sorted(by_class[folder], key=lambda e: e.name)
        random.Random(f"{seed}:{folder}").shuffle(group)
        n_val = round(len(group) * val_fraction)
        for j, e in enumerate(group):
            out.append(_Entry(e.name, e.folder, "val" if j < n_val else "train"))
    return out


def _place(src: Path, dest: Path, mode: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if mode == "copy":
            shutil.copy2(src, tmp)
        elif mode == "hardlink":
            try:
                os.link(src, tmp)
            except OSError as e:
                raise DataError(
                    f"cannot hardlink {src} into {dest.parent} ({e}); use mode 'copy' or "
                    "'symlink' across file systems"
                ) from None
        else:
            os.symlink(src.resolve(), tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def organise(
    raw_parts: Sequence[str | os.PathLike[str]],
    labels_json: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    *,
    val_fraction: float | None = None,
    seed: int = 0,
    mode: str = "copy",
    allow_missing: bool = False,
    class_map: Mapping[str, int] | None = None,
    progress: bool = True,
) -> OrganiseResult:
    """Build ``out_root/{train,val}/<class>/<video>.mp4`` from raw QEVD parts + the labels JSON.

    Originals are never moved or deleted (``mode``: copy, hardlink or symlink). Everything is
    validated before the first file is placed: unknown labels, videos found in no part (an
    error unless ``allow_missing``), a file name present in two parts, conflicting entries.
    Idempotent: a destination that already exists with the same size is left alone.
    """
    if mode not in LINK_MODES:
        raise ConfigError(f"mode={mode!r} must be one of {', '.join(LINK_MODES)}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    cmap = dict(class_map) if class_map is not None else load_class_map()
    labels_path = Path(labels_json)
    out = Path(out_root)
    entries = _read_label_entries(labels_path)

    unknown = Counter(e.folder for e in entries if e.folder not in cmap)
    if unknown:
        listed = ", ".join(f"{k!r} ({v})" for k, v in sorted(unknown.items())[:10])
        raise DataError(
            f"{labels_path}: {sum(unknown.values())} entries have labels that are not in the class "
            f"map: {listed}; pass the class map these labels belong to"
        )
    if val_fraction is not None:
        entries = _assign_val(entries, val_fraction, seed)
    else:
        no_split = [e.name for e in entries if e.split is None]
        if no_split:
            raise DataError(
                f"{labels_path}: {len(no_split)} entries have no 'split' (e.g. {no_split[0]}); "
                "give val_fraction (--val-fraction) to split them"
            )

    by_name: dict[str, _Entry] = {}
    for e in entries:
        prev = by_name.get(e.name)
        if prev is not None and prev != e:
            raise DataError(
                f"{labels_path}: video {e.name} is listed twice with different labels/splits "
                f"({prev.folder}/{prev.split} and {e.folder}/{e.split})"
            )
        by_name[e.name] = e
    ignored = Counter(e.split for e in by_name.values() if e.split not in SPLITS)
    wanted = [e for e in by_name.values() if e.split in SPLITS]

    index = _index_raw_parts([Path(p) for p in raw_parts])
    plan: list[tuple[Path, Path]] = []
    missing: list[str] = []
    for e in sorted(wanted, key=lambda e: (e.split, e.folder, e.name)):
        found = index.get(e.name, [])
        if not found:
            missing.append(e.name)
            continue
        if len(found) > 1:
            raise DataError(
                f"video {e.name} is in more than one raw part ({found[0]}, {found[1]}); "
                "remove the duplicate part or pass only one of them"
            )
        assert e.split is not None
        plan.append((found[0], out / e.split / e.folder / e.name))
    if missing and not allow_missing:
        raise DataError(
            f"{len(missing)} of {len(wanted)} videos in {labels_path} are in none of the raw parts "
            f"(e.g. {', '.join(missing[:3])}); pass every downloaded part, or allow_missing "
            "(--allow-missing) to organise the videos that are there"
        )
    for src, dest in plan:
        if dest.exists() and dest.stat().st_size != src.stat().st_size:
            raise DataError(
                f"{dest} already exists with different content than {src}; organise into an "
                "empty folder"
            )

    written = present = 0
    for src, dest in tqdm(plan, desc="organise", unit="video", disable=not progress, leave=False):
        if dest.exists():
            present += 1
            continue
        _place(src, dest, mode)
        written += 1
    counts = Counter(dest.relative_to(out).parts[0] for _, dest in plan)
    return OrganiseResult(
        out_root=out,
        counts={s: counts.get(s, 0) for s in SPLITS},
        written=written,
        already_present=present,
        missing=missing,
        ignored_splits=dict(sorted((str(k), v) for k, v in ignored.items())),
        mode=mode,
    )


# --------------------------------------------------------------------------- check


@dataclass(frozen=True)
class BadVideo:
    path: Path
    reason: str
    detail: str
    quarantined_to: Path | None


@dataclass
class CheckResult:
    root: Path
    checked: int
    bad: list[BadVideo] = field(default_factory=list)
    report_csv: Path | None = None

    def reason_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(b.reason for b in self.bad).items()))


def _verify_job(path: str, full_decode: bool) -> tuple[str | None, str]:
    try:
        n = verify_video(path, full_decode=full_decode)
    except VideoDecodeError as e:
        return e.reason, e.detail
    return None, f"{n} frames"


def _unique_destination(dest: Path) -> Path:
    if not dest.exists():
        return dest
    for i in range(1, 10_000):
        cand = dest.with_name(f"{dest.stem}.{i}{dest.suffix}")
        if not cand.exists():
            return cand
    raise DataError(f"too many quarantined copies of {dest}")


def check(
    root: str | os.PathLike[str],
    quarantine_dir: str | os.PathLike[str],
    report_csv: str | os.PathLike[str],
    *,
    workers: int = 0,
    full_decode: bool = True,
    dry_run: bool = False,
    progress: bool = True,
) -> CheckResult:
    """Find videos under ``root/{train,val}`` that fail to open or decode, MOVE them (never
    delete) to ``quarantine_dir`` keeping their path relative to ``root``, and write a CSV
    report ``path,reason,detail,quarantined_to`` of the bad ones (header only when all are fine).

    ``full_decode=False`` only decodes the first frame (fast, misses damage further in);
    ``dry_run`` reports without moving.
    """
    base = Path(root)
    quarantine = Path(quarantine_dir)
    split_dirs = [base / s for s in SPLITS if (base / s).is_dir()]
    if not split_dirs:
        raise DataError(f"{base} has neither a train/ nor a val/ folder to check")
    q_abs = quarantine.resolve()
    for d in split_dirs:
        if q_abs == d.resolve() or d.resolve() in q_abs.parents:
            raise DataError(
                f"quarantine folder {quarantine} is inside {d}; put it outside the dataset"
            )
    videos = sorted((p for d in split_dirs for p in d.rglob("*") if _is_video(p)), key=str)
    outs = parallel_map(
        _verify_job,
        [(str(p), full_decode) for p in videos],
        workers,
        progress=progress,
        desc="check videos",
    )
    bad: list[BadVideo] = []
    for p, out in zip(videos, outs, strict=True):
        if isinstance(out, BrokenProcessPool):
            reason, detail = WORKER_CRASHED, "a checking worker died; rerun with workers=0"
        else:
            reason, detail = out
        if reason is None:
            continue
        dest = None
        if not dry_run and reason != WORKER_CRASHED:
            dest = _unique_destination(quarantine / p.relative_to(base))
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(dest))
        bad.append(BadVideo(p, reason, detail, dest))
    report = Path(report_csv)
    report.parent.mkdir(parents=True, exist_ok=True)
    with report.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason", "detail", "quarantined_to"])
        for b in bad:
            w.writerow(
                [
                    str(b.path),
                    b.reason,
                    b.detail,
                    "" if b.quarantined_to is None else b.quarantined_to,
                ]
            )
    return CheckResult(root=base, checked=len(videos), bad=bad, report_csv=report)


# --------------------------------------------------------------------------- preprocessed set


@dataclass(frozen=True)
class ManifestRecord:
    video_path: str
    label: str
    tensor_path: str
    shape: list[int]
    dtype: str

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in MANIFEST_KEYS})


@dataclass
class PreprocessedSet:
    out_dir: Path
    manifest_path: Path
    records: list[ManifestRecord]
    skipped: list[SkippedVideo]
    skipped_csv: Path
    cache_hits: int = 0


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_preprocessed(
    samples: Iterable[VideoSample],
    preprocess: VideoPreprocess,
    out_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> PreprocessedSet:
    """Write the official preprocessed set: ``out_dir/<class>/<stem>.npy`` + ``manifest.jsonl``.

    Rows are in sorted full-path order of the videos. Videos that cannot be decoded are left out
    of the manifest and listed in ``skipped.csv`` (the results file follows the manifest, so
    nothing shifts). Refuses an ``out_dir`` holding ``.npy`` files this set would not write: the
    organisers' ``run_inference.py`` uploads every ``.npy`` under the folder, sorted, so a stray
    file would shift every result after it. ``cache_dir`` keeps decoded tensors between runs.
    """
    if preprocess.clips_per_video != 1:
        raise ConfigError(
            "the official preprocessed layout holds one clip per video; "
            f"clips_per_video={preprocess.clips_per_video} must be 1 here"
        )
    out = Path(out_dir)
    ordered = sorted(samples, key=lambda s: str(s.path))
    if not ordered:
        raise DataError(f"no videos to preprocess into {out}")
    tensor_paths = [out / s.class_name / f"{s.path.stem}.npy" for s in ordered]
    dup = [p for p, c in Counter(tensor_paths).items() if c > 1]
    if dup:
        raise DataError(
            f"two videos would write the same tensor {dup[0]} (same class and file stem); "
            "rename one of them"
        )
    as_text = [str(p) for p in tensor_paths]
    if sorted(as_text) != as_text:
        raise DataError(
            f"the tensor files under {out} would not sort in the manifest order (video file "
            "names with dots or unusual characters?); the organisers' inference script sorts "
            "the .npy paths and would misalign results — rename those videos"
        )
    planned = set(tensor_paths)
    stray = sorted(p for p in out.rglob("*.npy") if p not in planned) if out.exists() else []
    if stray:
        raise DataError(
            f"{out} already holds {len(stray)} .npy file(s) that are not part of this set "
            f"(e.g. {stray[0]}); the official inference script would upload them too — use an "
            "empty output folder"
        )

    with _maybe_tempdir(cache_dir, out) as cdir:
        batch = decode_videos(
            [s.path for s in ordered],
            preprocess,
            cache_dir=cdir,
            workers=workers,
            return_tensors=False,
            progress=progress,
            desc="preprocess",
        )
        records: list[ManifestRecord] = []
        shape = [1, *preprocess.clip_shape]
        for sample, tpath, res in zip(ordered, tensor_paths, batch.results, strict=True):
            if not res.ok:
                if tpath.exists():
                    tpath.unlink()  # a tensor from an earlier run of a now-unreadable video
                continue
            assert res.cache_path is not None
            tpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = tpath.with_name(f".{tpath.name}.{uuid.uuid4().hex[:8]}.tmp")
            shutil.copyfile(res.cache_path, tmp)
            os.replace(tmp, tpath)
            records.append(
                ManifestRecord(
                    str(sample.path), sample.class_name, str(tpath), shape, MANIFEST_DTYPE
                )
            )

    manifest = out / "manifest.jsonl"
    _atomic_write_text(manifest, "".join(r.to_json() + "\n" for r in records))
    skipped_csv = out / "skipped.csv"
    rows = [["video_path", "reason", "message"]]
    rows += [[str(s.path), s.reason, s.message] for s in batch.skipped]
    _atomic_write_text(skipped_csv, "".join(_csv_line(r) for r in rows))
    return PreprocessedSet(out, manifest, records, batch.skipped, skipped_csv, batch.cache_hits)


def _csv_line(row: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    return buf.getvalue()


@contextmanager
def _maybe_tempdir(cache_dir: str | os.PathLike[str] | None, out: Path) -> Iterator[Path]:
    """The given cache dir, or a temporary one beside ``out`` (same file system), removed after."""
    if cache_dir is not None:
        yield Path(cache_dir)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.cache-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestRecord]:
    """Parse ``manifest.jsonl``; each line must have exactly the official keys."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"manifest {p} not found") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or set(obj) != set(MANIFEST_KEYS):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{p}:{n}: expected keys {list(MANIFEST_KEYS)}, got {got}")
        shape = obj["shape"]
        if not isinstance(shape, list) or not all(isinstance(v, int) for v in shape):
            raise DataError(f"{p}:{n}: 'shape' must be a list of integers, got {shape!r}")
        records.append(
            ManifestRecord(
                str(obj["video_path"]),
                str(obj["label"]),
                str(obj["tensor_path"]),
                shape,
                str(obj["dtype"]),
            )
        )
    return records


# --------------------------------------------------------------------------- results HDF5


def write_results_h5(
    path: str | os.PathLike[str], logits: np.ndarray | Sequence[np.ndarray]
) -> Path:
    """Write ``(N, C)`` logits as the official results file: ``data/0/batch_i`` of ``(1, C)``."""
    rows = [np.asarray(r, dtype=np.float32).reshape(1, -1) for r in logits]
    if rows and len({r.shape[1] for r in rows}) != 1:
        raise DataError(f"results for {path}: rows have different numbers of classes")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            grp = f.create_group(RESULTS_GROUP)
            for i, row in enumerate(rows):
                grp.create_dataset(f"batch_{i}", data=row)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def read_results_h5(path: str | os.PathLike[str]) -> np.ndarray:
    """``(N, C)`` float32 logits from an official results file, rows in ``batch_i`` order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"results file {p} not found")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DataError(f"results file {p} is not a readable HDF5 file ({e})") from None
    with f:
        if RESULTS_GROUP not in f:
            raise DataError(f"results file {p} has no group '{RESULTS_GROUP}' (official layout)")
        grp = f[RESULTS_GROUP]
        numbered: dict[int, str] = {}
        for key in grp.keys():
            m = re.fullmatch(r"batch_(\d+)", key)
            if m is None:
                raise DataError(f"results file {p}: unexpected dataset '{RESULTS_GROUP}/{key}'")
            numbered[int(m.group(1))] = key
        if sorted(numbered) != list(range(len(numbered))):
            gap = min(set(range(len(numbered))) - set(numbered))
            raise DataError(f"results file {p}: '{RESULTS_GROUP}/batch_{gap}' is missing")
        rows = [np.asarray(grp[numbered[i]][...], dtype=np.float32) for i in range(len(numbered))]
    rows = [r.reshape(1, -1) if r.ndim == 1 else r for r in rows]
    bad = [i for i, r in enumerate(rows) if r.ndim != 2 or r.shape[0] != 1]
    if bad:
        raise DataError(
            f"results file {p}: batch_{bad[0]} has shape {rows[bad[0]].shape}, expected (1, C)"
        )
    if len({r.shape[1] for r in rows}) > 1:
        raise DataError(f"results file {p}: rows have different numbers of classes")
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows, axis=0)


def check_results_against_manifest(
    manifest_path: str | os.PathLike[str],
    results_path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
) -> int:
    """Row count shared by a manifest and a results file; DataError naming both otherwise."""
    records = read_manifest(manifest_path)
    logits = read_results_h5(results_path)
    if len(records) != logits.shape[0]:
        raise DataError(
            f"{results_path} has {logits.shape[0]} result rows but {manifest_path} lists "
            f"{len(records)} videos; results must be produced from exactly this manifest "
            "(same preprocessing run, all inference chunks collected)"
        )
    if num_classes is not None and logits.size and logits.shape[1] != num_classes:
        raise DataError(
            f"{results_path} has {logits.shape[1]} classes per row, expected {num_classes}"
        )
    return len(records)


def manifest_labels(
    records: Sequence[ManifestRecord], class_map: Mapping[str, Any] | None = None
) -> list[int]:
    """Class indices of manifest rows (labels are class folder names, as in ``evaluate.py``)."""
    cmap = dict(class_map) if class_map is not None else load_class_map()
    out = []
    for i, r in enumerate(records):
        if r.label not in cmap:
            raise DataError(
                f"manifest row {i + 1} ({r.video_path}): label {r.label!r} not in the class map"
            )
        out.append(int(cmap[r.label]))
    return out
