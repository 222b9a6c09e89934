"""train.evaluate against slow explicit references and known answers."""

import numpy as np
import pytest
import torch

from engine.preprocess import Preprocess
from train import evaluate as ev


# -- slow references ----------------------------------------------------------------------------------


def ref_cosine(a, b):
    na = np.sqrt(sum(float(v) * float(v) for v in a))
    nb = np.sqrt(sum(float(v) * float(v) for v in b))
    if na == 0 or nb == 0:
        return 0.0
    return sum(float(x) * float(y) for x, y in zip(a, b)) / (na * nb)


def ref_knn1(train, ytr, test, yte):
    hits = 0
    for q, yq in zip(test, yte):
        best, best_i = -np.inf, -1
        for i, t in enumerate(train):
            s = ref_cosine(q, t)
            if s > best + 1e-9:  # strict: ties keep the lowest index
                best, best_i = s, i
        hits += int(ytr[best_i] == yq)
    return hits / len(test)


def ref_loo(emb, y):
    hits = 0
    for j, q in enumerate(emb):
        best, best_i = -np.inf, -1
        for i, t in enumerate(emb):
            if i == j:
                continue
            s = ref_cosine(q, t)
            if s > best + 1e-9:
                best, best_i = s, i
        hits += int(y[best_i] == y[j])
    return hits / len(emb)


# -- 1-NN ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_train,n_test,dim", [(1, 1, 1), (7, 5, 3), (40, 23, 97)])
def test_knn1_matches_reference(n_train, n_test, dim):
    rng = np.random.default_rng(n_train * 100 + dim)
    centers = rng.normal(size=(4, dim))
    ytr = rng.integers(0, 4, n_train)
    yte = rng.integers(0, 4, n_test)
    tr = centers[ytr] + rng.normal(scale=0.8, size=(n_train, dim))
    te = centers[yte] + rng.normal(scale=0.8, size=(n_test, dim))
    got = ev.knn1_accuracy(tr, ytr, te, yte)
    assert got == pytest.approx(ref_knn1(tr, ytr, te, yte))


def test_knn1_known_answer_and_scale_invariance():
    tr = np.array([[1, 0], [0, 1]], np.float32)
    ytr = np.array([0, 1])
    te = np.array([[5, 1], [0.1, 3], [-1, 0.2]], np.float32)  # nearest (cosine): 0, 1, 1
    assert ev.knn1_accuracy(tr, ytr, te, np.array([0, 1, 1])) == pytest.approx(1.0)
    assert ev.knn1_accuracy(tr, ytr, te, np.array([0, 1, 0])) == pytest.approx(2 / 3)
    # cosine: scaling the rows changes nothing
    assert ev.knn1_accuracy(tr * 7, ytr, te * 0.01, np.array([0, 1, 1])) == pytest.approx(1.0)


def test_knn1_zero_vector_and_ties_pick_lowest_index():
    tr = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    ytr = np.array([5, 6, 7])
    # tie between rows 0 and 1 -> row 0; a zero query scores 0 against all -> row 0
    assert ev.knn1_accuracy(tr, ytr, np.array([[2, 0], [0, 0]], np.float32), np.array([5, 5])) == 1.0


def test_loo_knn1_matches_reference():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(31, 5))
    y = rng.integers(0, 3, 31)
    assert ev.loo_knn1_accuracy(emb, y) == pytest.approx(ref_loo(emb, y))
    # duplicated points: each one's nearest other is its twin
    dup = np.concatenate([emb, emb])
    assert ev.loo_knn1_accuracy(dup, np.concatenate([np.arange(31), np.arange(31)])) == 1.0


def test_knn_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match=r"train_labels must have shape \(3,\)"):
        ev.knn1_accuracy(np.zeros((3, 2)), np.zeros(2), np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(ValueError, match="same dim"):
        ev.knn1_accuracy(np.zeros((3, 2)), np.zeros(3), np.zeros((1, 4)), np.zeros(1))
    with pytest.raises(ValueError, match="NaN"):
        ev.loo_knn1_accuracy(np.array([[np.nan, 1.0], [1.0, 0.0]]), np.zeros(2))
    with pytest.raises(ValueError, match="at least 2"):
        ev.loo_knn1_accuracy(np.ones((1, 2)), np.zeros(1))


# -- k-means NMI ---------------------------------------------------------------------------------------


def test_kmeans_nmi_known_answers():
    rng = np.random.default_rng(0)
    dirs = np.eye(6)[:3] * 10  # three well separated directions (cosine geometry)
    y = np.repeat(np.arange(3), 20)
    emb = dirs[y] + rng.normal(scale=0.3, size=(60, 6))
    assert ev.kmeans_nmi(emb, y) == pytest.approx(1.0)
    assert ev.kmeans_nmi(emb, (y + 1) % 3) == pytest.approx(1.0)  # label names do not matter
    # one cluster against three labels: no information
    assert ev.kmeans_nmi(emb, y, n_clusters=1) == pytest.approx(0.0, abs=1e-12)


# -- baselines -----------------------------------------------------------------------------------------


def test_raw_pixels_block_means():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    got = ev.raw_pixels([img], size=32)
    assert got.shape == (1, 32 * 32 * 3) and got.dtype == np.float32
    # INTER_AREA at an exact factor of 2 is the mean of each 2x2 block (rounded to uint8)
    ref = np.zeros((3, 32, 32))
    for c in range(3):
        for i in range(32):
            for j in range(32):
                ref[c, i, j] = img[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, c].astype(float).mean() / 255.0
    assert np.abs(got[0] - ref.ravel()).max() <= 0.5 / 255 + 1e-6


def test_raw_pixels_grey_and_odd_sizes():
    grey = np.full((10, 7), 51, np.uint8)
    rgb = np.zeros((5, 9, 3), np.uint8)
    got = ev.raw_pixels([grey, rgb], size=3)
    assert got.shape == (2, 27)
    np.testing.assert_allclose(got[0], 0.2, atol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)


def _quadrants(colours, side=8):
    img = np.zeros((2 * side, 2 * side, 3), np.uint8)
    img[:side, :side], img[:side, side:], img[side:, :side], img[side:, side:] = colours
    return img


def test_hsv_histogram_known_answers():
    red, green, blue, white, black = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
    h = ev.hsv_histogram([_quadrants([red, green, blue, white]), _quadrants([black] * 4)], bins=(8, 4, 4))
    assert h.shape == (2, 128) and h.dtype == np.float32

    def cell(hb, sb, vb):
        return (hb * 4 + sb) * 4 + vb

    want = np.zeros(128, np.float32)
    # OpenCV 8-bit HSV: red H=0, green H=60, blue H=120 (hue bins of 22.5: 0, 2, 5); white S=0 V=255
    for c in (cell(0, 3, 3), cell(2, 3, 3), cell(5, 3, 3), cell(0, 0, 3)):
        want[c] += 0.25
    np.testing.assert_allclose(h[0], want)
    black = np.zeros(128, np.float32)
    black[cell(0, 0, 0)] = 1.0
    np.testing.assert_allclose(h[1], black)


def test_hsv_histogram_matches_numpy_histogramdd():
    import cv2

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8)
    bins = (5, 3, 2)
    got = ev.hsv_histogram([img], bins=bins)[0]
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(float)
    ref, _ = np.histogramdd(hsv, bins=bins, range=[(0, 180), (0, 256), (0, 256)])
    np.testing.assert_allclose(got, ref.ravel() / ref.sum(), atol=1e-7)
    assert got.sum() == pytest.approx(1.0)


# -- embed ---------------------------------------------------------------------------------------------


class _Flatten(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)


def test_embed_applies_the_preprocess_in_batches_and_eval_mode():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(7, 12, 10, 3), dtype=np.uint8)
    pre = Preprocess(size=(6, 6), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    model = torch.nn.Sequential(torch.nn.Dropout(0.9), _Flatten())
    model.train()
    got = ev.embed(model, images, pre, batch_size=3)
    assert model.training  # mode restored
    want = pre(images).reshape(7, -1)  # dropout would change values if eval mode were not set
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32
    # already preprocessed input
    np.testing.assert_array_equal(ev.embed(model, pre(images), None, batch_size=4), want)
    with pytest.raises(ValueError, match=r"float32 \(n, 3, h, w\)"):
        ev.embed(model, images, None)


# -- pairs ---------------------------------------------------------------------------------------------


def test_balanced_pairs():
    y = np.repeat(np.arange(5), [1, 2, 3, 4, 10])
    i, j, same = ev.balanced_pairs(y, 101, seed=3)
    assert len(i) == len(j) == len(same) == 101
    assert same.sum() == 50
    assert np.all(i != j)
    np.testing.assert_array_equal(same, y[i] == y[j])
    i2, j2, s2 = ev.balanced_pairs(y, 101, seed=3)
    np.testing.assert_array_equal(i, i2)
    with pytest.raises(ValueError, match="seen at least twice"):
        ev.balanced_pairs(np.arange(5), 10)


def test_pair_accuracy_and_best_threshold_against_brute_force():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=60), 1)  # many ties
    same = rng.random(60) < 0.5
    assert ev.pair_accuracy([0.9, 0.1, 0.5], [True, False, False], threshold=0.5) == pytest.approx(2 / 3)
    thr, acc = ev.best_threshold(scores, same)
    assert ev.pair_accuracy(scores, same, threshold=thr) == pytest.approx(acc)
    cands = np.concatenate([scores, [scores.max() + 1]])
    brute = max(np.mean((scores >= t) == same) for t in cands)
    assert acc == pytest.approx(brute)
    # separable scores: perfect
    thr, acc = ev.best_threshold([0.1, 0.2, 0.8, 0.9], [False, False, True, True])
    assert acc == 1.0 and 0.2 < thr <= 0.8


def test_holdout_split():
    tr, te = ev.holdout_split(10000)
    np.testing.assert_array_equal(tr, np.arange(8000))
    np.testing.assert_array_equal(te, np.arange(8000, 10000))
    for n in (2, 3, 7, 23, 100):
        tr, te = ev.holdout_split(n, tail=False)
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == n and len(te) >= 1
    y = np.repeat(np.arange(10), 50)  # stored sorted by class
    tr, te = ev.holdout_split(500, tail=False)
    assert set(y[te]) == set(range(10)) and np.all(np.bincount(y[te]) == 10)
