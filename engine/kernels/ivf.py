"""Inverted-file kernels: scanning probed lists into per-query top-k heaps, and laying the lists out.

Plain numba functions over C-contiguous arrays; the caller (``engine.ivf``) validates and allocates.
Imports nothing else of the project.

Layout (owned by the caller): the stored rows of list ``l`` are ``vectors[starts[l] : starts[l] + sizes[l]]``
with their ids in ``ids`` at the same rows; ``starts`` (nlists + 1,) is increasing and ``starts[l + 1] -
starts[l]`` is list ``l``'s capacity (rows past its size are free slack for later adds).

Heaps: per query a binary min-heap of the k best (score, id) pairs seen so far, worst at index 0, in
``hs`` (nq, k) float32 and ``hr`` (nq, k) int64, padding -inf / -1. Order ("better than"): a higher score,
then the lower id, so an answer does not depend on where a vector sits in the layout. This is the order of
``engine.kernels.topk``'s heaps with ids in place of rows, so its ``heap_sort`` and ``merge_heaps`` finish
what these kernels start.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# No "nnan"/"ninf": the padding is -inf and comparisons with it must stay exact.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_GROUP = 64  # scores tested per vectorised count before looking at them one by one


@njit(cache=True, inline="always")
def _better(s1, r1, s2, r2):
    return s1 > s2 or (s1 == s2 and r1 < r2)


@njit(cache=True, inline="always")
def _sift_down(hs, hr, s, r):
    """Put (s, r) at the root of the full min-heap (hs, hr) (worst at 0) and sift it down."""
    size = hs.shape[0]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        c = left
        right = left + 1
        if right < size and _better(hs[left], hr[left], hs[right], hr[right]):
            c = right
        if _better(s, r, hs[c], hr[c]):
            hs[i] = hs[c]
            hr[i] = hr[c]
            i = c
        else:
            break
    hs[i] = s
    hr[i] = r


@njit(cache=True, inline="always")
def _offer(hs, hr, s, r):
    if _better(s, r, hs[0], hr[0]):
        _sift_down(hs, hr, s, r)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def merge_gathered(scores, m, n, qidx, cand_ids, hs, hr):
    """Merge ``scores[j, :n]`` (the scores of the stored rows whose ids are ``cand_ids[:n]``) into the heap
    of query ``qidx[j]``, for j < m. Scores are counted against the heap's worst ``_GROUP`` at a time (a
    vectorised loop) and looked at one by one only in groups that hold a candidate."""
    for j in range(m):
        qi = qidx[j]
        row = scores[j]
        bs = hs[qi]
        br = hr[qi]
        thr = bs[0]
        t = 0
        while t + _GROUP <= n:
            c = 0
            for u in range(_GROUP):
                c += row[t + u] >= thr
            if c > 0:
                for u in range(_GROUP):
                    s = row[t + u]
                    if s >= thr:
                        _offer(bs, br, s, cand_ids[t + u])
                        thr = bs[0]
            t += _GROUP
        while t < n:
            s = row[t]
            if s >= thr:
                _offer(bs, br, s, cand_ids[t])
                thr = bs[0]
            t += 1


@njit(cache=True, nogil=True)
def place_rows(x, new_ids, labels, vectors, ids, starts, sizes, rows_out):
    """Append ``x[i]`` (id ``new_ids[i]``) to list ``labels[i]``, in order; ``rows_out[i]`` = its row. The
    caller has made room (every list's size stays within its capacity)."""
    for i in range(x.shape[0]):
        lst = labels[i]
        r = starts[lst] + sizes[lst]
        vectors[r] = x[i]
        ids[r] = new_ids[i]
        rows_out[i] = r
        sizes[lst] += 1


@njit(cache=True, nogil=True)
def copy_lists(vectors, ids, starts, sizes, new_vectors, new_ids, new_starts):
    """Copy each list's stored rows, in order, to the start of its place in the new layout."""
    for lst in range(sizes.shape[0]):
        a = starts[lst]
        b = new_starts[lst]
        for r in range(sizes[lst]):
            new_vectors[b + r] = vectors[a + r]
            new_ids[b + r] = ids[a + r]


@njit(cache=True, nogil=True)
def argmax_labels(scores, m, labels, out0):
    """``labels[out0 + i]`` = the column of ``scores[i]``'s highest value (lowest column on ties), i < m."""
    for i in range(m):
        row = scores[i]
        bj = 0
        bv = row[0]
        for j in range(1, row.shape[0]):
            if row[j] > bv:
                bv = row[j]
                bj = j
        labels[out0 + i] = bj


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def scan_grouped(queries, qidx, offsets, lists, vectors, ids, starts, sizes, hs, hr):
    """For each list in ``lists``, score its rows against the queries ``qidx[offsets[l] : offsets[l + 1]]``
    that probe it and merge into their heaps: the list's rows are read once, four at a time, and stay in
    cache while every query of the group is scored against them."""
    d = queries.shape[1]
    for li in range(lists.shape[0]):
        lst = lists[li]
        g0 = offsets[lst]
        g1 = offsets[lst + 1]
        i = starts[lst]
        hi = i + sizes[lst]
        while i + 4 <= hi:
            x0 = vectors[i]
            x1 = vectors[i + 1]
            x2 = vectors[i + 2]
            x3 = vectors[i + 3]
            for g in range(g0, g1):
                qi = qidx[g]
                q = queries[qi]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for t in range(d):
                    a = q[t]
                    s0 += a * x0[t]
                    s1 += a * x1[t]
                    s2 += a * x2[t]
                    s3 += a * x3[t]
                bs = hs[qi]
                if max(max(s0, s1), max(s2, s3)) >= bs[0]:
                    br = hr[qi]
                    _offer(bs, br, s0, ids[i])
                    _offer(bs, br, s1, ids[i + 1])
                    _offer(bs, br, s2, ids[i + 2])
                    _offer(bs, br, s3, ids[i + 3])
            i += 4
        while i < hi:
            x0 = vectors[i]
            for g in range(g0, g1):
                qi = qidx[g]
                q = queries[qi]
                s0 = np.float32(0.0)
                for t in range(d):
                    s0 += q[t] * x0[t]
                if s0 >= hs[qi, 0]:
                    _offer(hs[qi], hr[qi], s0, ids[i])
            i += 1


@njit(cache=True, nogil=True)
def top_lists(cs, sizes, nprobe, probes):
    """``probes[i]`` = the ``nprobe`` non-empty lists of highest coarse score ``cs[i]`` (nq, nlists), best
    first (ties: the lower list), padded with -1 when fewer lists hold vectors."""
    nq, nl = cs.shape
    hs = np.empty(nprobe, dtype=np.float32)
    for i in range(nq):
        hs[:] = -np.inf
        hr = probes[i]
        hr[:] = -1
        row = cs[i]
        for lst in range(nl):
            if sizes[lst] > 0:
                _offer(hs, hr, row[lst], lst)
        for end in range(nprobe - 1, 0, -1):  # heap sort, best first
            s = hs[0]
            r = hr[0]
            _sift_down(hs[:end], hr[:end], hs[end], hr[end])
            hs[end] = s
            hr[end] = r


@njit(cache=True, nogil=True)
def group_by_list(probes, nlists):
    """The (query, list) pairs of ``probes`` (nq, p; -1: none) grouped by list: ``qidx[offsets[l] :
    offsets[l + 1]]`` are the queries that probe list ``l``, in increasing order."""
    nq, p = probes.shape
    offsets = np.zeros(nlists + 1, dtype=np.int64)
    for i in range(nq):
        for j in range(p):
            lst = probes[i, j]
            if lst >= 0:
                offsets[lst + 1] += 1
    for lst in range(nlists):
        offsets[lst + 1] += offsets[lst]
    fill = offsets[:-1].copy()
    qidx = np.empty(offsets[nlists], dtype=np.int64)
    for i in range(nq):
        for j in range(p):
            lst = probes[i, j]
            if lst >= 0:
                qidx[fill[lst]] = i
                fill[lst] += 1
    return offsets, qidx
