"""engine.kernels.kmeans against the slow numpy oracles in tests/bank_reference.py."""

import numpy as np
import pytest

from bank_reference import (
    assign_ref,
    inertia_ref,
    kmeanspp_ref,
    normalise_ref,
    seed_rows_ref,
    spherical_kmeans_ref,
    update_centroids_ref,
)
from engine.kernels import kmeans as K


def mixture(rng, n, dim, k, spread=0.3):
    """L2-normalised Gaussian mixture: k unit centres, isotropic noise of norm ~spread."""
    centres = rng.standard_normal((k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(k, size=n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim))
    return np.ascontiguousarray(normalise_ref(x), dtype=np.float32)


def restart_rng(seed, restarts, r=0):
    """The Generator spherical_kmeans gives restart r (its documented seeding)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(restarts)[r])


@pytest.mark.parametrize("dim", [1, 3, 97, 256])
def test_kmeanspp_matches_oracle(dim):
    rng = np.random.default_rng(dim)
    x = mixture(rng, 301, dim, 5)
    u = rng.random(9)
    seeds = K.kmeanspp(x, 17, u)
    np.testing.assert_array_equal(seeds, kmeanspp_ref(x, 17, u))
    assert len(set(seeds.tolist())) == 9


def test_seeding_subsamples_many_points():
    rng = np.random.default_rng(9)
    x = mixture(rng, 3 * 256 + 5, 8, 3)  # more than 256 points per cluster: k-means++ runs on a subsample
    got = K.seed_rows(x, 3, restart_rng(1, 1))
    np.testing.assert_array_equal(got, seed_rows_ref(x, 3, restart_rng(1, 1)))
    res = K.spherical_kmeans(x, 3, iterations=8, seed=1)
    c, labels, inertia = spherical_kmeans_ref(x, 3, 8, restart_rng(1, 1))
    np.testing.assert_array_equal(res.labels, labels)
    assert res.inertia == pytest.approx(inertia, rel=1e-5)


def test_kmeanspp_all_duplicates_takes_lowest_unchosen():
    x = np.ones((6, 3), np.float32) / np.sqrt(3)
    np.testing.assert_array_equal(K.kmeanspp(x, 4, np.full(3, 0.5)), [4, 0, 1])


@pytest.mark.parametrize("method", ["gemm", "fused"])
@pytest.mark.parametrize("dim", [1, 3, 97, 256])
def test_assignment_matches_oracle(method, dim):
    rng = np.random.default_rng(dim + 7)
    x = mixture(rng, 1024 + 7, dim, 6)
    c = np.ascontiguousarray(x[:6] + 0)
    labels = np.full(x.shape[0], -1, np.int64)
    best = np.empty(x.shape[0], np.float32)
    changed = K._assign(x, c, labels, best, 100, method)  # 100-row blocks: the last one is short
    want_labels, want_best = assign_ref(x, c)
    assert changed == x.shape[0]
    np.testing.assert_allclose(best, want_best, atol=1e-5)
    s = x.astype(np.float64) @ c.astype(np.float64).T
    gap = np.sort(s, axis=1)[:, -1] - np.sort(s, axis=1)[:, -2] if dim > 1 else np.ones(x.shape[0])
    clear = gap > 1e-5  # away from float32 near-ties the labels must agree exactly
    np.testing.assert_array_equal(labels[clear], want_labels[clear])
    assert K._assign(x, c, labels, best, 100, method) == 0  # nothing changes the second time


def test_argmax_ties_take_lowest_centroid():
    s = np.array([[0.5, 0.9, 0.9], [0.2, 0.2, 0.2], [-1.0, -3.0, -1.0]], np.float32)
    labels = np.full(3, 7, np.int64)
    best = np.empty(3, np.float32)
    assert K.argmax_rows(s, labels, best) == 3
    np.testing.assert_array_equal(labels, [1, 0, 0])
    np.testing.assert_array_equal(best, np.array([0.9, 0.2, -1.0], np.float32))


def test_update_centroids_and_empty_cluster():
    rng = np.random.default_rng(3)
    x = mixture(rng, 200, 97, 4)
    labels = rng.integers(3, size=200)  # cluster 3 is empty
    c = np.ascontiguousarray(x[:4] + 0)
    want, want_dead = update_centroids_ref(x, labels, c)
    got = c.copy()
    dead = K.update_centroids(x, labels, got)
    np.testing.assert_array_equal(dead, [False, False, False, True])
    np.testing.assert_array_equal(dead, want_dead)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_reseed_takes_farthest_points_in_cluster_order():
    rng = np.random.default_rng(4)
    x = mixture(rng, 10, 5, 2)
    c = np.ascontiguousarray(x[:4] + 0)
    best = np.array([0.9, 0.1, 0.5, 0.1, 0.95, 0.2, 0.7, 0.8, 0.9, 0.3], np.float32)
    dead = np.array([False, True, False, True])
    K.reseed(x, c, dead, best)
    np.testing.assert_allclose(c[1], x[1], atol=1e-6)  # lowest best, lower index first
    np.testing.assert_allclose(c[3], x[3], atol=1e-6)
    np.testing.assert_array_equal(c[[0, 2]], x[[0, 2]])


@pytest.mark.parametrize("dim,k", [(1, 2), (3, 4), (97, 7), (256, 5)])
def test_spherical_kmeans_matches_step_by_step_oracle(dim, k):
    rng = np.random.default_rng(dim)
    x = mixture(rng, 1024 + 7, dim, k)
    res = K.spherical_kmeans(x, k, iterations=10, seed=5)
    c, labels, inertia = spherical_kmeans_ref(x, k, 10, restart_rng(5, 1))
    np.testing.assert_array_equal(res.labels, labels)
    np.testing.assert_allclose(res.centroids, c, atol=1e-5)
    assert res.inertia == pytest.approx(inertia, rel=1e-5, abs=1e-6)
    assert res.inertia == pytest.approx(inertia_ref(x, res.centroids, res.labels), rel=1e-5, abs=1e-6)
    assert res.centroids.dtype == np.float32 and res.centroids.shape == (k, dim)
    assert res.labels.dtype == np.int64 and res.labels.shape == (x.shape[0],)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-6)


def test_recovers_planted_clusters():
    rng = np.random.default_rng(6)
    centres = normalise_ref(rng.standard_normal((8, 32)))
    truth = np.repeat(np.arange(8), 50)
    x = np.ascontiguousarray(normalise_ref(centres[truth] + 0.02 * rng.standard_normal((400, 32))), np.float32)
    res = K.spherical_kmeans(x, 8, iterations=20, restarts=4, seed=0)
    # the same partition up to renaming: every found cluster is one planted cluster
    pairs = set(zip(res.labels.tolist(), truth.tolist()))
    assert len(pairs) == 8
    np.testing.assert_allclose(np.sort(res.centroids @ centres.T, axis=0)[-1], 1.0, atol=1e-3)


def test_restarts_return_the_best_and_are_deterministic():
    rng = np.random.default_rng(7)
    x = mixture(rng, 500, 16, 12, spread=1.0)
    res = K.spherical_kmeans(x, 12, iterations=15, restarts=4, seed=3)
    again = K.spherical_kmeans(x, 12, iterations=15, restarts=4, seed=3)
    np.testing.assert_array_equal(res.labels, again.labels)
    np.testing.assert_array_equal(res.centroids, again.centroids)
    each = []
    for r in range(4):
        each.append(spherical_kmeans_ref(x, 12, 15, restart_rng(3, 4, r))[2])
    assert res.restart == int(np.argmin(each))
    assert res.inertia == pytest.approx(min(each), rel=1e-5)
    other = K.spherical_kmeans(x, 12, iterations=15, restarts=1, seed=4)
    assert not np.array_equal(other.centroids, res.centroids)


def test_few_distinct_points_reseeds_duplicates_to_zero_inertia():
    base = normalise_ref(np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    x = np.ascontiguousarray(base[np.arange(30) % 3], np.float32)
    res = K.spherical_kmeans(x, 5, iterations=5, seed=0)
    assert res.inertia == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(res.centroids[res.labels], x, atol=1e-6)
    assert set(res.labels.tolist()) <= set(range(5))


def test_single_cluster_is_normalised_mean():
    rng = np.random.default_rng(8)
    x = mixture(rng, 77, 9, 3)
    res = K.spherical_kmeans(x, 1, iterations=3, seed=0)
    m = x.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(res.centroids[0], m / np.linalg.norm(m), atol=1e-6)
    np.testing.assert_array_equal(res.labels, 0)


def test_methods_agree_and_fused_ignores_thread_count():
    import numba

    rng = np.random.default_rng(10)
    x = mixture(rng, 3000, 32, 9, spread=0.5)
    a = K.spherical_kmeans(x, 9, iterations=10, seed=2, method="fused")
    b = K.spherical_kmeans(x, 9, iterations=10, seed=2, method="gemm")
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-6)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = K.spherical_kmeans(x, 9, iterations=10, seed=2, method="fused")
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one.labels, a.labels)
    np.testing.assert_array_equal(one.centroids, a.centroids)
    with pytest.raises(ValueError, match="method must be 'fused' or 'gemm', got 'blas'"):
        K.spherical_kmeans(x, 9, method="blas")


def test_two_worker_assignment_gives_the_serial_answer(monkeypatch):
    rng = np.random.default_rng(12)
    x = mixture(rng, 20000, 24, 15, spread=0.6)
    assert x.shape[0] >= K.PARALLEL_MIN_ROWS  # two halves in two worker threads
    two = K.spherical_kmeans(x, 15, iterations=8, seed=3)
    fused = K.spherical_kmeans(x, 15, iterations=8, seed=3, method="fused")
    monkeypatch.setattr(K, "PARALLEL_MIN_ROWS", 10**9)
    serial = K.spherical_kmeans(x, 15, iterations=8, seed=3)
    np.testing.assert_array_equal(two.labels, serial.labels)
    np.testing.assert_array_equal(two.labels, fused.labels)
    np.testing.assert_allclose(two.centroids, serial.centroids, atol=1e-6)
    assert two.iterations == serial.iterations and abs(two.inertia - serial.inertia) <= 1e-6 * serial.inertia
