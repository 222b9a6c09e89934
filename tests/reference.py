"""Slow numpy oracles the tests compare the engine with (float64, explicit, obviously right).

A plain module of functions; add new oracles at the end.
"""

from __future__ import annotations

import numpy as np


def normalize(x) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm, in float64; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def topk_ip(queries, vectors, k):
    """Exact top-k by inner product in float64: ``(scores (nq, k) float64, rows (nq, k) int64)``.

    Best first: higher score, then lower row. With fewer than k vectors, padded with -inf / -1.
    """
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(vectors, dtype=np.float64)
    nq, n = q.shape[0], x.shape[0]
    scores = np.full((nq, k), -np.inf)
    rows = np.full((nq, k), -1, dtype=np.int64)
    kk = min(k, n)
    if kk == 0:
        return scores, rows
    all_scores = q @ x.T  # (nq, n)
    order = np.lexsort((np.broadcast_to(np.arange(n), (nq, n)), -all_scores), axis=1)[:, :kk]  # -score, row
    scores[:, :kk] = np.take_along_axis(all_scores, order, axis=1)
    rows[:, :kk] = order
    return scores, rows


def check_topk(scores, ids, queries, vectors, k, *, vector_ids=None, atol=1e-5):
    """Assert that ``(scores, ids)`` is an exact top-k answer of ``queries`` against ``vectors``.

    Allows only the freedom floating point leaves: entries may differ from the float64 oracle only where
    their true scores tie within ``atol``. ``vector_ids[j]`` is the id of ``vectors[j]`` (default: j).
    Checks dtypes, shapes, padding, each returned score against the true dot product, uniqueness, order,
    and that every returned id belongs to the true top k up to near-ties.
    """
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(vectors, dtype=np.float64)
    nq, n = q.shape[0], x.shape[0]
    vector_ids = np.arange(n) if vector_ids is None else np.asarray(vector_ids, dtype=np.int64)
    assert scores.dtype == np.float32 and ids.dtype == np.int64, (scores.dtype, ids.dtype)
    assert scores.shape == (nq, k) and ids.shape == (nq, k), (scores.shape, ids.shape, (nq, k))
    ref_scores, _ = topk_ip(q, x, k)
    kk = min(k, n)
    assert (ids[:, kk:] == -1).all() and np.isneginf(scores[:, kk:]).all(), "padding past n must be -1 / -inf"
    if kk == 0:
        return
    np.testing.assert_allclose(scores[:, :kk], ref_scores[:, :kk], rtol=0, atol=atol)
    got = ids[:, :kk]
    by_id = np.argsort(vector_ids, kind="stable")
    pos = np.searchsorted(vector_ids, got, sorter=by_id)
    pos = np.minimum(pos, n - 1)
    rows = by_id[pos]
    assert (vector_ids[rows] == got).all(), f"ids not stored: {np.unique(got[vector_ids[rows] != got])}"
    assert (np.sort(got, axis=1)[:, 1:] != np.sort(got, axis=1)[:, :-1]).all(), "repeated ids in an answer"
    true = np.einsum("qkd,qd->qk", x[rows], q)  # (nq, kk) true scores of the returned ids
    np.testing.assert_allclose(scores[:, :kk], true, rtol=0, atol=atol, err_msg="score vs true dot product")
    assert (np.diff(scores[:, :kk], axis=1) <= 0).all(), "scores not best first"
    kth = ref_scores[:, kk - 1 : kk]
    assert (true >= kth - 2 * atol).all(), f"an id outside the top {k} (beyond ties)"
