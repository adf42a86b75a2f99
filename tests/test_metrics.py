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
    """The organisers' per-row loop: each image's texts ranked by ``np.argsort(-row)`` (numpy's
    default sort, as evaluate_track1 calls it), |top-K & truth| / len(truth)."""
    ids = np.asarray(text_ids)
    per_image = {k: [] for k in ks}
    top10 = []
    for i, gt in enumerate(ground_truth):
        ranked = ids[np.argsort(-similarity[i])]
        for k in ks:
            per_image[k].append(len(set(ranked[:k].tolist()) & set(gt)) / len(gt))
        top10.append(ranked[:10])
    return {k: np.array(v) for k, v in per_image.items()}, np.array(top10)


def assert_same_top_sets(got, want, ks=(1, 5, 10)):
    """The same top-K set in every row at every cut-off K (what every Recall@K reads); texts
    tied strictly between two cut-offs may be listed in another order."""
    for k in ks:
        np.testing.assert_array_equal(np.sort(got[:, :k], axis=1), np.sort(want[:, :k], axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recall_is_identical_to_the_official_loop_with_ties(dtype):
    from lpcvlab.metrics import official_top_k, top_k_indices

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
        assert_same_top_sets(got.top10, want_top10)
        for k in (1, 5, 10):
            np.testing.assert_array_equal(got.per_image_recall[k], want[k])
            assert got.recall[k] == float(want[k].mean())
        # Every position a cut: the whole top 7 in numpy's own order.
        exact = official_top_k(sim, 7).indices
        np.testing.assert_array_equal(exact, np.stack([np.argsort(-r)[:7] for r in sim]))
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


# -- the official evaluate_track1, ties included ----------------------------------------------


def official_evaluate_track1(img_output, txt_output, txt_id, gt, k=10):
    """A reference written from the organisers' evaluate_track1 (26LPCVC_Track1_Sample_Solution,
    inference.py): np.vstack, numpy L2 normalisation, sklearn cosine_similarity, then per image
    np.argsort(-sim[i])[:k] (numpy's default sort), |predicted & truth| / len(truth), np.mean."""
    from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

    img = np.vstack([x for x in img_output])
    txt = np.vstack([x for x in txt_output])
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = sk_cosine(img, txt)
    recalls, tops = [], []
    for i in range(len(img)):
        top = np.argsort(-sim[i])[:k]
        predicted = [txt_id[j] for j in top]
        recalls.append(len(set(predicted) & set(gt[i])) / len(gt[i]))
        tops.append(predicted)
    return np.mean(recalls), np.array(recalls), np.array(tops)


def _repeated_captions_case(seed, n_img=30, n_unique=25, n_txt=80):
    """Text embeddings of repeated captions: identical rows under different IDs."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, 16), dtype=np.float32)
    unique = rng.standard_normal((n_unique, 16), dtype=np.float32)
    unique[: n_img // 2] += img[: n_img // 2]  # some images have a near caption
    txt = unique[rng.integers(0, n_unique, n_txt)]
    ids = (rng.permutation(400)[:n_txt] + 1).tolist()
    gt = [rng.choice(ids, size=int(rng.integers(1, 6)), replace=False).tolist() for _ in img]
    return img, txt, ids, gt


def _collapsed_case(seed, n_img=40, n_txt=99, distinct=3):
    """What a collapsed quantized text tower gives: ``distinct`` embeddings for every text."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, 32), dtype=np.float32)
    levels = rng.standard_normal((distinct, 32), dtype=np.float32)
    txt = levels[rng.integers(0, distinct, n_txt)]
    ids = list(range(1, n_txt + 1))
    gt = [rng.choice(ids, size=int(rng.integers(1, 6)), replace=False).tolist() for _ in img]
    return img, txt, ids, gt


@pytest.mark.parametrize("case", [_repeated_captions_case, _collapsed_case])
@pytest.mark.parametrize("seed", range(6))
def test_recall_at_10_equals_the_official_function_bit_for_bit_with_ties(case, seed):
    from lpcvlab.metrics import retrieval_recall

    img, txt, ids, gt = case(seed)
    want, want_rows, want_top = official_evaluate_track1(img, txt, ids, gt)
    got = retrieval_recall(img, txt, ids, gt, ks=(1, 5, 10))
    assert got.tied_rows_at_10 > 0  # the case does tie at the cut-off
    assert got.recall[10] == float(want)  # bit for bit, not approx
    np.testing.assert_array_equal(got.per_image_recall[10], want_rows)
    assert_same_top_sets(got.top10, want_top)
    # Recall@1 and @5 are prefixes of the same official order.
    for k in (1, 5):
        assert got.recall[k] == float(official_evaluate_track1(img, txt, ids, gt, k=k)[0])


def test_the_similarity_is_the_official_one_bit_for_bit():
    from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        img = rng.standard_normal((7, 24)).astype(dtype) * 3
        txt = rng.standard_normal((11, 24)).astype(dtype)
        ni = img / np.linalg.norm(img, axis=1, keepdims=True)
        nt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
        want = sk_cosine(ni, nt)
        got = cosine_similarity(img, txt)
        assert got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(got, want)
        # (n, 1, d) outputs, as AI Hub's download_output_data lists them, stack the same way.
        np.testing.assert_array_equal(cosine_similarity(list(img[:, None]), txt), want)


def test_a_zero_embedding_is_named_not_scored():
    img = np.ones((3, 4), dtype=np.float32)
    txt = np.ones((5, 4), dtype=np.float32)
    txt[2] = 0
    with pytest.raises(ValueError, match=r"text embeddings: 1 row\(s\).*rows \[2\]"):
        cosine_similarity(img, txt)
    img[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"image embeddings.*rows \[1\]"):
        cosine_similarity(img, txt)


def _brute_force_tie_range(row, ids, gt, k=10):
    """Fewest and most hits of a top k over every choice of the tied columns at the cut."""
    import itertools

    order = np.argsort(-row, kind="stable")
    kth = row[order[k - 1]]
    better = [j for j in range(len(row)) if row[j] > kth]
    tied = [j for j in range(len(row)) if row[j] == kth]
    need = k - len(better)
    hits = [
        len({ids[j] for j in better + list(pick)} & set(gt))
        for pick in itertools.combinations(tied, need)
    ]
    return min(hits), max(hits)


def test_tie_min_and_max_are_the_extremes_over_every_tie_order():
    rng = np.random.default_rng(4)
    checked = 0
    for _ in range(200):
        n_img, n_txt = int(rng.integers(1, 6)), int(rng.integers(11, 20))
        sim = rng.integers(0, 4, (n_img, n_txt)).astype(np.float32) / 4  # ties everywhere
        ids = rng.integers(1, 25, n_txt).tolist()  # repeated IDs too
        gt = [
            rng.choice(np.arange(1, 25), size=int(rng.integers(1, 5)), replace=False).tolist()
            for _ in range(n_img)
        ]
        res = recall_at_k(sim, ids, gt)
        for i in range(n_img):
            order = np.argsort(-sim[i], kind="stable")
            tied = sim[i, order[9]] == sim[i, order[10]]
            assert res.tied_at_10[i] == tied
            low, high = _brute_force_tie_range(sim[i], ids, gt[i])
            assert res.per_image_tie_min[i] == low / len(gt[i])
            assert res.per_image_tie_max[i] == high / len(gt[i])
            if not tied:
                assert low == high
            # The official order's own value lies in the range.
            assert low / len(gt[i]) <= res.per_image_recall[10][i] <= high / len(gt[i])
            checked += tied
    assert checked > 100
    assert res.tie_metrics()["recall_at_10_tie_min"] == float(res.per_image_tie_min.mean())


def test_no_tie_at_the_cut_gives_one_value_and_no_note():
    text_ids = list(range(1, 13))
    sim = np.linspace(1, 0, 12)[None, :].copy()
    sim[0, 3] = sim[0, 2]  # a tie inside the top 10 moves nothing at the cut
    res = recall_at_k(sim, text_ids, [(2, 11)])
    assert res.tied_rows_at_10 == 0
    assert res.tie_range == (0.5, 0.5) == (res.recall[10], res.recall[10])
    assert res.tie_note() is None
    sim[0, 10] = sim[0, 9]  # now the 10th and 11th tie: text 11 may or may not be in
    res = recall_at_k(sim, text_ids, [(2, 11)])
    assert res.tied_rows_at_10 == 1 and res.tie_range == (0.5, 1.0)
    note = res.tie_note()
    assert note is not None and "1 of 1 images" in note and "0.500000 to 1.000000" in note


def test_scorer_environment_names_the_numpy_that_sorted():
    import sklearn

    from lpcvlab.metrics import scorer_environment

    env = scorer_environment()
    assert env["scorer/numpy"] == np.__version__
    assert env["scorer/sklearn"] == sklearn.__version__
    assert env["scorer/numpy_cpu_dispatch"]
