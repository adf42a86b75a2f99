"""Track 1: rank captions for each image with CLIP encoders; score Recall@10 (official).

open_clip (and the torchvision it imports: seconds) is imported with the track, not inside the
data stage, so that ``stage_seconds/*`` measure the stages' own work.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from lpcvlab.config.schema import (
    ImagePreprocessConfig,
    RetrievalDataConfig,
    RetrievalTrackConfig,
    TrainConfig,
)
from lpcvlab.config.teacher import Teacher
from lpcvlab.data.demo_retrieval import make_demo_retrieval_dataset
from lpcvlab.data.images import ImagePreprocess, load_images, tokenize
from lpcvlab.data.track1 import ImageRow, content_sha256, read_track1
from lpcvlab.errors import ConfigError, DataError
from lpcvlab.metrics import cosine_similarity, recall_at_k
from lpcvlab.models.clip import CONTEXT_LENGTH, ClipBackbone, ImageEncoder, TextEncoder
from lpcvlab.tracks.base import TrackData, data_source
from lpcvlab.types import Component, DatasetRecord, EvalResult, ModelBundle, RunLog, TensorSpec

log = logging.getLogger(__name__)

IMAGE, TEXT = "image_encoder", "text_encoder"


@dataclass
class RetrievalPayload:
    images: list[ImageRow]  # aligned with inputs[IMAGE]
    text_ids: list[int]  # aligned with inputs[TEXT]
    missing_text_ids: list[int]


def host_preprocess(image: ImagePreprocessConfig) -> ImagePreprocess:
    """What happens to an image before upload; mean/std only when not baked into the model."""
    on_host = image.mean is not None and not image.normalize_in_model
    return ImagePreprocess(
        size=int(image.size),
        resample=image.resample,
        mean=tuple(image.mean) if on_host and image.mean else None,
        std=tuple(image.std) if on_host and image.std else None,
    )


def _write_skips(path: Path, skips) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "row", "reason"])
        w.writerows((s.file, s.row, s.reason) for s in skips)
    return path


class RetrievalTrack:
    name = "retrieval"

    def __init__(
        self,
        track: RetrievalTrackConfig,
        data: RetrievalDataConfig,
        image: ImagePreprocessConfig,
        backbone: ClipBackbone,
        seed: int = 0,
        teacher: Teacher | None = None,
    ) -> None:
        self.teacher = teacher  # train.distill.teacher, resolved (None: no distillation)
        self.settings = track
        self.data = data
        self.image = image
        self.backbone = backbone
        self.seed = seed

    def load_data(self, work_dir: Path, *, training: bool = False) -> TrackData:
        data = self.data
        assert data.root is not None  # checked when the config was loaded
        if data.demo is not None:
            make_demo_retrieval_dataset(data.root, num_images=data.demo.num_images, seed=self.seed)
        ds = read_track1(data.root, data.images_dir, data.img_list, data.txt_list)
        images, kept, unreadable = load_images(ds.images, host_preprocess(self.image))
        ds.skipped.extend(unreadable)
        if not kept:
            raise DataError(f"{ds.root}: no readable images; see the warnings above")

        text_ids = list(ds.texts)
        tokens, truncated = tokenize([ds.texts[t] for t in text_ids], self.backbone.tokenizer())
        if truncated:
            log.warning(
                "%d caption(s) longer than %d tokens were truncated: text IDs %s",
                len(truncated),
                CONTEXT_LENGTH,
                [text_ids[i] for i in truncated],
            )
        referenced = {t for r in kept for t in r.text_ids}
        missing = sorted(referenced - set(text_ids))
        stats = ds.stats() | {
            "images": len(kept),
            "truncated_captions": len(truncated),
            "missing_text_ids": len(missing),
        }
        reports = []
        if ds.skipped:
            reports.append(_write_skips(work_dir / "skipped.csv", ds.skipped))
        evaluation = DatasetRecord(
            name=data.name,
            context="evaluation",
            source=data_source(data),
            sha256=content_sha256(ds.root, [data.img_list, data.txt_list], kept),
            profile={"images": len(kept), "texts": len(text_ids)},
        )
        return TrackData(
            inputs={IMAGE: images, TEXT: tokens},
            stats={k: float(v) for k, v in stats.items()},
            reports=reports,
            payload=RetrievalPayload(kept, text_ids, missing),
            datasets=[evaluation],
        )

    def build_model(self) -> ModelBundle:
        model, weights = self.backbone.build()
        image = self.image
        bake = image.mean is not None and image.normalize_in_model
        size = int(image.size)
        return ModelBundle(
            components=[
                Component(
                    IMAGE,
                    ImageEncoder(model, image.mean if bake else None, image.std if bake else None),
                    TensorSpec("image", (1, 3, size, size), "float32"),
                ),
                Component(
                    TEXT, TextEncoder(model), TensorSpec("text", (1, CONTEXT_LENGTH), "int64")
                ),
            ],
            weights=weights,
            model=model,
        )

    def train(
        self,
        bundle: ModelBundle,
        data: TrackData,
        settings: TrainConfig,
        run: RunLog,
        work_dir: Path,
    ) -> ModelBundle:
        raise ConfigError(f"train={settings.name} is not available for track=retrieval")

    def evaluate(
        self, data: TrackData, outputs: dict[str, np.ndarray], work_dir: Path
    ) -> EvalResult:
        payload: RetrievalPayload = data.payload
        img_emb, txt_emb = outputs[IMAGE], outputs[TEXT]
        if len(img_emb) != len(payload.images) or len(txt_emb) != len(payload.text_ids):
            raise DataError(
                f"got {len(img_emb)} image / {len(txt_emb)} text embeddings for "
                f"{len(payload.images)} images / {len(payload.text_ids)} texts"
            )
        sim = cosine_similarity(img_emb, txt_emb)
        gt = [r.text_ids for r in payload.images]
        ks = sorted({int(k) for k in self.settings.recall_ks} | {10})
        res = recall_at_k(sim, payload.text_ids, gt, ks=ks)
        known = set(payload.text_ids)
        best = float(np.mean([len(set(g) & known) / len(g) for g in gt]))
        metrics = {f"recall_at_{k}": v for k, v in res.recall.items()}
        metrics |= {"hit_at_10": res.hit_at_10, "best_achievable_recall_at_10": best}

        per_image = work_dir / "per_image_results.csv"
        with open(per_image, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["image", "csv_row", "ground_truth_ids", "top10_ids", "hits_at_10"]
                + [f"recall_at_{k}" for k in ks]
            )
            for i, row in enumerate(payload.images):
                w.writerow(
                    [
                        row.name,
                        row.row,
                        ";".join(map(str, row.text_ids)),
                        ";".join(map(str, res.top10[i].tolist())),
                        int(res.per_image_hits[i]),
                    ]
                    + [f"{res.per_image_recall[k][i]:.6f}" for k in ks]
                )
        emb = work_dir / "embeddings.h5"
        with h5py.File(emb, "w") as f:
            f["image_embeddings"] = img_emb
            f["text_embeddings"] = txt_emb
            f["image_names"] = np.array([r.name for r in payload.images], dtype=h5py.string_dtype())
            f["text_ids"] = np.asarray(payload.text_ids, dtype=np.int64)
        return EvalResult(
            metrics=metrics,
            artifacts=[per_image, emb],
            summary={"missing_text_ids": payload.missing_text_ids},
        )
