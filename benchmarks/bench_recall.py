"""Benchmark: lpcvlab's Recall@K vs the official ``evaluate_track1``, on the same embeddings.

Run by hand::

    python benchmarks/bench_recall.py [--sizes 2000x8000,5000x25000] [--captions 4] [--repeat 3]

For each size (images x captions) it makes random float32 embeddings (dimension ``--dim``) where
``--duplicates`` of the captions repeat another caption's text (identical embeddings under
different IDs, as repeated captions in ``txt_list.csv`` give), so that similarities tie, also at
the 10th place, and ground truth of ``--captions`` captions per image. Then it times

* the official function, as the organisers' ``evaluate_track1`` computes it: numpy L2
  normalisation, sklearn's ``cosine_similarity``, and for each image ``np.argsort(-row)[:10]``
  (numpy's default sort), ``|predicted & truth| / len(truth)``, ``np.mean``; here also the top 1
  and top 5 of the same order (the recall@K lpcvlab logs);
* lpcvlab: :func:`lpcvlab.metrics.retrieval_recall` (the same similarity; partial top-k for rows
  whose best 11 values are distinct, ``np.argsort(-row)`` for rows with a tie among them).

and checks that both give the same top-K IDs and the same per-image and mean recall at every K
(exact equality, ties included; texts tied strictly inside a top K may be listed in another
order, which no Recall@K reads). Timings are the best of ``--repeat`` runs (the machine may be
shared). The last line gives the speed-up of each size and whether every result was identical.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

from lpcvlab.metrics import retrieval_recall

KS = (1, 5, 10)


def official_evaluate(
    img_output: np.ndarray,
    txt_output: np.ndarray,
    text_ids: Sequence[int],
    ground_truth: Sequence[Sequence[int]],
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """evaluate_track1's steps, one image at a time: per-image recall at each K, top-10 IDs."""
    img = np.vstack([x for x in img_output])
    txt = np.vstack([x for x in txt_output])
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = sk_cosine(img, txt)
    ids = np.asarray(text_ids)
    per_image = {k: np.empty(len(ground_truth)) for k in KS}
    top10 = np.empty((len(ground_truth), min(10, len(ids))), dtype=ids.dtype)
    for i, gt in enumerate(ground_truth):
        ranked = ids[np.argsort(-sim[i])[:10]]
        truth = set(gt)
        for k in KS:
            per_image[k][i] = len(set(ranked[:k].tolist()) & truth) / len(gt)
        top10[i] = ranked
    return per_image, top10


def make_case(
    n_images: int, n_texts: int, captions: int, dim: int, duplicates: float, seed: int
) -> tuple[np.ndarray, np.ndarray, list[int], list[list[int]]]:
    """Each image's captions are its embedding plus noise (about half of them in its top 10);
    a share of the captions are copies of other captions (exact ties)."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_images, dim), dtype=np.float32)
    txt = 2.5 * rng.standard_normal((n_texts, dim), dtype=np.float32)
    txt[: n_images * captions] += np.repeat(img, captions, axis=0)[:n_texts]
    copies = rng.random(n_texts) < duplicates
    txt[copies] = txt[rng.integers(0, n_texts, int(copies.sum()))]
    text_ids = (np.arange(n_texts) * 3 + 7).tolist()  # IDs are not positions
    gt = [
        [text_ids[(i * captions + c) % n_texts] for c in range(captions)] for i in range(n_images)
    ]
    return img, txt, text_ids, gt


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2000x8000,5000x25000", help="images x captions, ...")
    p.add_argument("--captions", type=int, default=4, help="ground-truth captions per image")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--duplicates", type=float, default=0.05, help="share of repeated captions")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    summary, identical = [], True
    for size in args.sizes.split(","):
        n_images, n_texts = (int(v) for v in size.lower().split("x"))
        img, txt, ids, gt = make_case(
            n_images, n_texts, args.captions, args.dim, args.duplicates, 0
        )
        t_off, (off_recall, off_top10) = best_of(
            args.repeat,
            lambda img=img, txt=txt, ids=ids, gt=gt: official_evaluate(img, txt, ids, gt),
        )
        t_ours, ours = best_of(
            args.repeat,
            lambda img=img, txt=txt, ids=ids, gt=gt: retrieval_recall(img, txt, ids, gt, KS),
        )
        same = all(
            np.array_equal(np.sort(ours.top10[:, :k], 1), np.sort(off_top10[:, :k], 1))
            and np.array_equal(ours.per_image_recall[k], off_recall[k])
            and ours.recall[k] == float(np.mean(off_recall[k]))
            for k in KS
        )
        identical &= same
        low, high = ours.tie_range
        print(
            f"{n_images} x {n_texts} float32 ({args.duplicates:.0%} repeated captions, "
            f"{ours.tied_rows_at_10} rows tied at the 10th place): official {t_off:.3f} s | "
            f"lpcvlab {t_ours:.3f} s | {t_off / t_ours:.1f}x | recall@10 {ours.recall[10]:.6f} "
            f"(tie orders: {low:.6f} to {high:.6f}) | {'identical' if same else 'DIFFERENT'}"
        )
        summary.append(f"{n_images} x {n_texts}: {t_off / t_ours:.1f}x")
    print(
        f"speed-up of retrieval_recall over the official evaluate_track1: {'; '.join(summary)}; "
        f"results {'identical' if identical else 'NOT identical'}"
    )
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
