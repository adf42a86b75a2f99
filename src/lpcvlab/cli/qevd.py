"""``lpcvlab qevd ...``: organise, check and preprocess the QEVD (Track 2) dataset.

The main CLI calls :func:`add_qevd_commands` with its subparsers; every leaf command sets
``func(args) -> int``. Errors meant for the user are raised as :class:`~lpcvlab.errors.LpcvlabError`
and printed by the main CLI without a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lpcvlab.data.frames import FRAME_SELECTIONS, VideoPreprocess
from lpcvlab.data.qevd import LINK_MODES, SPLITS, load_class_map, read_split


def add_qevd_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``qevd organise|check|preprocess|demo`` under the given subparsers."""
    qevd = subparsers.add_parser(
        "qevd",
        help="QEVD (Track 2) dataset: organise, check, preprocess",
        description="Tools for the QEVD video dataset of LPCVC 2026 Track 2.",
    )
    qsub = qevd.add_subparsers(dest="qevd_command", metavar="COMMAND")
    qsub.required = True

    p = qsub.add_parser(
        "organise",
        help="raw QEVD parts + labels JSON -> root/{train,val}/<class>/<video>.mp4",
        description="Copy (or link) raw QEVD videos into the layout the trainers read. "
        "Originals are never moved or deleted.",
    )
    p.add_argument(
        "--raw",
        type=Path,
        nargs="+",
        required=True,
        metavar="PART",
        help="raw part folders (QEVD-FIT-300k-Part-1 ...)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="labels JSON: [{video_path, label, split}, ...] (fine_grained_labels_release.json)",
    )
    p.add_argument("--out", type=Path, required=True, help="dataset root to create")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="re-split every video, stratified per class (ignores the JSON's split)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --val-fraction's split")
    p.add_argument("--mode", choices=LINK_MODES, default="copy", help="how to place the files")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="organise what is there when some labelled videos are in none of the parts",
    )
    p.add_argument(
        "--class-map", type=Path, default=None, help="class_map.json (default: official)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_organise)

    p = qsub.add_parser(
        "check",
        help="decode every video; move the broken ones to a quarantine folder + CSV report",
        description="Finds videos under ROOT/{train,val} that fail to open or decode and MOVES "
        "them (never deletes) into QUARANTINE, keeping their relative path.",
    )
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--quarantine", type=Path, required=True)
    p.add_argument("--report", type=Path, default=None, help="CSV (default: QUARANTINE/report.csv)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: in-process)")
    p.add_argument("--quick", action="store_true", help="decode only the first frame")
    p.add_argument("--dry-run", action="store_true", help="report without moving anything")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_check)

    p = qsub.add_parser(
        "preprocess",
        help="write the official preprocessed set (.npy per video + manifest.jsonl)",
        description="Decode one split into OUT/<class>/<video>.npy of shape (1,3,16,112,112) "
        "float32 plus OUT/manifest.jsonl, in sorted path order, as the organisers' scripts read.",
    )
    p.add_argument("--root", type=Path, required=True, help="dataset root (holds train/ val/)")
    p.add_argument("--split", choices=SPLITS, default="val")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frame-selection", choices=FRAME_SELECTIONS, default="lpcvc_sample")
    p.add_argument("--fps", type=float, default=4)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=None, help="reuse decoded tensors across runs")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: in-process)")
    p.add_argument(
        "--class-map", type=Path, default=None, help="class_map.json (default: official)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_preprocess)

    p = qsub.add_parser(
        "demo",
        help="generate the small demo video dataset (real .mp4, real class names)",
    )
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return qevd


# The tools import torch (through the decoding workers): only when a verb runs, not for --help.


def _cmd_organise(args: argparse.Namespace) -> int:
    from lpcvlab.data.qevd_tools import organise

    cmap = load_class_map(args.class_map) if args.class_map else None
    res = organise(
        args.raw,
        args.labels,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        mode=args.mode,
        allow_missing=args.allow_missing,
        class_map=cmap,
        progress=not args.no_progress,
    )
    counts = ", ".join(f"{k} {v}" for k, v in res.counts.items())
    print(
        f"organised {res.out_root}: {counts} videos ({res.written} {res.mode} new, "
        f"{res.already_present} already there)"
    )
    if res.missing:
        print(f"  {len(res.missing)} labelled videos were in no raw part (e.g. {res.missing[0]})")
    if res.ignored_splits:
        print(f"  left out entries of other splits: {res.ignored_splits}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from lpcvlab.data.qevd_tools import check

    report = args.report or (args.quarantine / "report.csv")
    res = check(
        args.root,
        args.quarantine,
        report,
        workers=args.workers,
        full_decode=not args.quick,
        dry_run=args.dry_run,
        progress=not args.no_progress,
    )
    verb = "would move" if args.dry_run else "moved"
    print(
        f"checked {res.checked} videos under {res.root}: {len(res.bad)} bad "
        f"{res.reason_counts() or ''} ({verb} to {args.quarantine}); report: {res.report_csv}"
    )
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from lpcvlab.data.qevd_tools import write_preprocessed

    cmap = load_class_map(args.class_map) if args.class_map else None
    split = read_split(args.root, args.split, cmap)
    pre = VideoPreprocess(
        frame_selection=args.frame_selection, fps=args.fps, num_frames=args.num_frames
    )
    res = write_preprocessed(
        split.samples,
        pre,
        args.out,
        cache_dir=args.cache_dir,
        workers=args.workers,
        progress=not args.no_progress,
    )
    reasons: dict[str, int] = {}
    for s in res.skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    print(
        f"preprocessed {len(res.records)} of {len(split)} {args.split} videos "
        f"({pre.frame_selection}) into {res.out_dir}; manifest: {res.manifest_path}"
    )
    if res.skipped:
        print(f"  skipped {len(res.skipped)} {dict(sorted(reasons.items()))}: {res.skipped_csv}")
    if args.cache_dir:
        print(f"  cache hits: {res.cache_hits} ({args.cache_dir})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lpcvlab.data.demo_video import make_demo_video_dataset

    ds = make_demo_video_dataset(args.root, seed=args.seed)
    state = "generated" if ds.generated else "already there"
    sizes = ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items())
    print(f"demo video dataset {state}: {ds.root} ({sizes} videos, classes {ds.classes})")
    return 0
