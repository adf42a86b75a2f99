"""``lpcvlab qevd`` tools: organise raw QEVD parts, check (quarantine) videos, write the official
preprocessed set. Runs read the dataset with :mod:`lpcvlab.data.qevd` and need none of this.

Labels JSON for :func:`organise`: the QEVD release's ``fine_grained_labels_release.json``, as the
official sample reads it — a JSON list of objects::

    [{"video_path": "./00000000.mp4", "label": "elbow plank", "split": "train"}, ...]

``video_path`` is matched by file name against the ``*.mp4`` files found under the raw parts
(``QEVD-FIT-300k-Part-1`` ...); ``file`` and ``class`` are accepted as aliases of
``video_path`` and ``label``. ``split`` may be omitted when ``val_fraction`` is given (then
every entry is re-split, stratified per class, reproducibly from ``seed``). Entries whose split
is not ``train``/``val`` are counted and left out.

Every file written here is written atomically (:mod:`lpcvlab.util.io`), and a full disk is a
:class:`~lpcvlab.errors.StorageError` naming the file.
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
from functools import partial
from pathlib import Path

from tqdm import tqdm

from lpcvlab.data.batch import SkippedVideo, decode_videos, parallel_map
from lpcvlab.data.decode import verify_video
from lpcvlab.data.formats import MANIFEST_DTYPE, ManifestRecord
from lpcvlab.data.frames import WORKER_CRASHED, VideoDecodeError, VideoPreprocess
from lpcvlab.data.qevd import (
    LINK_MODES,
    SPLITS,
    VideoSample,
    class_folder_name,
    is_video_file,
    load_class_map,
)
from lpcvlab.errors import ConfigError, DataError
from lpcvlab.util.io import atomic_write, atomic_write_bytes, atomic_write_text, writing

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


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
            if is_video_file(p):
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
    def write(tmp: Path) -> None:
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

    atomic_write(dest, write)


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
    videos = sorted((p for d in split_dirs for p in d.rglob("*") if is_video_file(p)), key=str)
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
            with writing(dest):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(p), str(dest))
        bad.append(BadVideo(p, reason, detail, dest))
    rows = [["path", "reason", "detail", "quarantined_to"]]
    rows += [
        [str(b.path), b.reason, b.detail, "" if b.quarantined_to is None else str(b.quarantined_to)]
        for b in bad
    ]
    report = _write_csv(report_csv, rows)
    return CheckResult(root=base, checked=len(videos), bad=bad, report_csv=report)


# --------------------------------------------------------------------------- preprocessed set


@dataclass
class PreprocessedSet:
    out_dir: Path
    manifest_path: Path
    records: list[ManifestRecord]
    skipped: list[SkippedVideo]
    skipped_csv: Path
    cache_hits: int = 0


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
                with writing(tpath):
                    tpath.unlink(missing_ok=True)  # from an earlier run of a now-unreadable video
                continue
            assert res.cache_path is not None
            atomic_write(tpath, partial(shutil.copyfile, res.cache_path))
            records.append(
                ManifestRecord(
                    str(sample.path), sample.class_name, str(tpath), shape, MANIFEST_DTYPE
                )
            )

    manifest = atomic_write_text(
        out / "manifest.jsonl", "".join(r.to_json() + "\n" for r in records)
    )
    rows = [["video_path", "reason", "message"]]
    rows += [[str(s.path), s.reason, s.message] for s in batch.skipped]
    skipped_csv = _write_csv(out / "skipped.csv", rows)
    return PreprocessedSet(out, manifest, records, batch.skipped, skipped_csv, batch.cache_hits)


def _write_csv(path: str | os.PathLike[str], rows: Sequence[Sequence[str]]) -> Path:
    """Atomically, as bytes: the csv module's \r\n line ends are kept on every platform."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


@contextmanager
def _maybe_tempdir(cache_dir: str | os.PathLike[str] | None, out: Path) -> Iterator[Path]:
    """The given cache dir, or a temporary one beside ``out`` (same file system), removed after."""
    if cache_dir is not None:
        yield Path(cache_dir)
        return
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.cache-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
