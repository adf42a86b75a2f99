import numpy as np
import pytest

from lpcvlab.metrics import cosine_similarity, recall_at_k, top_k_accuracy


def test_recall_fractional_with_missing_id_and_multi_id_rows():
    text_ids = [10, 20, 30, 40]
    # image 0: ranking 20, 30, 10, 40; image 1: ranking 40, 30, 20, 10
    sim = np.array([[0.5, 0.9, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    gt = [(10, 20), (30, 99)]  # 99 has no text: it can never be retrieved, stays in denominator
    res = recall_at_k(sim, text_ids, gt, ks=(1, 2, 10))
    assert res.recall[1] == pytest.approx((1 / 2 + 0) / 2)
    assert res.recall[2] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert res.recall[10] == pytest.approx((1 + 1 / 2) / 2)
    assert res.hit_at_10 == 1.0
    assert res.top10[0].tolist() == [20, 30, 10, 40]
    assert res.per_image_hits.tolist() == [2, 1]


def test_recall_at_10_excludes_rank_11():
    text_ids = list(range(1, 13))
    sim = np.linspace(1, 0, 12)[None, :]  # text 1 best ... text 12 worst
    assert recall_at_k(sim, text_ids, [(11,)]).recall[10] == 0.0
    assert recall_at_k(sim, text_ids, [(10,)]).recall[10] == 1.0
    res = recall_at_k(sim, text_ids, [(10, 11, 12)])
    assert res.recall[10] == pytest.approx(1 / 3)
    assert res.hit_at_10 == 1.0


def test_recall_rejects_misaligned_shapes_and_empty_ground_truth():
    with pytest.raises(ValueError, match="expected"):
        recall_at_k(np.zeros((2, 3)), [1, 2, 3], [(1,)])
    with pytest.raises(ValueError, match="no ground-truth"):
        recall_at_k(np.zeros((1, 3)), [1, 2, 3], [()])


def test_cosine_similarity_is_scale_invariant():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0], [1.0, 1.0]])
    sim = cosine_similarity(a, b)
    assert sim[0, 0] == pytest.approx(1.0)
    assert sim[1, 1] == pytest.approx(np.sqrt(0.5))


def test_top_k_accuracy():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = [1, 1, 0]
    assert top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, labels, 3) == 1.0


def official_loop_recall(similarity, text_ids, ground_truth, ks=(1, 5, 10)):
    """The organisers' per-row loop: each image's texts sorted by similarity, ties in column
    order (the tie rule lpcvlab defines: a stable sort), |top-K & truth| / |truth|."""
    ids = np.asarray(text_ids)
    per_image = {k: [] for k in ks}
    top10 = []
    for i, gt in enumerate(ground_truth):
        ranked = ids[np.argsort(-similarity[i], kind="stable")]
        for k in ks:
            per_image[k].append(len(set(ranked[:k].tolist()) & set(gt)) / len(set(gt)))
        top10.append(ranked[:10])
    return {k: np.array(v) for k, v in per_image.items()}, np.array(top10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recall_is_identical_to_the_official_loop_with_ties(dtype):
    from lpcvlab.metrics import top_k_indices

    rng = np.random.default_rng(1)
    for trial in range(60):
        n_img, n_txt = int(rng.integers(1, 25)), int(rng.integers(1, 70))
        # Few distinct values: many ties, also at the 10th place; signed zeros, infinities, NaN.
        sim = rng.integers(-4, 5, (n_img, n_txt)).astype(dtype) / 4
        sim[rng.random(sim.shape) < 0.05] = -0.0
        sim[rng.random(sim.shape) < 0.03] = np.inf
        sim[rng.random(sim.shape) < 0.03] = -np.inf
        if trial % 3 == 0:
            sim[rng.random(sim.shape) < 0.05] = np.nan
        ids = rng.permutation(1000)[:n_txt].tolist()
        gt = [rng.choice(ids + [5000], size=int(rng.integers(1, 4))).tolist() for _ in range(n_img)]
        want, want_top10 = official_loop_recall(sim, ids, gt)
        got = recall_at_k(sim, ids, gt, ks=(1, 5, 10))
        np.testing.assert_array_equal(got.top10, want_top10)
        for k in (1, 5, 10):
            np.testing.assert_array_equal(got.per_image_recall[k], want[k])
            assert got.recall[k] == float(want[k].mean())
        for block in (1, 3 * n_txt, 1 << 20):  # row blocks of any size give the same answer
            expect = np.stack([np.argsort(-r, kind="stable")[:7] for r in sim])
            np.testing.assert_array_equal(top_k_indices(sim, 7, block_elements=block), expect)


def test_recall_on_float32_embeddings_stays_float32_and_matches_the_loop():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((300, 32)).astype(np.float32)
    txt = rng.standard_normal((1200, 32)).astype(np.float32)
    sim = cosine_similarity(img, txt)
    assert sim.dtype == np.float32
    ids = list(range(10, 1210))
    gt = [[10 + 4 * i + c for c in range(4)] for i in range(300)]
    want, _ = official_loop_recall(sim, ids, gt)
    got = recall_at_k(sim, ids, gt)
    for k in (1, 5, 10):
        np.testing.assert_array_equal(got.per_image_recall[k], want[k])
