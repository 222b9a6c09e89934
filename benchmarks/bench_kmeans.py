"""k-means: engine.kernels.kmeans.spherical_kmeans vs faiss.Kmeans, side by side in one run.

N = 100,000 x D = 128 L2-normalised Gaussian mixture (100 random unit centres, noise of norm ~0.8 around
each), 100 clusters, 20 iterations, one restart, both spherical. faiss: ``faiss.Kmeans(128, 100, niter=20,
spherical=True, seed=1234, max_points_per_centroid=10**7)`` after ``faiss.omp_set_num_threads(2)`` -- without
raising max_points_per_centroid faiss would subsample to 256 * 100 = 25,600 points and the comparison would
not be fair. Inertia is computed the same way for both from the returned centroids: each point to its
highest-cosine centroid, sum of squared Euclidean distances in float64. Target: at least as fast as faiss,
inertia within 1% of faiss's.

    NUMBA_CACHE_DIR=.numba_cache .venv/bin/python -m pytest benchmarks/bench_kmeans.py -q -s \
        --benchmark-columns=min,median,mean,rounds --benchmark-sort=name
"""

import numpy as np
import pytest

from engine.kernels import kmeans as K

faiss = pytest.importorskip("faiss")

N, D, NC, ITERS = 100_000, 128, 100, 20
_results = {}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((NC, D))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(NC, size=N)] + 0.8 / np.sqrt(D) * rng.standard_normal((N, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.ascontiguousarray(x, dtype=np.float32)
    K.spherical_kmeans(x[:1000], 4, iterations=2)  # compile outside the timing
    K.spherical_kmeans(x[:1000], 4, iterations=2, method="fused")
    return x


def inertia(x, centroids):
    """Same for both: nearest centroid by cosine, sum of squared Euclidean distances (float64)."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    labels = np.concatenate([np.argmax(x[i : i + 8192] @ c.T, axis=1) for i in range(0, len(x), 8192)])
    d = x.astype(np.float64) - c.astype(np.float64)[labels]
    return float((d * d).sum())


def faiss_kmeans(x):
    faiss.omp_set_num_threads(2)
    km = faiss.Kmeans(D, NC, niter=ITERS, spherical=True, seed=1234, max_points_per_centroid=10**7, verbose=False)
    km.train(x)
    return km.centroids


@pytest.mark.parametrize("method", ["gemm", "fused"])
def test_kmeans_ours(benchmark, data, method):
    benchmark.group = "k-means 100k x 128, 100 clusters, 20 iterations"
    res = benchmark.pedantic(
        lambda: K.spherical_kmeans(data, NC, iterations=ITERS, restarts=1, seed=0, method=method),
        rounds=3,
        iterations=1,
    )
    _results[method] = (benchmark.stats.stats.min if benchmark.stats else None, inertia(data, res.centroids))
    _results[method + " iterations"] = res.iterations  # it stops early only if an iteration changes nothing


def test_kmeans_faiss(benchmark, data):
    benchmark.group = "k-means 100k x 128, 100 clusters, 20 iterations"
    c = benchmark.pedantic(lambda: faiss_kmeans(data), rounds=3, iterations=1)
    _results["faiss"] = (benchmark.stats.stats.min if benchmark.stats else None, inertia(data, c))


def test_kmeans_ratio(capsys):
    if "faiss" not in _results:
        pytest.skip("run the whole file")
    t_f, i_f = _results["faiss"]
    with capsys.disabled():
        print()
        for method in ("gemm", "fused"):
            if method in _results:
                t, i = _results[method]
                speed = f"speed vs faiss {t_f / t:.2f}x ({t:.3f} s vs {t_f:.3f} s)" if t and t_f else ""
                print(
                    f"k-means {method}: {speed}  inertia {i:.1f} vs faiss {i_f:.1f} ({(i / i_f - 1) * 100:+.2f}%)"
                    f"  iterations run {_results[method + ' iterations']}"
                )
