"""Scores with the official semantics.

Track 1: for each image, |top-K predicted text IDs ∩ ground-truth IDs| / |ground-truth IDs|,
averaged over images (fractional recall); ground-truth IDs that have no text stay in the
denominator, as the organisers' script keeps them. Track 2: top-k accuracy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

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


def _official_normalised(emb: np.ndarray, what: str) -> np.ndarray:
    """``np.vstack`` of the rows divided by their ``np.linalg.norm``, in the rows' own dtype:
    the first two steps of the official ``evaluate_track1``. A zero or non-finite row would make
    the official scorer fail (sklearn rejects the NaN it becomes), so it is named here instead."""
    x = np.vstack([row for row in emb])
    with np.errstate(divide="ignore", invalid="ignore"):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(
            f"{what}: {bad.size} row(s) are all zeros or not finite (rows {bad[:5].tolist()}); "
            "the official evaluate_track1 cannot score them (their normalised embedding is NaN). "
            "Check the encoder's outputs (a collapsed or overflowing quantized model?)"
        )
    return x


def cosine_similarity(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """``(n_images, n_texts)`` cosine similarity computed exactly as the official
    ``evaluate_track1`` computes it, so that ties (and their bits) are the organisers': rows
    L2-normalised with numpy in their own dtype, then ``sklearn.metrics.pairwise.
    cosine_similarity`` (which normalises again and multiplies; float32 stays float32)."""
    from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

    img = _official_normalised(image_emb, "image embeddings")
    txt = _official_normalised(text_emb, "text embeddings")
    return sk_cosine(img, txt)


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


def _equal_neighbours(values: np.ndarray) -> np.ndarray:
    """``values[:, j] == values[:, j + 1]``, NaN equal to NaN (as a sort sees them)."""
    nan = np.isnan(values)
    return (values[:, 1:] == values[:, :-1]) | (nan[:, 1:] & nan[:, :-1])


@dataclass
class OfficialRanking:
    """The top-k columns of each row in the official order, and where ties were met."""

    indices: np.ndarray  # (n_rows, k): np.argsort(-row)[:k] of every row
    sorted_rows: np.ndarray  # (n_rows,) bool: rows ranked by np.argsort (a tie across a cut)
    values: np.ndarray  # (n_rows, min(k + 1, n_cols)) the best values of each row, best first


def official_top_k(
    similarity: np.ndarray, k: int, cuts: Sequence[int] | None = None
) -> OfficialRanking:
    """``np.argsort(-similarity[i])[:k]`` for every row ``i``, as ``evaluate_track1`` ranks.

    numpy's default sort is not stable: where values tie, its order is whatever the sort
    implementation gives (it can differ with the CPU's SIMD support and the numpy version). A
    row whose top ``c`` is one set whatever the sort (the ``c``-th and ``c + 1``-th best values
    differ) for every cut ``c`` in ``cuts`` is ranked by the fast partial selection
    (:func:`top_k_indices`); a row with a tie across a cut is ranked by ``np.argsort(-row)``
    itself, exactly as the official code. ``cuts=None``: every position, so that even the order
    inside the top ``k`` is numpy's; with ``cuts``, tied values between two cuts keep column
    order (no top-``c`` set depends on it).
    """
    s = np.asarray(similarity)
    n_rows, n_cols = s.shape
    k = min(int(k), n_cols)
    probe = top_k_indices(s, min(k + 1, n_cols))
    values = np.take_along_axis(s, probe, axis=1)
    same = _equal_neighbours(values)  # same[:, j]: the (j+1)-th and (j+2)-th best are equal
    at = range(1, k + 1) if cuts is None else cuts
    cols = sorted({int(c) - 1 for c in at if 0 < int(c) < values.shape[1]})
    tied = same[:, cols].any(axis=1) if cols else np.zeros(n_rows, dtype=bool)
    out = probe[:, :k].copy()
    for i in np.flatnonzero(tied):
        out[i] = np.argsort(-s[i])[:k]
    return OfficialRanking(out, tied, values)


def _tie_hit_range(row: np.ndarray, ids: np.ndarray, truth: set[int], k: int) -> tuple[int, int]:
    """Fewest and most ground-truth IDs a top ``k`` can hold over every order of the tie
    group that straddles the cut: the better columns are always in, ``need`` places are
    filled from the tied ones (by the best and by the worst choice)."""
    if np.isnan(row).any():
        row = _ordering_keys(row[None])[0]
    kth = np.partition(row, len(row) - k)[len(row) - k]
    better, tied = row > kth, row == kth
    need = k - int(better.sum())
    inside = {int(t) for t in ids[better]}
    base = len(inside & truth)
    # Tied columns whose ID would add a new hit, grouped by ID (a repeated ID counts once).
    new_hits = Counter(int(t) for t in ids[tied] if int(t) in truth and int(t) not in inside)
    most = base + min(need, len(new_hits))
    free = int(tied.sum()) - sum(new_hits.values())  # tied columns that add no hit
    forced, fewest = need - free, 0
    for count in sorted(new_hits.values(), reverse=True):  # fewest distinct IDs that fill
        if forced <= 0:
            break
        forced -= count
        fewest += 1
    return base + fewest, most


@dataclass
class RecallResult:
    recall: dict[int, float]  # K -> fractional recall@K (official at K=10)
    hit_at_10: float
    per_image_recall: dict[int, np.ndarray]  # K -> (n_images,)
    per_image_hits: np.ndarray  # (n_images,) count of ground-truth IDs in the top 10
    # (n_images, <=10) predicted text IDs: the official top-K sets at every K; texts tied with
    # each other strictly between two cut-offs are listed in column order
    top10: np.ndarray
    # Rows whose 10th and 11th best similarities are equal: their score depends on tie order.
    tied_at_10: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # Recall@10 per image at the worst and the best order of each row's tie at the cut-off.
    per_image_tie_min: np.ndarray = field(default_factory=lambda: np.zeros(0))
    per_image_tie_max: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def tied_rows_at_10(self) -> int:
        return int(self.tied_at_10.sum())

    @property
    def tie_range(self) -> tuple[float, float]:
        """Recall@10 over all tie orders: (worst, best); equal when ties decide nothing."""
        return float(self.per_image_tie_min.mean()), float(self.per_image_tie_max.mean())

    def tie_metrics(self) -> dict[str, float]:
        low, high = self.tie_range
        return {
            "tied_rows_at_10": float(self.tied_rows_at_10),
            "recall_at_10_tie_min": low,
            "recall_at_10_tie_max": high,
        }

    def tie_note(self) -> str | None:
        """A line for the results table when the order of tied similarities moves Recall@10."""
        low, high = self.tie_range
        if low == high:
            return None
        return (
            f"Ties decide the score: {self.tied_rows_at_10} of {len(self.tied_at_10)} images "
            f"have equal similarities at the 10th/11th place; Recall@10 is {low:.6f} to "
            f"{high:.6f} over tie orders, {self.recall[10]:.6f} in numpy's np.argsort order "
            "(the official evaluate_track1's)"
        )


def recall_at_k(
    similarity: np.ndarray,
    text_ids: Sequence[int],
    ground_truth: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> RecallResult:
    """Fractional recall@K per image and averaged, plus hit@10 (any ground truth in the top 10).

    The ranking is the official one, ``np.argsort(-similarity[i])[:K]`` per image, ties
    included (:func:`official_top_k`: partial top-k where every top-K set is unambiguous,
    numpy's own sort where a tie crosses a cut-off K); each image's recall is
    ``matched / len(ground_truth[i])`` and the mean is ``np.mean`` of them, as
    ``evaluate_track1`` computes it. Also: which rows tie at the
    10th place and the range of Recall@10 over every order of those ties.
    """
    if similarity.shape != (len(ground_truth), len(text_ids)):
        raise ValueError(
            f"similarity is {similarity.shape}, expected ({len(ground_truth)}, {len(text_ids)})"
        )
    for i, gt in enumerate(ground_truth):
        if len(gt) == 0:
            raise ValueError(f"image row {i} has no ground-truth text IDs")
    ids = np.asarray(text_ids)
    ranking = official_top_k(similarity, max(max(ks), 10), cuts=sorted({*ks, 10}))
    ranked = ids[ranking.indices]
    gt_sets = [{int(t) for t in gt} for gt in ground_truth]
    sizes = [len(gt) for gt in ground_truth]  # the official denominator: the list as given
    per_image: dict[int, np.ndarray] = {}
    for k in ks:
        per_image[k] = np.array(
            [
                len(set(ranked[i, :k].tolist()) & gt) / n
                for i, (gt, n) in enumerate(zip(gt_sets, sizes, strict=True))
            ],
            dtype=np.float64,
        )
    hits10 = np.array(
        [len(set(ranked[i, :10].tolist()) & gt) for i, gt in enumerate(gt_sets)], dtype=np.int64
    )
    values = ranking.values
    if values.shape[1] > 10:  # more than 10 texts: is the 10th value equal to the 11th?
        tied = _equal_neighbours(values[:, 9:11])[:, 0]
    else:
        tied = np.zeros(len(values), dtype=bool)
    tie_min = hits10 / np.asarray(sizes, dtype=np.float64)  # recall@10 where no tie decides
    tie_max = tie_min.copy()
    s = np.asarray(similarity)
    for i in np.flatnonzero(tied):
        low, high = _tie_hit_range(s[i], ids, gt_sets[i], 10)
        tie_min[i], tie_max[i] = low / sizes[i], high / sizes[i]
    return RecallResult(
        recall={k: float(np.mean(v)) for k, v in per_image.items()},
        hit_at_10=float((hits10 > 0).mean()),
        per_image_recall=per_image,
        per_image_hits=hits10,
        top10=ranked[:, :10],
        tied_at_10=tied,
        per_image_tie_min=tie_min,
        per_image_tie_max=tie_max,
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


def scorer_environment() -> dict[str, str]:
    """What the Track 1 score's tie order depends on, for the run's tags: numpy's default sort
    orders tied values by its implementation (SIMD-dispatched on the CPU), and sklearn computes
    the similarity's bits."""
    import sklearn

    env = {"scorer/numpy": np.__version__, "scorer/sklearn": sklearn.__version__}
    try:  # numpy >= 2
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy 1.x
        try:
            from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        except ImportError:
            return env
    enabled = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    env["scorer/numpy_cpu_dispatch"] = ",".join(enabled) or "baseline"
    return env


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
