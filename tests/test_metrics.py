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
