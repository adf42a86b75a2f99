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
    """Rows scaled to unit L2 norm, in float32 (as the official PyTorch code computes them)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float32).tiny)


def cosine_similarity(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """``(n_images, n_texts)`` float32 cosine similarity of L2-normalised embeddings."""
    return l2_normalize(image_emb) @ l2_normalize(text_emb).T


# Elements of one row block of the similarity matrix handled at a time by :func:`top_k_indices`:
# a few arrays of this size are alive at once (about 16 MB), whatever the matrix.
BLOCK_ELEMENTS = 1 << 20


def _ordering_keys(block: np.ndarray) -> np.ndarray:
    """Integers that order like the values (larger = better) with the ties and NaNs of
    ``np.argsort(-row, kind="stable")``: -0.0 equals 0.0, and NaN ranks after everything
    (after -inf), every NaN equal to every other. Only needed for blocks that hold a NaN."""
    itype = np.int32 if block.dtype == np.float32 else np.int64
    bits = (block + 0.0).view(itype)  # + 0.0 turns -0.0 into 0.0
    # IEEE floats ordered as integers: flip the magnitude bits of negative numbers.
    keys = np.where(bits < 0, bits ^ np.array(np.iinfo(itype).max, itype), bits)
    return np.where(np.isnan(block), np.array(np.iinfo(itype).min, itype), keys)


def _block_top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Top ``k`` columns of each row of ``values`` (larger = better, no NaN), ties in column
    order: a partial selection finds each row's k-th best value; every better column and the
    first tied ones up to ``k`` are kept, then only those ``k`` are sorted."""
    n = values.shape[1]
    descending = np.invert if values.dtype.kind == "i" else np.negative  # no overflow for ints
    if k == n:
        return np.argsort(descending(values), axis=1, kind="stable")
    kth = np.partition(values, n - k, axis=1)[:, n - k : n - k + 1]  # the k-th best per row
    take = values > kth
    ties = values == kth
    need = k - take.sum(axis=1, dtype=np.int32)
    crowded = ties.sum(axis=1, dtype=np.int32) > need  # more ties than places left
    take |= ties
    if crowded.any():  # keep the first tied columns only, in column order
        rows = np.flatnonzero(crowded)
        first = np.cumsum(ties[rows], axis=1, dtype=np.int32) <= need[rows, None]
        take[rows] &= ~ties[rows] | first
    cols = np.nonzero(take)[1].reshape(-1, k)  # row-major: ascending columns in each row
    order = np.argsort(descending(np.take_along_axis(values, cols, axis=1)), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def top_k_indices(
    similarity: np.ndarray, k: int, block_elements: int = BLOCK_ELEMENTS
) -> np.ndarray:
    """The ``k`` best columns of each row, best first: exactly
    ``np.argsort(-row, kind="stable")[:k]`` for every row (ties in column order, NaN last),
    computed with a partial selection (``np.partition``) over row blocks in the matrix's own
    float dtype, so time grows with the matrix and memory with one block, never a full sort."""
    s = np.asarray(similarity)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32 if s.dtype == np.float16 else np.float64)
    n_rows, n_cols = s.shape
    k = min(int(k), n_cols)
    out = np.empty((n_rows, k), dtype=np.int64)
    if k == 0 or n_rows == 0:
        return out
    step = max(1, block_elements // n_cols)
    for start in range(0, n_rows, step):
        block = s[start : start + step]
        if np.isnan(block).any():
            block = _ordering_keys(block)
        out[start : start + step] = _block_top_k(block, k)
    return out


def top_k_ids(similarity: np.ndarray, text_ids: Sequence[int], k: int) -> np.ndarray:
    """The ``k`` best text IDs per image, best first (ties broken by column order)."""
    return np.asarray(text_ids)[top_k_indices(similarity, k)]


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
    """Fractional recall@K per image and averaged, plus hit@10 (any ground truth in the top 10).

    The ranking is the official per-row one (each image's texts sorted by similarity, ties in
    column order) computed by :func:`top_k_indices`: partial top-k, in the similarity's own
    dtype (float32 from :func:`cosine_similarity`), memory bounded by a row block.
    """
    if similarity.shape != (len(ground_truth), len(text_ids)):
        raise ValueError(
            f"similarity is {similarity.shape}, expected ({len(ground_truth)}, {len(text_ids)})"
        )
    for i, gt in enumerate(ground_truth):
        if len(gt) == 0:
            raise ValueError(f"image row {i} has no ground-truth text IDs")
    ranked = top_k_ids(similarity, text_ids, max(max(ks), 10))
    gt_sets = [set(gt) for gt in ground_truth]
    per_image: dict[int, np.ndarray] = {}
    for k in ks:
        per_image[k] = np.array(
            [len(set(ranked[i, :k].tolist()) & gt) / len(gt) for i, gt in enumerate(gt_sets)],
            dtype=np.float64,
        )
    hits10 = np.array(
        [len(set(ranked[i, :10].tolist()) & gt) for i, gt in enumerate(gt_sets)], dtype=np.int64
    )
    return RecallResult(
        recall={k: float(v.mean()) for k, v in per_image.items()},
        hit_at_10=float((hits10 > 0).mean()),
        per_image_recall=per_image,
        per_image_hits=hits10,
        top10=ranked[:, :10],
    )


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_ids: Sequence[int],
    ground_truth: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> RecallResult:
    """Recall@K of embeddings: what the final score and validation during training both use."""
    return recall_at_k(cosine_similarity(image_emb, text_emb), text_ids, ground_truth, ks)


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
