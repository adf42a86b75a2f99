"""A small generated Track 2 dataset in the real QEVD layout, for tests and demo pipelines.

Real ``.mp4`` files (H.264 through PyAV when the encoder is there, MPEG-4 Part 2 otherwise) in
``root/{train,val}/<class>/<video>.mp4`` with real class-map names, so every code path (reader,
decoding, frame selection, preprocessing, manifest, results) runs as on QEVD. Each class is one
motion of a coloured disc on a noisy background, easy for a tiny 3D conv net to learn on a CPU:

==============================  ===========================================================
class (default)                 motion
==============================  ===========================================================
coming_closer_to_the_webcam     grows (comes closer), staying in place
hook_left                       travels right to left
squats                          bobs down and up
uppercut_right                  travels left to right
==============================  ===========================================================

Colour, size, speed, phase, start position, background and noise are drawn per video, so only
the motion tells the classes apart (left-to-right and right-to-left differ only in the direction
of time). Videos are 24 or 30 fps and 4.5-6.5 s long, plus ``short_videos`` train videos of
2.5 s: too short for 16 frames at 4 fps, so ``lpcvc_sample`` skips them (counted, reason
``too-short``) while ``dynamic_fps`` keeps them.

Deterministic: the same parameters give byte-identical files (one encoder thread, every random
draw from a generator seeded per video). Idempotent: a marker file records the parameters, and a
second call with the same ones returns without encoding; concurrent calls (parallel sweep jobs)
serialise on a file lock. A root made with other parameters is an error, never overwritten:
give each parameter set (e.g. each seed) its own root.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from lpcvlab.data.qevd import SPLITS, VideoSample, load_class_map
from lpcvlab.errors import ConfigError, DataError
from lpcvlab.util.io import atomic_write, atomic_write_text, file_lock

DEMO_CLASSES = ("coming_closer_to_the_webcam", "hook_left", "squats", "uppercut_right")
# Motions in the order classes get them (by position in ``classes``).
MOTIONS = ("grow", "right_to_left", "up_down", "left_to_right", "side_to_side", "shrink")
MARKER = ".lpcvlab_demo_video.json"
_FORMAT = 1
_SHORT_DURATION_S = 2.5


@dataclass
class DemoVideoDataset:
    root: Path
    classes: list[str]
    motions: dict[str, str]  # class -> motion
    splits: dict[str, list[VideoSample]]  # sorted full-path order, labels from the class map
    codec: str
    generated: bool  # False when an identical dataset was already there


def _pick_codec(codec: str) -> str:
    if codec != "auto":
        try:
            av.codec.Codec(codec, "w")
        except Exception as e:  # av raises UnknownCodecError (a ValueError) or similar
            raise ConfigError(f"video encoder {codec!r} is not available in PyAV ({e})") from None
        return codec
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise ConfigError("PyAV has neither the libx264 nor the mpeg4 encoder")


def _trajectory(
    motion: str, t: np.ndarray, rng: np.random.Generator, h: int, w: int, duration_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, y and radius (pixels) at times ``t`` (seconds) for one video."""
    r0 = rng.uniform(0.1, 0.15) * h
    cx = rng.uniform(0.42, 0.58) * w
    cy = rng.uniform(0.4, 0.6) * h
    wobble = rng.uniform(0.5, 1.5) * np.sin(2 * math.pi * t * rng.uniform(0.3, 0.7))
    ones = np.ones_like(t)
    # Travel: 55-70 % of the width over the whole video, from near one side.
    travel = rng.uniform(0.55, 0.7) * w * t / duration_s
    start = rng.uniform(0.15, 0.25) * w
    swing = np.sin(2 * math.pi * t / rng.uniform(1.6, 2.4) + rng.uniform(0, 2 * math.pi))
    growth = rng.uniform(0.35, 0.5) * t  # radius grows by 35-50 % of r0 per second
    if motion == "left_to_right":
        return start + travel, cy + wobble, r0 * ones
    if motion == "right_to_left":
        return w - start - travel, cy + wobble, r0 * ones
    if motion == "up_down":
        return cx + wobble, cy + rng.uniform(0.22, 0.3) * h * swing, r0 * ones
    if motion == "side_to_side":
        return cx + rng.uniform(0.2, 0.28) * w * swing, cy + wobble, r0 * ones
    if motion == "grow":
        return cx + wobble, cy * ones, r0 * (0.6 + growth)
    if motion == "shrink":
        return cx + wobble, cy * ones, r0 * np.maximum(0.3, 3.0 - growth)
    raise ConfigError(f"unknown demo motion {motion!r}")


def _write_video(
    path: Path,
    motion: str,
    rng: np.random.Generator,
    *,
    fps: int,
    duration_s: float,
    size: tuple[int, int],
    codec: str,
) -> None:
    h, w = size
    n = int(round(fps * duration_s))
    t = np.arange(n) / fps
    xs, ys, rs = _trajectory(motion, t, rng, h, w, duration_s)
    colour = rng.integers(40, 256, 3)
    colour[int(rng.integers(0, 3))] = rng.integers(190, 256)  # always clearly brighter than bg
    colour = colour.astype(np.uint8)
    bg = rng.integers(0, 60, 3)
    noise_amp = int(rng.integers(4, 12))
    # A small bank of noise frames, cycled: per-frame fresh noise costs more than the encoding.
    bank = [
        np.clip(bg + rng.integers(0, noise_amp, (h, w, 3)), 0, 255).astype(np.uint8)
        for _ in range(5)
    ]
    yy, xx = np.mgrid[0:h, 0:w]

    def encode(tmp: Path) -> None:
        container = av.open(str(tmp), "w", format="mp4")
        try:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.codec_context.thread_count = 1  # one thread: byte-identical output
            if codec == "libx264":
                stream.options = {"preset": "ultrafast", "crf": "23"}
            else:
                stream.codec_context.bit_rate = 400_000
            for i in range(n):
                img = bank[i % len(bank)].copy()
                mask = (xx - xs[i]) ** 2 + (yy - ys[i]) ** 2 <= rs[i] ** 2
                img[mask] = colour
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()

    atomic_write(path, encode)  # PyAV's write errors are OSErrors: a full disk names the file


def make_demo_video_dataset(
    root: str | Path,
    seed: int = 0,
    classes: Sequence[str] = DEMO_CLASSES,
    videos_per_class_train: int = 12,
    videos_per_class_val: int = 4,
    *,
    size: tuple[int, int] = (120, 160),
    fps_choices: Sequence[int] = (24, 30),
    duration_s: tuple[float, float] = (4.5, 6.5),
    short_videos: int = 1,
    codec: str = "auto",
) -> DemoVideoDataset:
    """Generate (or reuse) the demo dataset under ``root``; see the module docstring.

    ``size`` is (height, width). ``short_videos`` train videos (the first video of each of the
    first ``short_videos`` classes) last 2.5 s. Raises DataError when ``root`` holds a demo
    dataset made with other parameters (it never deletes anything: pick another root).
    """
    cmap = load_class_map()
    classes = list(classes)
    unknown = [c for c in classes if c not in cmap]
    if unknown:
        raise ConfigError(f"demo classes {unknown} are not in the Track 2 class map")
    if len(set(classes)) != len(classes) or not classes:
        raise ConfigError(f"demo classes must be distinct and non-empty, got {classes}")
    if len(classes) > len(MOTIONS):
        raise ConfigError(f"at most {len(MOTIONS)} demo classes (one per motion)")
    if videos_per_class_train < 1 or videos_per_class_val < 1:
        raise ConfigError("videos_per_class_train and videos_per_class_val must be >= 1")
    if not 0 <= short_videos <= len(classes):
        raise ConfigError(f"short_videos={short_videos} must be between 0 and {len(classes)}")
    codec_name = _pick_codec(codec)
    motions = {c: MOTIONS[i] for i, c in enumerate(classes)}
    params = {
        "format": _FORMAT,
        "seed": seed,
        "classes": classes,
        "videos_per_class_train": videos_per_class_train,
        "videos_per_class_val": videos_per_class_val,
        "size": list(size),
        "fps_choices": list(fps_choices),
        "duration_s": list(duration_s),
        "short_videos": short_videos,
        "codec": codec_name,
        "pyav": av.__version__,
    }
    base = Path(root)
    counts = {"train": videos_per_class_train, "val": videos_per_class_val}
    plan: list[tuple[str, str, int, Path]] = []
    serial = 0
    for split in SPLITS:
        for cls in classes:
            for i in range(counts[split]):
                plan.append((split, cls, i, base / split / cls / f"{seed:02d}{serial:06d}.mp4"))
                serial += 1

    with file_lock(base / MARKER):  # parallel jobs: one generates, the others wait
        marker = base / MARKER
        generated = True
        if marker.exists():
            try:
                previous = json.loads(marker.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                previous = None
            same = isinstance(previous, dict) and all(
                previous.get(k) == v for k, v in params.items() if k != "pyav"
            )  # files from another PyAV version are still valid videos: reuse them
            if not same:
                raise DataError(
                    f"{base} holds a demo video dataset made with other parameters ({marker}); "
                    "use another root"
                )
            generated = not all(p.exists() for *_, p in plan)
        if generated:
            short_left = short_videos
            for split, cls, i, path in plan:
                ci = classes.index(cls)
                rng = np.random.default_rng([seed, ci, SPLITS.index(split), i])
                fps = int(fps_choices[int(rng.integers(0, len(fps_choices)))])
                dur = float(rng.uniform(*duration_s))
                if split == "train" and i == 0 and short_left > 0:
                    dur = _SHORT_DURATION_S
                    short_left -= 1
                _write_video(
                    path, motions[cls], rng, fps=fps, duration_s=dur, size=size, codec=codec_name
                )
            atomic_write_text(marker, json.dumps(params, indent=1) + "\n")

    splits: dict[str, list[VideoSample]] = {}
    for split in SPLITS:
        rows = [(str(p), p, c) for s, c, _, p in plan if s == split]
        rows.sort(key=lambda r: r[0])
        splits[split] = [VideoSample(path=p, label=cmap[c], class_name=c) for _, p, c in rows]
    return DemoVideoDataset(
        root=base,
        classes=classes,
        motions=motions,
        splits=splits,
        codec=codec_name,
        generated=generated,
    )
