"""Reader for the official LPCVC 2026 Track 1 layout.

``root/<images_dir>/`` + ``img_list.csv`` (``Image_names,Text_nums``; ``Text_nums`` is a
``;``-separated list of ground-truth text IDs) + ``txt_list.csv`` (``Text_nums,Unique_Texts``).

Policy for bad input (each counted and reported; never a silent shift of rows):

* wrong header, non-integer or duplicate text ID, duplicate image row, a row with no IDs, a
  CSV that is not UTF-8: stop before any compute, naming the file and row;
* a text ID outside int16: warned about (the official scorer casts IDs to int16, so it can never
  match there), scored here as it is;
* image named in ``img_list.csv`` but missing from the folder, unreadable/truncated, or above
  PIL's pixel limit: skipped, counted (``data/skipped_images``) and listed in ``skipped.csv``;
* 16-bit (or 32-bit) grey image: scaled to 8 bits, not clipped to white (``data.images``);
* image in the folder but not in ``img_list.csv``: ignored, counted (``data/unlisted_images``);
* empty caption: that text is skipped (it can never be ranked), counted (``data/empty_captions``);
* ground-truth ID with no text (the 2026 sample has one, ID 154): reported and kept in the
  denominator, as the official metric keeps it.

Images are aligned to ground truth by file name, never by position.

A training split (``data.train``) is read into a :class:`CaptionSplit` -- images, each with its
captions -- from the same layout (:func:`read_official_captions`) or from COCO-captions JSON
(:mod:`lpcvlab.data.coco`), with the same rules: structural errors stop naming the file and row,
missing images and images left without a caption are skipped, counted and listed.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lpcvlab.config.schema import RetrievalTrainSplitConfig
from lpcvlab.data.captions import CaptionImage, CaptionSplit, Skip
from lpcvlab.data.coco import read_coco_captions
from lpcvlab.errors import DataError
from lpcvlab.util.hashing import file_sha256, manifest_sha256

log = logging.getLogger(__name__)

IMG_HEADER = ["Image_names", "Text_nums"]
TXT_HEADER = ["Text_nums", "Unique_Texts"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageRow:
    """One row of ``img_list.csv``: the image file and its ground-truth text IDs."""

    name: str
    path: Path
    text_ids: tuple[int, ...]
    row: int  # 1-based line number in the CSV (header is line 1)


@dataclass
class Track1Dataset:
    root: Path
    images: list[ImageRow]  # CSV order, only images that exist
    texts: dict[int, str]  # text ID -> caption, CSV order, non-empty captions only
    missing_text_ids: list[int]  # ground-truth IDs that have no caption
    skipped: list[Skip] = field(default_factory=list)
    unlisted_images: list[str] = field(default_factory=list)
    empty_captions: list[int] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        return {
            "images": len(self.images),
            "texts": len(self.texts),
            "skipped_images": len(self.skipped),
            "unlisted_images": len(self.unlisted_images),
            "empty_captions": len(self.empty_captions),
            "missing_text_ids": len(self.missing_text_ids),
        }


def _decode(path: Path) -> str:
    """The file's text (UTF-8, with or without a BOM); a byte that is not UTF-8 stops the run
    naming the file and the row (the line, the header being row 1)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}, row {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
            "save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
        ) from None


def _read_csv(path: Path, header: list[str]) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found. Point data.root at a folder that has it.")
    with io.StringIO(_decode(path), newline="") as f:
        reader = csv.reader(f)
        try:
            got = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file; expected the header {','.join(header)}") from None
        if [h.strip() for h in got] != header:
            raise DataError(
                f"{path}: header is {','.join(got)!r}, expected {','.join(header)!r} "
                "(the official LPCVC Track 1 format)"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                raise DataError(
                    f"{path}, row {line}: expected 2 fields ({','.join(header)}), got {len(row)}: "
                    f"{row!r}. Quote captions that contain commas."
                )
            rows.append((line, row))
        return rows


def _parse_id(value: str, path: Path, line: int, field_name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(
            f"{path}, row {line}: {field_name} {value!r} is not an integer text ID"
        ) from None


# The official scorer reads ground-truth text IDs as int16 (its parse_ground_truth).
INT16_MAX = 32767


def _warn_int16(path: Path, ids: list[tuple[int, int]]) -> None:
    """Warn about text IDs (row, ID) outside int16: the official scorer wraps them around, so
    they can never match there, whatever lpcvlab scores."""
    wide = [(line, tid) for line, tid in ids if not -INT16_MAX - 1 <= tid <= INT16_MAX]
    if wide:
        line, tid = wide[0]
        log.warning(
            "%s: %d text ID(s) outside -32768..32767 (first: %d on row %d): the official scorer "
            "reads text IDs as int16, where they wrap around and never match; renumber them "
            "below 32768 to be scored the same there",
            path,
            len(wide),
            tid,
            line,
        )


def read_texts(path: Path) -> tuple[dict[int, str], list[int]]:
    """Caption per text ID (CSV order) and the IDs whose caption is empty."""
    texts: dict[int, str] = {}
    seen: dict[int, int] = {}
    empty: list[int] = []
    for line, (raw_id, caption) in _read_csv(path, TXT_HEADER):
        tid = _parse_id(raw_id, path, line, "Text_nums")
        if tid in seen:
            raise DataError(f"{path}, row {line}: text ID {tid} already used on row {seen[tid]}")
        seen[tid] = line
        if not caption.strip():
            log.warning("%s, row %d: empty caption for text ID %d; skipped", path, line, tid)
            empty.append(tid)
            continue
        texts[tid] = caption.strip()
    if not texts:
        raise DataError(f"{path}: no captions")
    _warn_int16(path, [(line, tid) for tid, line in seen.items()])
    return texts, empty


def read_image_list(path: Path, images_dir: Path) -> list[ImageRow]:
    rows: list[ImageRow] = []
    seen: dict[str, int] = {}
    ids_by_row: list[tuple[int, int]] = []
    for line, (name, ids) in _read_csv(path, IMG_HEADER):
        name = name.strip()
        if not name:
            raise DataError(f"{path}, row {line}: empty image name")
        if name in seen:
            raise DataError(f"{path}, row {line}: image {name} already listed on row {seen[name]}")
        seen[name] = line
        parts = [p for p in ids.split(";") if p.strip()]
        if not parts:
            raise DataError(f"{path}, row {line}: image {name} has no ground-truth text IDs")
        text_ids = tuple(_parse_id(p, path, line, "Text_nums entry") for p in parts)
        if len(set(text_ids)) != len(text_ids):
            raise DataError(f"{path}, row {line}: image {name} lists a text ID twice: {ids!r}")
        rows.append(ImageRow(name=name, path=images_dir / name, text_ids=text_ids, row=line))
        ids_by_row += [(line, t) for t in text_ids]
    if not rows:
        raise DataError(f"{path}: no image rows")
    _warn_int16(path, ids_by_row)
    return rows


def content_sha256(root: Path, lists: Sequence[str], images: Sequence[ImageRow]) -> str:
    """The content hash of what a run reads: the CSVs and every image it decoded, by name, so
    that the same files give the same digest whatever the preprocessing."""
    entries = [(name, file_sha256(Path(root) / name)) for name in lists]
    entries += [(f"images/{r.name}", file_sha256(r.path)) for r in images]
    return manifest_sha256(entries)


def read_track1(
    root: Path | str,
    images_dir: str = "images",
    img_list: str = "img_list.csv",
    txt_list: str = "txt_list.csv",
) -> Track1Dataset:
    """Read and cross-check the three parts of a Track 1 dataset; no image is decoded here."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data.root is not a directory")
    img_dir = root / images_dir
    if not img_dir.is_dir():
        raise DataError(
            f"{img_dir}: image folder not found; set data.images_dir to the folder (under "
            f"data.root) that holds the images named in {img_list}"
        )
    texts, empty = read_texts(root / txt_list)
    rows = read_image_list(root / img_list, img_dir)

    on_disk = {p.name for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    listed = {r.name for r in rows}
    present, skipped = [], []
    for r in rows:
        if r.name in on_disk or r.path.is_file():
            present.append(r)
        else:
            msg = f"listed in {img_list} row {r.row} but not found in {img_dir}"
            log.warning("%s: %s; skipped", r.name, msg)
            skipped.append(Skip(r.name, r.row, msg))
    unlisted = sorted(on_disk - listed)
    if unlisted:
        log.warning(
            "%d image(s) in %s are not in %s and are ignored: %s",
            len(unlisted),
            img_dir,
            img_list,
            ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else ""),
        )
    referenced = {t for r in present for t in r.text_ids}
    missing = sorted(referenced - set(texts))
    if missing:
        log.warning(
            "%d ground-truth text ID(s) have no caption in %s and stay in the recall "
            "denominator (as the official metric does): %s",
            len(missing),
            txt_list,
            missing,
        )
    if not present:
        raise DataError(f"{root}: none of the images in {img_list} were found in {img_dir}")
    return Track1Dataset(
        root=root,
        images=present,
        texts=texts,
        missing_text_ids=missing,
        skipped=skipped,
        unlisted_images=unlisted,
        empty_captions=empty,
    )


# --------------------------------------------------------------------------- training split


def read_official_captions(
    root: Path | str,
    images_dir: str = "images",
    img_list: str = "img_list.csv",
    txt_list: str = "txt_list.csv",
) -> CaptionSplit:
    """A training split in the official layout: each image's captions are the texts of its
    ground-truth IDs (IDs without a text are counted; an image left with none is skipped)."""
    ds = read_track1(root, images_dir, img_list, txt_list)
    images, skipped = [], list(ds.skipped)
    for r in ds.images:
        captions = tuple(ds.texts[t] for t in r.text_ids if t in ds.texts)
        if not captions:
            skipped.append(
                Skip(
                    r.name,
                    r.row,
                    f"no caption for its text IDs (row {r.row} of "
                    f"{img_list}: {';'.join(map(str, r.text_ids))})",
                )
            )
            continue
        images.append(CaptionImage(r.name, r.path, captions, r.row, f"row {r.row} of {img_list}"))
    if not images:
        raise DataError(f"{ds.root}: no image in {img_list} has a caption in {txt_list}")
    return CaptionSplit(
        root=ds.root,
        images=images,
        skipped=skipped,
        lists=[img_list, txt_list],
        counts={
            "missing_images": len(ds.skipped),
            "unlisted_images": len(ds.unlisted_images),
            "empty_captions": len(ds.empty_captions),
            "missing_text_ids": len(ds.missing_text_ids),
            "images_without_captions": len(skipped) - len(ds.skipped),
        },
    )


def read_caption_split(train: RetrievalTrainSplitConfig) -> CaptionSplit:
    """The training split ``data.train`` names, in its format."""
    assert train.root is not None  # checked when the config was loaded
    if train.format == "coco":
        return read_coco_captions(train.root, train.annotations, train.images_dir)
    return read_official_captions(train.root, train.images_dir, train.img_list, train.txt_list)
