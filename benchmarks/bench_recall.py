"""Benchmark: lpcvlab's Recall@K vs the official per-row loop, on the same similarity matrix.

Run by hand::

    python benchmarks/bench_recall.py [--sizes 2000x8000,5000x25000] [--captions 4] [--repeat 3]

For each size (images x captions) it makes random unit embeddings (dimension ``--dim``), their
float32 cosine similarity (:func:`lpcvlab.metrics.cosine_similarity`, as the pipeline computes
it), rounded to ``--decimals`` so that ties occur, and ground truth of ``--captions`` captions per
image. Then it times

* the official loop: for each image, sort its row (``np.argsort(-row, kind="stable")``: ties in
  column order, the tie rule lpcvlab defines), take the top K text IDs, and count them against
  the ground truth;
* lpcvlab: :func:`lpcvlab.metrics.recall_at_k` (float32, partial top-k over row blocks).

and checks that both give the same top-10 IDs and the same per-image and mean recall at every K
(exact equality). Timings are the best of ``--repeat`` runs (the machine may be shared); peak
memory is numpy's allocations during one call (tracemalloc). The last line gives the speed-up of
each size and whether every result was identical.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lpcvlab.metrics import cosine_similarity, recall_at_k

KS = (1, 5, 10)


def official_loop(
    similarity: np.ndarray, text_ids: Sequence[int], ground_truth: Sequence[Sequence[int]]
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """The organisers' semantics, one image at a time: per-image recall at each K, top-10 IDs."""
    ids = np.asarray(text_ids)
    per_image = {k: np.empty(len(ground_truth)) for k in KS}
    top10 = np.empty((len(ground_truth), min(10, len(ids))), dtype=ids.dtype)
    for i, gt in enumerate(ground_truth):
        ranked = ids[np.argsort(-similarity[i], kind="stable")]
        truth = set(gt)
        for k in KS:
            per_image[k][i] = len(set(ranked[:k].tolist()) & truth) / len(truth)
        top10[i] = ranked[:10]
    return per_image, top10


def make_case(
    n_images: int, n_texts: int, captions: int, dim: int, decimals: int, seed: int
) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """Each image's captions are its embedding plus noise (about half of them in its top 10)."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_images, dim), dtype=np.float32)
    txt = 2.5 * rng.standard_normal((n_texts, dim), dtype=np.float32)
    txt[: n_images * captions] += np.repeat(img, captions, axis=0)[:n_texts]
    sim = np.round(cosine_similarity(img, txt), decimals).astype(np.float32)
    text_ids = (np.arange(n_texts) * 3 + 7).tolist()  # IDs are not positions
    gt = [
        [text_ids[(i * captions + c) % n_texts] for c in range(captions)] for i in range(n_images)
    ]
    return sim, text_ids, gt


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def peak_mb(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2000x8000,5000x25000", help="images x captions, ...")
    p.add_argument("--captions", type=int, default=4, help="ground-truth captions per image")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--decimals", type=int, default=4, help="rounding of the similarity (ties)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    summary, identical = [], True
    for size in args.sizes.split(","):
        n_images, n_texts = (int(v) for v in size.lower().split("x"))
        sim, ids, gt = make_case(n_images, n_texts, args.captions, args.dim, args.decimals, 0)
        ties = float(np.mean(np.diff(np.sort(sim[: min(50, n_images)], axis=1), axis=1) == 0))
        t_loop, (loop_recall, loop_top10) = best_of(
            args.repeat, lambda sim=sim, ids=ids, gt=gt: official_loop(sim, ids, gt)
        )
        t_ours, ours = best_of(
            args.repeat, lambda sim=sim, ids=ids, gt=gt: recall_at_k(sim, ids, gt, KS)
        )
        same = np.array_equal(ours.top10, loop_top10) and all(
            np.array_equal(ours.per_image_recall[k], loop_recall[k])
            and ours.recall[k] == float(loop_recall[k].mean())
            for k in KS
        )
        identical &= same
        mem_ours = peak_mb(lambda sim=sim, ids=ids, gt=gt: recall_at_k(sim, ids, gt, KS))
        mem_sort = peak_mb(lambda sim=sim: np.argsort(-sim, axis=1, kind="stable"))
        print(
            f"{n_images} x {n_texts} float32 ({sim.nbytes / 2**20:.0f} MB, {ties:.1%} of adjacent "
            f"values tied): official loop {t_loop:.3f} s | lpcvlab {t_ours:.3f} s | "
            f"{t_loop / t_ours:.1f}x | recall@10 {ours.recall[10]:.6f} | peak numpy memory "
            f"{mem_ours:.0f} MB (a full argsort: {mem_sort:.0f} MB) | "
            f"{'identical' if same else 'DIFFERENT'}"
        )
        summary.append(f"{n_images} x {n_texts}: {t_loop / t_ours:.1f}x")
    print(
        f"speed-up of recall_at_k over the official per-row loop: {'; '.join(summary)}; "
        f"results {'identical' if identical else 'NOT identical'}"
    )
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
