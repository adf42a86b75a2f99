"""Reader for COCO-captions JSON: the format of COCO and Flickr30k that Track 1 entries train on.

``{"images": [{"id": 1, "file_name": "a.jpg"}, ...], "annotations": [{"image_id": 1,
"caption": "..."}, ...]}``; image files under ``root/<images_dir>/<file_name>``.

Policy for bad input, as the evaluation reader's (each counted; never a silent shift):

* a file that is not JSON, has no ``images`` or ``annotations`` list, an entry that is not an
  object, an image without an integer ``id`` or a ``file_name``, a duplicate image ``id``, an
  annotation without an integer ``image_id`` or a string ``caption``: stop, naming the file and
  the entry (``images[12]``, ``annotations[40]``);
* an annotation whose ``image_id`` is not in ``images``: skipped, counted (``orphan_captions``);
* an empty caption: skipped, counted (``empty_captions``);
* an image with no caption left: skipped, counted (``images_without_captions``) and listed;
* an image listed but not in the folder: skipped, counted and listed (as ``img_list.csv`` rows).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lpcvlab.data.captions import CaptionImage, CaptionSplit, Skip
from lpcvlab.errors import DataError

log = logging.getLogger(__name__)


def _entries(doc: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise DataError(
            f"{path}: no {key!r} list; a COCO-captions file has 'images' (id, file_name) and "
            "'annotations' (image_id, caption)"
        )
    return value


def _int(entry: dict[str, Any], key: str, path: Path, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise DataError(f"{path}, {where}: {key} {value!r} is not an integer")
    return value


def read_coco_captions(
    root: Path | str, annotations: str = "captions.json", images_dir: str = "images"
) -> CaptionSplit:
    """Images with their captions, in the order of the file's ``images`` list."""
    root = Path(root)
    path = root / annotations
    if not path.is_file():
        raise DataError(
            f"{path}: COCO-captions file not found; set data.train.annotations to its path "
            "under data.train.root (COCO: annotations/captions_train2017.json)"
        )
    img_dir = root / images_dir
    if not img_dir.is_dir():
        raise DataError(
            f"{img_dir}: image folder not found; set data.train.images_dir to the folder under "
            f"data.train.root that holds the images named in {annotations} (COCO: train2017)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations'")

    names: dict[int, tuple[str, int]] = {}  # image id -> (file name, index in images)
    for i, entry in enumerate(_entries(doc, "images", path)):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{path}, {where}: expected an object with id and file_name")
        image_id = _int(entry, "id", path, where)
        name = entry.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}, {where}: image {image_id} has no file_name")
        if image_id in names:
            raise DataError(
                f"{path}, {where}: image id {image_id} already used by images[{names[image_id][1]}]"
            )
        names[image_id] = (name.strip(), i)
    if not names:
        raise DataError(f"{path}: the 'images' list is empty")

    captions: dict[int, list[str]] = {image_id: [] for image_id in names}
    orphans = empty = 0
    for i, entry in enumerate(_entries(doc, "annotations", path)):
        where = f"annotations[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{path}, {where}: expected an object with image_id and caption")
        image_id = _int(entry, "image_id", path, where)
        caption = entry.get("caption")
        if not isinstance(caption, str):
            raise DataError(f"{path}, {where}: caption {caption!r} is not a string")
        if image_id not in captions:
            orphans += 1
            continue
        if not caption.strip():
            empty += 1
            continue
        captions[image_id].append(" ".join(caption.split()))
    if orphans:
        log.warning("%s: %d caption(s) name an image id not in 'images'; skipped", path, orphans)
    if empty:
        log.warning("%s: %d empty caption(s) skipped", path, empty)

    on_disk = {p.name for p in img_dir.iterdir()} if img_dir.is_dir() else set()
    images: list[CaptionImage] = []
    skipped: list[Skip] = []
    without = missing = 0
    for image_id, (name, index) in names.items():
        where = f"images[{index}] of {annotations}"
        if not captions[image_id]:
            without += 1
            skipped.append(Skip(name, index, f"no caption ({where}, id {image_id})"))
            continue
        file = img_dir / name
        if Path(name).name not in on_disk and not file.is_file():
            missing += 1
            skipped.append(Skip(name, index, f"listed in {where} but not found in {img_dir}"))
            continue
        images.append(CaptionImage(name, file, tuple(captions[image_id]), index, where))
    if without:
        log.warning("%s: %d image(s) have no caption; skipped", path, without)
    if missing:
        log.warning("%s: %d image(s) not found in %s; skipped", path, missing, img_dir)
    if not images:
        raise DataError(f"{path}: no image with a caption was found in {img_dir}")
    return CaptionSplit(
        root=root,
        images=images,
        skipped=skipped,
        lists=[annotations],
        counts={
            "orphan_captions": orphans,
            "empty_captions": empty,
            "images_without_captions": without,
            "missing_images": missing,
        },
    )
