"""Scores with the official semantics.

Track 1: for each image, |top-K predicted text IDs ∩ ground-truth IDs| / |ground-truth IDs|,
averaged over images (fractional recall); ground-truth IDs that have no text stay in the
denominator, as the organisers' script keeps them. Track 2: top-k accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (flattened)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, np.finfo(np.float64).tiny)
    # Two all-zero outputs agree exactly; a zero output against a non-zero one does not (cos 0).
    return np.where((na == 0) & (nb == 0), 1.0, cos)


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio of ``other`` against ``reference`` in dB (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    out = np.asarray(other, dtype=np.float64).reshape(-1)
    mse = float(np.mean((ref - out) ** 2)) if ref.size else 0.0
    if mse == 0.0:
        return math.inf
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    return 10.0 * math.log10(max(peak * peak, np.finfo(np.float64).tiny) / mse)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float64).tiny)


def cosine_similarity(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """``(n_images, n_texts)`` cosine similarity of L2-normalised embeddings."""
    return l2_normalize(image_emb) @ l2_normalize(text_emb).T


def top_k_ids(similarity: np.ndarray, text_ids: Sequence[int], k: int) -> np.ndarray:
    """The ``k`` best text IDs per image, best first (ties broken by column order)."""
    ids = np.asarray(text_ids)
    k = min(k, similarity.shape[1])
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return ids[order]


@dataclass
class RecallResult:
    recall: dict[int, float]  # K -> fractional recall@K (official at K=10)
    hit_at_10: float
    per_image_recall: dict[int, np.ndarray]  # K -> (n_images,)
    per_image_hits: np.ndarray  # (n_images,) count of ground-truth IDs in the top 10
    top10: np.ndarray  # (n_images, <=10) predicted text IDs


def recall_at_k(
    similarity: np.ndarray,
    text_ids: Sequence[int],
    ground_truth: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> RecallResult:
    """Fractional recall@K per image and averaged, plus hit@10 (any ground truth in the top 10)."""
    if similarity.shape != (len(ground_truth), len(text_ids)):
        raise ValueError(
            f"similarity is {similarity.shape}, expected ({len(ground_truth)}, {len(text_ids)})"
        )
    for i, gt in enumerate(ground_truth):
        if len(gt) == 0:
            raise ValueError(f"image row {i} has no ground-truth text IDs")
    ranked = top_k_ids(similarity, text_ids, max(max(ks), 10))
    per_image: dict[int, np.ndarray] = {}
    for k in ks:
        per_image[k] = np.array(
            [
                len(set(ranked[i, :k].tolist()) & set(gt)) / len(set(gt))
                for i, gt in enumerate(ground_truth)
            ]
        )
    hits10 = np.array(
        [len(set(ranked[i, :10].tolist()) & set(gt)) for i, gt in enumerate(ground_truth)]
    )
    return RecallResult(
        recall={k: float(v.mean()) for k, v in per_image.items()},
        hit_at_10=float((hits10 > 0).mean()),
        per_image_recall=per_image,
        per_image_hits=hits10,
        top10=ranked[:, :10],
    )


def top_k_accuracy(scores: np.ndarray, labels: Sequence[int], k: int) -> float:
    """Share of rows whose true label is among the ``k`` highest scores."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)
