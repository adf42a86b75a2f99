"""Track 1 training split readers: COCO-captions JSON and the official layout, each kind of bad
input named (file and row or entry) or skipped and counted; the decode cache; the demo split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpcvlab.data.coco import read_coco_captions
from lpcvlab.data.demo_retrieval import (
    make_demo_retrieval_dataset,
    make_demo_training_split,
)
from lpcvlab.data.images import ImagePreprocess, decode_training_images
from lpcvlab.data.track1 import read_official_captions
from lpcvlab.errors import DataError


def _coco(root: Path, doc: dict, names=("a.jpg", "b.png", "c.jpg")) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (30 + i, 20), (40 * i, 0, 0)).save(root / "images" / name)
    (root / "captions.json").write_text(json.dumps(doc))
    return root


GOOD = {
    "images": [
        {"id": 7, "file_name": "a.jpg"},
        {"id": 3, "file_name": "b.png"},
        {"id": 9, "file_name": "c.jpg"},
    ],
    "annotations": [
        {"image_id": 7, "caption": "a red  square"},
        {"image_id": 3, "caption": "a green circle"},
        {"image_id": 7, "caption": "the red one"},
        {"image_id": 9, "caption": "a blue cross"},
    ],
}


def test_coco_reader_keeps_file_order_and_every_caption(tmp_path):
    split = read_coco_captions(_coco(tmp_path, GOOD))
    assert [i.name for i in split.images] == ["a.jpg", "b.png", "c.jpg"]
    assert split.images[0].captions == ("a red square", "the red one")  # spaces collapsed
    assert split.images[1].where == "images[1] of captions.json"
    assert split.stats()["captions"] == 4 and split.lists == ["captions.json"]


def test_coco_reader_skips_and_counts_what_it_can(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    doc["annotations"] += [
        {"image_id": 42, "caption": "no such image"},
        {"image_id": 3, "caption": "   "},
    ]
    doc["images"].append({"id": 11, "file_name": "d.jpg"})  # no caption
    doc["images"].append({"id": 12, "file_name": "gone.jpg"})
    doc["annotations"].append({"image_id": 12, "caption": "a missing file"})
    split = read_coco_captions(_coco(tmp_path, doc))
    assert [i.name for i in split.images] == ["a.jpg", "b.png", "c.jpg"]
    stats = split.stats()
    assert stats["orphan_captions"] == 1 and stats["empty_captions"] == 1
    assert stats["images_without_captions"] == 1 and stats["missing_images"] == 1
    reasons = {s.file: (s.row, s.reason) for s in split.skipped}
    assert reasons["d.jpg"][0] == 3 and "no caption (images[3]" in reasons["d.jpg"][1]
    assert reasons["gone.jpg"][0] == 4 and "not found" in reasons["gone.jpg"][1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("annotations"), r"no 'annotations' list"),
        (lambda d: d["images"][1].update(id="x"), r"images\[1\]: id 'x' is not an integer"),
        (lambda d: d["images"][2].update(id=7), r"images\[2\]: image id 7 already used"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\]: image 7 has no file_name"),
        (lambda d: d["annotations"][1].pop("image_id"), r"annotations\[1\]: image_id None"),
        (lambda d: d["annotations"][3].update(caption=5), r"annotations\[3\]: caption 5"),
    ],
)
def test_coco_reader_stops_naming_the_file_and_entry(tmp_path, change, message):
    doc = json.loads(json.dumps(GOOD))
    change(doc)
    root = _coco(tmp_path, doc)
    with pytest.raises(DataError, match=message) as err:
        read_coco_captions(root)
    assert str(root / "captions.json") in str(err.value)


def test_coco_reader_names_a_broken_or_missing_file(tmp_path):
    root = _coco(tmp_path, GOOD)
    (root / "captions.json").write_text("{not json")
    with pytest.raises(DataError, match="captions.json: not a JSON file"):
        read_coco_captions(root)
    with pytest.raises(DataError, match="data.train.annotations"):
        read_coco_captions(root, annotations="annotations/captions_train2017.json")


def test_official_training_split_reads_captions_and_skips_rows(tmp_path):
    root = tmp_path / "train"
    (root / "images").mkdir(parents=True)
    for name in ("one.jpg", "two.jpg", "three.jpg"):
        Image.new("RGB", (20, 20)).save(root / "images" / name)
    (root / "img_list.csv").write_text(
        "Image_names,Text_nums\none.jpg,1;2\ntwo.jpg,9\nthree.jpg,3\nfour.jpg,4\n"
    )
    (root / "txt_list.csv").write_text(
        "Text_nums,Unique_Texts\n1,a cat\n2,a black cat\n3,a dog\n4,x\n"
    )
    split = read_official_captions(root)
    assert [(i.name, i.captions) for i in split.images] == [
        ("one.jpg", ("a cat", "a black cat")),
        ("three.jpg", ("a dog",)),
    ]
    skipped = {s.file: (s.row, s.reason) for s in split.skipped}
    assert skipped["two.jpg"][0] == 3 and "no caption for its text IDs" in skipped["two.jpg"][1]
    assert skipped["four.jpg"][0] == 5 and "not found" in skipped["four.jpg"][1]
    assert split.stats()["images_without_captions"] == 1
    assert split.stats()["missing_images"] == 1
    (root / "img_list.csv").write_text("Image_names,Text_nums\none.jpg,1;x\n")
    with pytest.raises(DataError, match=r"img_list\.csv, row 2: .*'x' is not an integer"):
        read_official_captions(root)


def test_training_images_are_decoded_once_and_bad_ones_reported_each_time(tmp_path):
    root = _coco(tmp_path / "coco", GOOD)
    (root / "images" / "b.png").write_bytes(b"\x89PNG broken")
    split = read_coco_captions(root)
    pre = ImagePreprocess(size=32)
    first = decode_training_images(split, pre, tmp_path / "cache")
    assert not first.reused and [i.name for i in first.images] == ["a.jpg", "c.jpg"]
    assert first.pixels.shape == (2, 3, 32, 32) and first.pixels.dtype == np.uint8
    ((name, row, reason),) = [(s.file, s.row, s.reason) for s in first.skipped]
    assert name == "b.png" and row == 1 and "images[1] of captions.json" in reason
    # The cached pixels scale to exactly what the evaluation path computes.
    with Image.open(root / "images" / "c.jpg") as img:
        np.testing.assert_array_equal(pre.scale(first.pixels[1]), pre(img))
    again = decode_training_images(split, pre, tmp_path / "cache")
    assert again.reused and again.sha256 == first.sha256
    np.testing.assert_array_equal(np.asarray(again.pixels), np.asarray(first.pixels))
    assert [s.file for s in again.skipped] == ["b.png"]
    Image.new("RGB", (31, 20), (1, 2, 3)).save(root / "images" / "a.jpg")  # content changed
    changed = decode_training_images(split, pre, tmp_path / "cache")
    assert not changed.reused and changed.sha256 != first.sha256


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def test_demo_training_split_shows_other_images_in_the_same_words(tmp_path):
    root = make_demo_retrieval_dataset(tmp_path / "demo", num_images=40, seed=0)
    train = make_demo_training_split(root, num_images=30, eval_images=40, seed=0)
    assert train == root / "train"
    eval_captions = {t for _, t in _rows(root / "txt_list.csv")}
    train_captions = {t for _, t in _rows(train / "txt_list.csv")}
    # Each image's full description appears in one split only: no evaluation image is trained on.
    full = {c for c in eval_captions if " on a " in c}
    assert full and not full & train_captions
    words = lambda texts: {w for t in texts for w in t.split()}  # noqa: E731
    assert words(eval_captions) == words(train_captions)  # the same vocabulary
    assert len(_rows(train / "img_list.csv")) == 30
    assert all(len(ids.split(";")) == 3 for _, ids in _rows(train / "img_list.csv"))
    split = read_official_captions(train)
    assert len(split.images) == 30 and not split.skipped
    # Asking again is a no-op; another size regenerates without leftovers.
    before = (train / "img_list.csv").read_bytes()
    make_demo_training_split(root, num_images=30, eval_images=40, seed=0)
    assert (train / "img_list.csv").read_bytes() == before
    make_demo_training_split(root, num_images=12, eval_images=40, seed=0)
    assert len(list((train / "images").iterdir())) == 12
