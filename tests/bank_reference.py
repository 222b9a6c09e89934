"""Slow numpy oracles (explicit loops, float64) for the memory-bank and k-means kernels."""

import numpy as np

ZERO_MIX = 1e-5


def update_ref(bank, idx, new, r):
    """The documented loop: for j in batch order, v[idx[j]] = normalise(r new[j] + (1 - r) v[idx[j]]);
    a cancelled mix keeps the old row. Returns a new float32 array."""
    out = bank.astype(np.float64)
    for j, i in enumerate(idx):
        a = new[j].astype(np.float64)
        o = out[i].copy()
        x = r * a + (1 - r) * o
        nx = np.linalg.norm(x)
        if nx == 0 or nx <= ZERO_MIX * (r * np.linalg.norm(a) + (1 - r) * np.linalg.norm(o)):
            continue
        out[i] = x / nx
        out[i] = out[i].astype(np.float32)  # the bank stores float32 between steps
    return out.astype(np.float32)


def set_ref(bank, idx, new):
    out = bank.copy()
    for j, i in enumerate(idx):
        a = new[j].astype(np.float64)
        out[i] = a / np.linalg.norm(a)
    return out


def normalise_ref(x):
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        n = np.linalg.norm(row)
        if n > 0:
            out[i] = row / n
    return out


def knn_ref(bank, queries, k, exclude=None):
    """Top-k by inner product in float64, ties by lower index, the excluded row skipped; pads -inf / -1."""
    m, n = queries.shape[0], bank.shape[0]
    s = queries.astype(np.float64) @ bank.astype(np.float64).T  # (m, n)
    allowed = np.ones((m, n), dtype=bool)
    if exclude is not None:
        for q, e in enumerate(exclude):
            if e >= 0:
                allowed[q, e] = False
    cols = np.broadcast_to(np.arange(n), (m, n))
    order = np.lexsort((cols, np.where(allowed, -s, np.inf)), axis=-1)  # (m, n): best first, then excluded
    scores = np.full((m, k), -np.inf)
    ids = np.full((m, k), -1, dtype=np.int64)
    take = min(k, n)
    top = order[:, :take]
    ok = np.take_along_axis(allowed, top, axis=1)
    scores[:, :take] = np.where(ok, np.take_along_axis(s, top, axis=1), -np.inf)
    ids[:, :take] = np.where(ok, top, -1)
    return scores, ids


def check_knn(bank, queries, k, exclude, scores, ids, atol=1e-5):
    """Tie-aware comparison: the returned scores match the oracle's top-k scores, each returned id really has
    its returned score, ids are distinct and never the excluded row; ids equal the oracle's wherever the
    oracle's score is not within atol of another of its top-k scores (no tie there)."""
    ref_s, ref_i = knn_ref(bank, queries, k, exclude)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (queries.shape[0], k)
    np.testing.assert_array_equal(ids == -1, ref_i == -1)
    np.testing.assert_array_equal(np.isneginf(scores), np.isneginf(ref_s))
    found = ref_i >= 0
    np.testing.assert_allclose(scores[found], ref_s[found], atol=atol)
    q64 = queries.astype(np.float64)
    true = np.einsum("qkd,qd->qk", bank.astype(np.float64)[np.where(found, ids, 0)], q64)  # (m, k)
    np.testing.assert_allclose(scores[found], true[found], atol=atol)
    srt = np.sort(np.where(found, ids, -1 - np.arange(k)), axis=1)  # padding made distinct
    assert (np.diff(srt, axis=1) > 0).all(), "an id is returned twice for one query"
    if exclude is not None:
        assert not (found & (ids == np.asarray(exclude)[:, None])).any(), "the excluded row was returned"
    fs = np.where(found, ref_s, np.nan)  # padding never ties
    near = np.abs(fs[:, :, None] - fs[:, None, :]) <= atol  # (m, k, k)
    untied = found & (near.sum(axis=2) == 1)
    np.testing.assert_array_equal(ids[untied], ref_i[untied])


def kmeanspp_ref(x, first, uniforms):
    n = x.shape[0]
    x64 = x.astype(np.float64)
    seeds = [int(first)]
    mind = np.full(n, np.inf)
    chosen = np.zeros(n, dtype=bool)
    chosen[first] = True
    for j in range(1, len(uniforms)):
        d = ((x64 - x64[seeds[-1]]) ** 2).sum(axis=1)
        mind = np.minimum(mind, d)
        w = np.where(chosen, 0.0, mind)
        total = w.sum()
        if total > 0:
            cum = np.cumsum(w)
            pick = int(np.flatnonzero(cum > uniforms[j] * total)[0]) if (cum > uniforms[j] * total).any() else int(
                np.flatnonzero(w > 0)[-1]
            )
        else:
            pick = int(np.flatnonzero(~chosen)[0])
        seeds.append(pick)
        chosen[pick] = True
    return np.array(seeds, dtype=np.int64)


def assign_ref(x, centroids):
    """labels (argmax inner product, lowest index on ties) and the best inner products, float64."""
    s = x.astype(np.float64) @ centroids.astype(np.float64).T
    labels = np.argmax(s, axis=1)  # numpy's argmax takes the first maximum
    return labels.astype(np.int64), s[np.arange(x.shape[0]), labels]


def inertia_ref(x, centroids, labels):
    d = x.astype(np.float64) - centroids.astype(np.float64)[labels]
    return float((d * d).sum())


def update_centroids_ref(x, labels, centroids):
    """Normalised member sums; returns (new centroids, dead mask) -- dead clusters keep their old centroid."""
    out = centroids.astype(np.float64).copy()
    dead = np.zeros(centroids.shape[0], dtype=bool)
    for j in range(centroids.shape[0]):
        s = x[labels == j].astype(np.float64).sum(axis=0)
        nrm = np.linalg.norm(s)
        if nrm == 0:
            dead[j] = True
        else:
            out[j] = s / nrm
    return out, dead


def seed_rows_ref(x, n_clusters, rng, per_cluster=256):
    """k-means++ over all rows, or over a sorted uniform subsample of per_cluster * n_clusters rows."""
    n = x.shape[0]
    m = per_cluster * n_clusters
    if n > m:
        sub = np.sort(rng.choice(n, size=m, replace=False))
        return sub[kmeanspp_ref(x[sub], int(rng.integers(m)), rng.random(n_clusters))]
    return kmeanspp_ref(x, int(rng.integers(n)), rng.random(n_clusters))


def spherical_kmeans_ref(x, n_clusters, iterations, rng):
    """The documented algorithm, step by step, in float64; rng: the restart's numpy Generator."""
    seeds = seed_rows_ref(x, n_clusters, rng)
    c = normalise_ref(x[seeds])
    labels = np.full(x.shape[0], -1, dtype=np.int64)
    for it in range(iterations):
        new_labels, best = assign_ref(x, c)
        changed = (new_labels != labels).sum()
        labels = new_labels
        if it > 0 and changed == 0:
            break
        c, dead = update_centroids_ref(x, labels, c)
        far = np.argsort(best, kind="stable")
        for j, i in zip(np.flatnonzero(dead), far):
            c[j] = normalise_ref(x[i : i + 1])[0]
    labels, _ = assign_ref(x, c)
    return c, labels, inertia_ref(x, c, labels)
