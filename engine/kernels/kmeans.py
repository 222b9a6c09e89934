"""Spherical k-means on unit vectors (cosine similarity; centroids renormalised to unit length).

Choice: spherical, because the memory bank holds unit vectors and its neighbours are ranked by cosine, so the
clusters should be cosine clusters too (as faiss ``Kmeans(spherical=True)``). One Lloyd iteration:

- assign: each point goes to the centroid of highest inner product (ties: the lower centroid index). Default
  ``method="gemm"``: sgemm on row blocks + a serial numba argmax; from ``PARALLEL_MIN_ROWS`` points the rows are
  cut in two halves, each assigned (single-threaded sgemm, argmax) and summed per cluster by its own worker
  thread, so the argmax and the sums use both cores too. ``"fused"``: one parallel numba kernel (dot products +
  argmax), whose result does not depend on the thread count or the BLAS build. On the quiet 2-core reference
  machine, 100k x 128, 100 clusters, 20 iterations: gemm 0.43 s (0.51 s with BLAS's own threads and a serial
  argmax and update), fused 0.49-0.61 s, faiss.Kmeans 0.46-0.48 s (benchmarks/bench_kmeans.py);
- update: each centroid becomes the normalised sum of its members, summed in float64 in increasing point
  order (with "gemm" on two halves: each half in point order, then the two sums added; deterministic for a
  given thread count);
- empty clusters (and clusters whose members sum to zero) are re-seeded, in increasing cluster order, at the
  points farthest from their centroid at that iteration's assignment (lowest best inner product, ties by
  lower index), one distinct point each.

Initialisation: k-means++ (D^2 sampling, squared Euclidean distance) from a numpy Generator seeded per restart,
over a uniform subsample of 256 points per cluster when there are more points (``seed_rows``).
Iteration stops early only when an iteration changes no assignment (the result is then the same as running on).
After the last update the points are assigned once more, so labels and the objective match the returned
centroids. Objective (``inertia``, lower is better): sum_i |x_i - c_{label_i}|^2, squared Euclidean distances.
The best restart (lowest inertia, earliest on ties) is returned. Same input and seed -> same result, whatever
the thread count (with method="gemm": for the same BLAS build and thread count).

Imports nothing else of the project but ``engine.threads``; the caller validates (finite float32 (n, dim),
1 <= n_clusters <= n).
"""

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from engine.threads import blas_controllable, blas_single_thread, worker_pool

from .bank import normalise_rows

# fastmath without the no-NaN / no-inf assumptions: kernels start maxima at -inf and minima at +inf.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}

# k-means++ seeding looks at no more than this many points per cluster (a uniform subsample): seeding from
# all points reads the data once per cluster and cost more than the Lloyd iterations at 100k x 128, k = 100.
SEED_POINTS_PER_CLUSTER = 256
PARALLEL_MIN_ROWS = 16384  # "gemm" assigns in two worker threads from this many points


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (n_clusters, dim) float32, unit rows
    labels: np.ndarray  # (n,) int64 in [0, n_clusters)
    inertia: float  # sum of squared Euclidean distances of the points to their centroids
    iterations: int  # Lloyd iterations run (<= the number asked for)
    restart: int  # which restart won (0-based)


@njit(cache=True, fastmath=FAST)
def kmeanspp(x, first, uniforms):
    """k-means++ seeds: indices (k,) of distinct rows of x; first is the first seed, uniforms (k,) in [0, 1).

    Row j > 0 is drawn with probability proportional to its squared distance (float32) to the nearest seed so
    far: the first unchosen row whose cumulative weight exceeds uniforms[j] * total. If every unchosen row sits
    on a seed, the lowest unchosen row is taken. Serial: one pass per seed over at most a few MB (the caller
    subsamples), cheaper than waking a thread pool k times.
    """
    n, dim = x.shape
    k = uniforms.shape[0]
    seeds = np.empty(k, dtype=np.int64)
    chosen = np.zeros(n, dtype=np.bool_)
    mind = np.full(n, np.inf, dtype=np.float32)
    seeds[0] = first
    chosen[first] = True
    for j in range(1, k):
        c = seeds[j - 1]
        total = 0.0
        for i in range(n):
            d = np.float32(0.0)
            for t in range(dim):
                e = x[i, t] - x[c, t]
                d += e * e
            if d < mind[i]:
                mind[i] = d
            if not chosen[i]:
                total += mind[i]
        pick = -1
        if total > 0.0:
            target = uniforms[j] * total
            acc = 0.0
            for i in range(n):
                if not chosen[i] and mind[i] > 0.0:
                    acc += mind[i]
                    pick = i
                    if acc > target:
                        break
        else:
            for i in range(n):
                if not chosen[i]:
                    pick = i
                    break
        seeds[j] = pick
        chosen[pick] = True
    return seeds


@njit(cache=True, nogil=True)
def _argmax_row(scores, i, labels, best):
    bj = 0
    bs = scores[i, 0]
    for j in range(1, scores.shape[1]):
        if scores[i, j] > bs:
            bs = scores[i, j]
            bj = j
    changed = labels[i] != bj
    labels[i] = bj
    best[i] = bs
    return changed


@njit(cache=True, nogil=True)
def argmax_rows(scores, labels, best):
    """labels[i] = argmax_j scores[i, j] (lowest j on ties), best[i] = that score; returns changed labels.

    Serial on purpose: it runs between BLAS calls, and waking numba's thread pool right after BLAS's threads
    cost 2-3x the whole assignment step on 2 busy cores (measured), far more than the argmax itself.
    """
    changed = 0
    for i in range(scores.shape[0]):
        changed += _argmax_row(scores, i, labels, best)
    return changed


@njit(cache=True, parallel=True, fastmath=FAST)
def assign_fused(x, centroids, labels, best):
    """Fused numba assignment (no BLAS): same contract as sgemm + argmax_rows over all rows."""
    n, dim = x.shape
    k = centroids.shape[0]
    changed = np.zeros(n, dtype=np.int64)
    for i in prange(n):
        bj = 0
        bs = -np.inf
        for j in range(k):
            s = np.float32(0.0)
            for t in range(dim):
                s += x[i, t] * centroids[j, t]
            if s > bs:
                bs = s
                bj = j
        if labels[i] != bj:
            changed[i] = 1
        labels[i] = bj
        best[i] = bs
    return changed.sum()


@njit(cache=True, nogil=True)
def accumulate(x, labels, acc):
    """acc[labels[i]] += x[i] in float64, in point order (one part of the centroid update)."""
    for i in range(x.shape[0]):
        j = labels[i]
        for t in range(x.shape[1]):
            acc[j, t] += x[i, t]


@njit(cache=True)
def finish_centroids(acc, centroids):
    """centroids[j] = acc[j] / |acc[j]|; returns the (k,) bool mask of zero sums (left as they were)."""
    k, dim = acc.shape
    dead = np.zeros(k, dtype=np.bool_)
    for j in range(k):
        s = 0.0
        for t in range(dim):
            s += acc[j, t] * acc[j, t]
        if s == 0.0:
            dead[j] = True
        else:
            inv = 1.0 / np.sqrt(s)
            for t in range(dim):
                centroids[j, t] = np.float32(acc[j, t] * inv)
    return dead


@njit(cache=True)
def update_centroids(x, labels, centroids):
    """centroids[j] = normalised sum of cluster j's members (float64 sums, one pass over x in point order);
    returns a (k,) bool mask of the clusters left unchanged because they are empty or sum to zero.

    Serial on purpose: one streaming pass costs less than sorting the points by cluster for a parallel sum
    (measured 5 ms vs 40 ms at 100k x 128, k = 100), and the sum order is fixed whatever the thread count.
    """
    acc = np.zeros((centroids.shape[0], x.shape[1]))
    accumulate(x, labels, acc)
    return finish_centroids(acc, centroids)


def _gemm_part(x, ct, labels, best, block, lo, hi, acc):
    """Assign rows lo..hi-1 (sgemm blocks + argmax) and, with ``acc``, sum them per cluster; returns changes."""
    k = ct.shape[1]
    buf = np.empty(min(block, hi - lo) * k, dtype=np.float32)
    changed = 0
    for b0 in range(lo, hi, block):
        b1 = min(b0 + block, hi)
        s = buf[: (b1 - b0) * k].reshape(b1 - b0, k)  # (block, k)
        np.matmul(x[b0:b1], ct, out=s)
        changed += int(argmax_rows(s, labels[b0:b1], best[b0:b1]))
    if acc is not None:
        accumulate(x[lo:hi], labels[lo:hi], acc)
    return changed


def reseed(x, centroids, dead, best):
    """Re-seed the dead clusters (increasing cluster order) at the points of lowest best inner product
    (farthest from their centroid; ties by lower point index), one distinct point each, normalised."""
    far = np.argsort(best, kind="stable")
    for j, i in zip(np.flatnonzero(dead), far):
        normalise_rows(x[i : i + 1], centroids[j : j + 1])


def _assign(x, centroids, labels, best, block, method, acc=None):
    """Assign every point; returns the number of changed labels. With ``acc`` ((k, dim) float64 zeros; "gemm"
    only) the members' sums per cluster are left in it. "gemm" on large inputs: two halves of the rows in two
    worker threads, each with single-threaded sgemm, its argmax and its sums (``PARALLEL_MIN_ROWS``)."""
    if method == "fused":
        return int(assign_fused(x, centroids, labels, best))
    n = x.shape[0]
    ct = np.ascontiguousarray(centroids.T)  # (dim, k)
    if n < PARALLEL_MIN_ROWS or not blas_controllable():
        return _gemm_part(x, ct, labels, best, block, 0, n, acc)
    half = n // 2
    accs = [None, None] if acc is None else [acc, np.zeros_like(acc)]
    pool = worker_pool(2)
    with blas_single_thread():
        futures = [pool.submit(_gemm_part, x, ct, labels, best, block, lo, hi, a)
                   for (lo, hi), a in zip(((0, half), (half, n)), accs)]
        changed = sum(f.result() for f in futures)
    if acc is not None:
        acc += accs[1]
    return changed


def seed_rows(x, n_clusters, rng):
    """k-means++ seed rows: D^2 sampling over all rows, or over a uniform subsample of SEED_POINTS_PER_CLUSTER
    * n_clusters rows when there are more (draws, in order: the sorted subsample, the first seed, uniforms)."""
    n = x.shape[0]
    m = SEED_POINTS_PER_CLUSTER * n_clusters
    if n > m:
        sub = np.sort(rng.choice(n, size=m, replace=False))
        return sub[kmeanspp(np.ascontiguousarray(x[sub]), int(rng.integers(m)), rng.random(n_clusters))]
    return kmeanspp(x, int(rng.integers(n)), rng.random(n_clusters))


def _one_run(x, sqnorms_sum, n_clusters, iterations, rng, block, method):
    n = x.shape[0]
    seeds = seed_rows(x, n_clusters, rng)
    centroids = np.empty((n_clusters, x.shape[1]), dtype=np.float32)
    normalise_rows(x[seeds], centroids)
    labels = np.full(n, -1, dtype=np.int64)
    best = np.empty(n, dtype=np.float32)
    done = 0
    acc = np.zeros(centroids.shape, dtype=np.float64) if method == "gemm" else None
    for it in range(iterations):
        if acc is not None:
            acc[:] = 0.0
        changed = _assign(x, centroids, labels, best, block, method, acc)
        if it > 0 and changed == 0:
            break
        dead = update_centroids(x, labels, centroids) if acc is None else finish_centroids(acc, centroids)
        done = it + 1
        if dead.any():
            reseed(x, centroids, dead, best)
    _assign(x, centroids, labels, best, block, method)
    # |x - c|^2 = |x|^2 + |c|^2 - 2 x.c with unit centroids
    inertia = sqnorms_sum + n - 2.0 * float(np.sum(best, dtype=np.float64))
    return centroids, labels, max(inertia, 0.0), done


def spherical_kmeans(x, n_clusters, *, iterations=20, restarts=1, seed=0, block=None, method="gemm"):
    """Spherical k-means of x (n, dim) float32 C-contiguous, finite rows (unit rows expected).

    Runs ``restarts`` independent k-means++-seeded runs of at most ``iterations`` Lloyd iterations; restart r
    seeds with ``seed_rows(x, n_clusters, rng)`` from
    ``rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(restarts)[r])`` (``seed``: an int or a
    sequence of ints). ``method``: "gemm" (BLAS sgemm on row blocks + numba argmax, the default) or "fused"
    (one parallel numba kernel). Returns the best KMeansResult.
    """
    if method not in ("fused", "gemm"):
        raise ValueError(f"method must be 'fused' or 'gemm', got {method!r}")
    if block is None:
        block = max(256, (1 << 21) // max(n_clusters, 1))  # score buffer <= ~8 MB
    sqnorms_sum = float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    best_result = None
    for r, child in enumerate(np.random.SeedSequence(seed).spawn(restarts)):
        c, labels, inertia, done = _one_run(
            x, sqnorms_sum, n_clusters, iterations, np.random.default_rng(child), block, method
        )
        if best_result is None or inertia < best_result.inertia:
            best_result = KMeansResult(c, labels, inertia, done, r)
    return best_result
