"""A small, deterministic Track 1 dataset in the official format, for the demo and the tests.

Each image shows a coloured shape at a place on a coloured background; its captions describe
what is drawn. Like the real 2026 sample it has text IDs with gaps, one ground-truth ID with no
caption (so the best achievable Recall@10 is below 1), mixed-case file names listed in an order
that differs from ``sorted()``, several image sizes and both JPEG and PNG. It is then read by the
very same reader as real data.

:func:`make_demo_training_split` adds a training split in the same layout under ``root/train/``:
other images (the combinations of shape, colour, background and place the evaluation set does not
show, drawn again at other sizes when more images are asked for), the same vocabulary, and all
three captions of each image -- so that a model trained on it must compose what it learnt.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from lpcvlab.util.io import atomic_write, atomic_write_bytes, atomic_write_text, file_lock

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = {"top left": (0.28, 0.28), "bottom right": (0.72, 0.72), "centre": (0.5, 0.5)}
SIZES = ((320, 240), (240, 320), (256, 256), (400, 300))
_VERSION = 1


def _draw(shape: str, colour, bg, place, size, rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.16, 0.22)
    cx, cy = place[0] * w, place[1] * h
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        t = r / 3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    return img


def make_demo_retrieval_dataset(root: Path | str, num_images: int = 40, seed: int = 0) -> Path:
    """Write ``root/images/`` + ``img_list.csv`` + ``txt_list.csv``; a no-op when already there.

    A lock file beside ``root`` makes parallel sweep jobs wait for the one that writes, instead
    of reading half-written images.
    """
    root = Path(root)
    with file_lock(root):
        return _write_demo_dataset(root, num_images, seed)


def _combos(seed: int) -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, background, place), in the seed's order: the evaluation set takes
    the first ``num_images``, the training split the rest."""
    combos = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS, PLACES))
    combos = [c for c in combos if COLOURS[c[1]] != BACKGROUNDS[c[2]]]
    random.Random(seed).shuffle(combos)
    return combos


def _write_demo_dataset(root: Path, num_images: int, seed: int) -> Path:
    params = {"num_images": num_images, "seed": seed, "version": _VERSION}
    marker = root / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    combos = list(itertools.product(SHAPES, COLOURS, BACKGROUNDS, PLACES))
    combos = [c for c in combos if COLOURS[c[1]] != BACKGROUNDS[c[2]]]
    if not 1 <= num_images <= len(combos):
        raise ValueError(f"data.demo.num_images must be between 1 and {len(combos)}")
    rng = random.Random(seed)
    rng.shuffle(combos)
    img_dir = root / "images"

    img_rows: list[tuple[str, str]] = []
    txt_rows: list[tuple[int, str]] = []
    next_id = 1
    missing_id = None
    for i, (shape, colour, bg, place) in enumerate(combos[:num_images]):
        stem = f"Demo_{i:03d}" if i % 3 == 0 else f"demo_{i:03d}"
        name = f"{stem}.png" if i % 4 == 0 else f"{stem}.jpg"
        img = _draw(shape, COLOURS[colour], BACKGROUNDS[bg], PLACES[place], SIZES[i % 4], rng)
        _save_image(img, img_dir / name)
        captions = [
            f"a {colour} {shape} in the {place} on a {bg} background",
            f"the {colour} {shape}",
            f"a {bg} picture with a {colour} {shape} in the {place}",
        ][: rng.randint(2, 3)]
        ids = []
        for caption in captions:
            next_id += rng.choice((1, 1, 1, 2))  # IDs with gaps, as in the real sample
            txt_rows.append((next_id, caption))
            ids.append(next_id)
        if missing_id is None and i == num_images // 2:
            next_id += 1
            missing_id = next_id  # referenced below, but given no caption
            ids.append(missing_id)
        img_rows.append((name, ";".join(map(str, ids))))

    # CSV order is case-insensitive, so it differs from sorted(): align by name, never position.
    img_rows.sort(key=lambda r: r[0].lower())
    _write_csv(root / "img_list.csv", ["Image_names", "Text_nums"], img_rows)
    _write_csv(root / "txt_list.csv", ["Text_nums", "Unique_Texts"], txt_rows)
    atomic_write_text(marker, json.dumps(params))  # last: a half-written dataset is redone
    return root


def make_demo_training_split(
    root: Path | str, num_images: int, eval_images: int, seed: int = 0
) -> Path:
    """Write ``root/train/`` (images + ``img_list.csv`` + ``txt_list.csv``): ``num_images``
    images of the combinations the evaluation set of ``eval_images`` images does not show (all
    of them when it shows every one), each with its three captions; a no-op when already there.
    """
    root = Path(root) / "train"
    with file_lock(root):
        params = {
            "num_images": num_images,
            "eval_images": eval_images,
            "seed": seed,
            "version": _VERSION,
        }
        marker = root / "demo.json"
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return root
        if num_images < 1:
            raise ValueError("data.demo.num_train_images must be at least 1")
        shutil.rmtree(root / "images", ignore_errors=True)  # another size's leftovers
        combos = _combos(seed)
        unseen = combos[eval_images:] or combos
        rng = random.Random(seed * 7919 + 104_729)  # another stream than the evaluation set's
        img_rows: list[tuple[str, str]] = []
        txt_rows: list[tuple[int, str]] = []
        for i in range(num_images):
            shape, colour, bg, place = unseen[i % len(unseen)]
            name = f"train_{i:05d}.png" if i % 4 == 0 else f"train_{i:05d}.jpg"
            size = SIZES[rng.randrange(len(SIZES))]
            img = _draw(shape, COLOURS[colour], BACKGROUNDS[bg], PLACES[place], size, rng)
            _save_image(img, root / "images" / name)
            captions = [
                f"a {colour} {shape} in the {place} on a {bg} background",
                f"the {colour} {shape}",
                f"a {bg} picture with a {colour} {shape} in the {place}",
            ]
            ids = []
            for caption in captions:
                ids.append(len(txt_rows) + 1)
                txt_rows.append((ids[-1], caption))
            img_rows.append((name, ";".join(map(str, ids))))
        _write_csv(root / "img_list.csv", ["Image_names", "Text_nums"], img_rows)
        _write_csv(root / "txt_list.csv", ["Text_nums", "Unique_Texts"], txt_rows)
        atomic_write_text(marker, json.dumps(params))
        return root


def _save_image(img: Image.Image, path: Path) -> None:
    """Atomically; a full disk is a StorageError naming ``path``."""
    if path.suffix == ".jpg":
        atomic_write(path, lambda tmp: img.save(tmp, format="JPEG", quality=92))
    else:
        atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    """Atomically, as bytes: the csv module's \r\n line ends are kept on every platform."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
