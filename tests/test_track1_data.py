"""The Track 1 reader on the real 2026 sample CSVs and on each kind of bad input."""

from __future__ import annotations

import csv
import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, build_track_for
from PIL import Image

from lpcvlab.data.demo_retrieval import make_demo_retrieval_dataset
from lpcvlab.data.images import ImagePreprocess, load_images, tokenize
from lpcvlab.data.track1 import ImageRow, read_track1
from lpcvlab.errors import DataError, StorageError
from lpcvlab.models.clip import tokenizer_for

SAMPLE = DATA / "track1_sample"


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def _sample_with_images(tmp_path: Path) -> Path:
    """The real sample CSVs; each image's pixels encode its CSV row (to catch misalignment)."""
    root = tmp_path / "track1"
    (root / "images").mkdir(parents=True)
    for name in ("img_list.csv", "txt_list.csv"):
        shutil.copy(SAMPLE / name, root / name)
    # Written in reverse sorted order, so directory order helps no one.
    rows = _csv_rows(root / "img_list.csv")
    for i, (name, _) in sorted(enumerate(rows), key=lambda r: r[1][0], reverse=True):
        Image.new("RGB", (40 + i, 30), (i * 4, 0, 0)).save(root / "images" / name, format="PNG")
    return root


def test_real_sample_counts_missing_id_and_best_recall(tmp_path):
    ds = read_track1(_sample_with_images(tmp_path))
    assert len(ds.images) == 56
    assert len(ds.texts) == 211
    assert ds.missing_text_ids == [154]
    known = set(ds.texts)
    best = np.mean([len(set(r.text_ids) & known) / len(r.text_ids) for r in ds.images])
    assert best == pytest.approx(0.998214, abs=1e-6)


def test_real_sample_aligns_by_name_not_position(tmp_path):
    root = _sample_with_images(tmp_path)
    rows = _csv_rows(root / "img_list.csv")
    names = [r[0] for r in rows]
    assert sum(a != b for a, b in zip(names, sorted(names), strict=True)) == 10
    ds = read_track1(root)
    assert [r.name for r in ds.images] == names
    assert [";".join(map(str, r.text_ids)) for r in ds.images] == [r[1] for r in rows]
    arrays, kept, skipped = load_images(ds.images, ImagePreprocess())
    assert not skipped and len(kept) == 56
    red = arrays[:, 0].mean(axis=(1, 2)) * 255
    np.testing.assert_allclose(red, [i * 4 for i in range(56)], atol=0.6)


def test_official_image_preprocessing_is_resize_and_scale_only(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    x = ImagePreprocess()(img)
    expected = np.asarray(img.resize((224, 224)), dtype=np.float32).transpose(2, 0, 1) / 255.0
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    np.testing.assert_array_equal(x, expected)


def _demo(tmp_path: Path) -> Path:
    return make_demo_retrieval_dataset(tmp_path / "demo", num_images=6, seed=0)


def test_missing_image_is_skipped_and_counted(tmp_path):
    root = _demo(tmp_path)
    victim = _csv_rows(root / "img_list.csv")[2][0]
    (root / "images" / victim).unlink()
    ds = read_track1(root)
    assert len(ds.images) == 5
    assert ds.stats()["skipped_images"] == 1
    assert ds.skipped[0].file == victim and "row 4" in ds.skipped[0].reason


def test_image_not_in_csv_is_ignored_and_counted(tmp_path):
    root = _demo(tmp_path)
    Image.new("RGB", (8, 8)).save(root / "images" / "stray.png")
    ds = read_track1(root)
    assert ds.unlisted_images == ["stray.png"]
    assert len(ds.images) == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_or_truncated_image_is_skipped_with_its_row(tmp_path, damage):
    root = _demo(tmp_path)
    rows = _csv_rows(root / "img_list.csv")
    name = next(r[0] for r in rows if r[0].endswith(".jpg"))
    path = root / "images" / name
    data = path.read_bytes()
    path.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    ds = read_track1(root)
    arrays, kept, skipped = load_images(ds.images, ImagePreprocess())
    assert len(kept) == 5 and arrays.shape[0] == 5
    assert skipped[0].file == name and "row" in skipped[0].reason
    assert name not in [r.name for r in kept]


def test_image_above_pil_pixel_limit_is_skipped_with_its_row(tmp_path, monkeypatch):
    root = _demo(tmp_path)
    ds = read_track1(root)
    w, h = Image.open(ds.images[0].path).size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every demo image is far above 2 x 100
    arrays, kept, skipped = load_images(ds.images[:2], ImagePreprocess())
    assert not kept and arrays.shape == (0, 3, 224, 224)
    assert [s.file for s in skipped] == [r.name for r in ds.images[:2]]
    first = skipped[0]
    assert first.row == ds.images[0].row and f"row {first.row} of img_list.csv" in first.reason
    assert f"image has {w * h:,} pixels, above PIL's limit of 200" in first.reason
    assert "Image.MAX_IMAGE_PIXELS" in first.reason


def test_16_bit_grey_png_keeps_its_gradient(tmp_path):
    """PIL's convert("RGB") clips 16-bit values to white; they must be scaled instead."""
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    grey = np.tile(ramp, (64, 1))  # 64x64, dark on the left, white on the right
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    row = ImageRow(name="deep.png", path=path, text_ids=(1,), row=2)
    arrays, kept, skipped = load_images([row], ImagePreprocess(size=64))
    assert not skipped and arrays.shape == (1, 3, 64, 64)
    want = np.rint(grey.astype(np.float64) * 255 / 65535) / 255
    for c in range(3):
        np.testing.assert_allclose(arrays[0, c], want, atol=1e-6)
    assert arrays.min() == 0.0 and arrays.max() == 1.0 and (arrays < 0.5).mean() > 0.4


def test_32_bit_integer_and_float_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    cases = {
        "I as 16-bit": (np.tile(ramp * 65535, (32, 1)).round().astype(np.int32), 65535),
        "F in [0, 1]": (np.tile(ramp, (32, 1)), 1.0),
        "F in [0, 255]": (np.tile(ramp * 255, (32, 1)), 255.0),
    }
    for name, (data, full) in cases.items():
        img = Image.fromarray(data)
        assert img.mode in ("I", "F"), name
        x = ImagePreprocess(size=32)(img)
        want = np.rint(np.asarray(data[0], np.float64) * 255 / full) / 255
        np.testing.assert_allclose(x[0, 0], want, atol=1e-6, err_msg=name)
    # 32-bit integers outside 0..65535: the image's own range, stretched
    wide = Image.fromarray(np.tile(np.arange(-1000, 31000, 1000, dtype=np.int32), (32, 1)))
    x = ImagePreprocess(size=32)(wide)
    assert x.min() == 0.0 and x.max() == 1.0


def _rewrite(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n")


def test_wrong_header_stops_naming_file(tmp_path):
    root = _demo(tmp_path)
    _rewrite(root / "img_list.csv", "image,texts", ["a.jpg,1"])
    with pytest.raises(DataError, match=r"img_list\.csv: header .*Image_names,Text_nums"):
        read_track1(root)


def test_non_integer_id_stops_naming_row(tmp_path):
    root = _demo(tmp_path)
    rows = _csv_rows(root / "img_list.csv")
    lines = [f"{n},{ids}" for n, ids in rows]
    lines[1] = f"{rows[1][0]},3;x7"
    _rewrite(root / "img_list.csv", "Image_names,Text_nums", lines)
    with pytest.raises(DataError, match=r"img_list\.csv, row 3: .*'x7' is not an integer"):
        read_track1(root)


def test_duplicate_text_id_stops_naming_both_rows(tmp_path):
    root = _demo(tmp_path)
    _rewrite(root / "txt_list.csv", "Text_nums,Unique_Texts", ["1,a cat", "2,a dog", "1,a cow"])
    with pytest.raises(DataError, match=r"txt_list\.csv, row 4: text ID 1 already used on row 2"):
        read_track1(root)


@pytest.mark.parametrize("name", ["txt_list.csv", "img_list.csv"])
def test_a_csv_that_is_not_utf8_stops_naming_the_file_and_row(tmp_path, name):
    root = _demo(tmp_path)
    lines = (root / name).read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",", b",caf\xe9 ", 1)  # cp1252's e-acute, as Excel saves it
    (root / name).write_bytes(b"\n".join(lines))
    with pytest.raises(DataError) as info:
        read_track1(root)
    message = str(info.value)
    assert "\n" not in message
    assert f"{name}, row 4: not UTF-8 (byte 0xe9" in message and "save the file as UTF-8" in message


def test_text_ids_beyond_int16_are_warned_about(tmp_path, caplog):
    root = _demo(tmp_path)
    texts = _csv_rows(root / "txt_list.csv")
    texts[0][0] = "40000"
    _rewrite(root / "txt_list.csv", "Text_nums,Unique_Texts", [f'{i},"{t}"' for i, t in texts])
    images = _csv_rows(root / "img_list.csv")
    images[0][1] = "40000"
    _rewrite(root / "img_list.csv", "Image_names,Text_nums", [f"{n},{i}" for n, i in images])
    with caplog.at_level("WARNING", logger="lpcvlab.data.track1"):
        ds = read_track1(root)
    assert 40000 in ds.texts  # lpcvlab scores it; the warning says the official scorer cannot
    warned = [r.getMessage() for r in caplog.records if "int16" in r.getMessage()]
    assert len(warned) == 2
    assert "txt_list.csv: 1 text ID(s) outside -32768..32767 (first: 40000 on row 2)" in warned[0]
    assert "img_list.csv: 1 text ID(s) outside" in warned[1]


def test_empty_caption_is_skipped_and_counted(tmp_path):
    root = _demo(tmp_path)
    rows = _csv_rows(root / "txt_list.csv")
    rows[0][1] = "  "
    _rewrite(root / "txt_list.csv", "Text_nums,Unique_Texts", [f'{i},"{t}"' for i, t in rows])
    ds = read_track1(root)
    assert ds.empty_captions == [int(rows[0][0])]
    assert int(rows[0][0]) not in ds.texts
    assert int(rows[0][0]) in ds.missing_text_ids  # still a ground truth: stays in denominator


def test_long_caption_is_truncated_and_reported():
    from omegaconf import OmegaConf

    tok = tokenizer_for(OmegaConf.create({"model_name": "ViT-B-16"}))
    tokens, truncated = tokenize(["a short one", "word " * 100], tok)
    assert tokens.shape == (2, 77) and tokens.dtype == np.int64
    assert truncated == [1]
    assert tokens[1].argmax() == 76  # EOT kept at the last position: argmax pooling still works


def test_track_load_data_reports_skips(cfg_factory, tmp_path):
    cfg = cfg_factory()
    n = cfg.data.demo.num_images
    root = make_demo_retrieval_dataset(cfg.data.root, num_images=n, seed=cfg.seed)
    victim = _csv_rows(root / "img_list.csv")[0][0]
    (root / "images" / victim).write_bytes(b"\x89PNG broken")
    work = tmp_path / "work"
    work.mkdir()
    data = build_track_for(cfg).load_data(work)
    assert data.stats["skipped_images"] == 1.0
    assert data.stats["missing_text_ids"] >= 1.0  # the demo has one ID without a caption
    assert data.inputs["image_encoder"].shape == (n - 1, 3, 224, 224)
    assert data.inputs["text_encoder"].shape[1] == 77
    report = _csv_rows(work / "skipped.csv")
    assert report[0][0] == victim


def test_demo_dataset_is_deterministic(tmp_path):
    a = make_demo_retrieval_dataset(tmp_path / "a", num_images=5, seed=3)
    b = make_demo_retrieval_dataset(tmp_path / "b", num_images=5, seed=3)
    for name in ("img_list.csv", "txt_list.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    for p in (a / "images").iterdir():
        assert p.read_bytes() == (b / "images" / p.name).read_bytes()


def test_full_disk_generating_the_demo_images_names_the_file(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    root = tmp_path / "demo"
    with pytest.raises(StorageError, match="no space left") as e:
        make_demo_retrieval_dataset(root, num_images=3, seed=0)
    assert str(root / "images") in str(e.value)
    assert not (root / "demo.json").exists()  # the next call generates again
