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

from engine.kernels.topk import _push as _offer  # the top-k heap: offer (score, id) to a full min-heap
from engine.kernels.topk import _sift_down

# No "nnan"/"ninf": the padding is -inf and comparisons with it must stay exact.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_GROUP = 64  # scores tested per vectorised count before looking at them one by one


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
    that probe it and merge into their heaps. The list is read once: four rows at a time, against two queries
    at a time (eight dot products sharing each load), so the rows stay in cache while every query of the group
    is scored. Arrays are indexed in two dimensions in the loops (no row views: measured 1.5x faster)."""
    d = queries.shape[1]
    for li in range(lists.shape[0]):
        lst = lists[li]
        g0 = offsets[lst]
        g1 = offsets[lst + 1]
        i = starts[lst]
        hi = i + sizes[lst]
        while i + 4 <= hi:
            g = g0
            while g + 2 <= g1:
                qa = qidx[g]
                qb = qidx[g + 1]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                u0 = np.float32(0.0)
                u1 = np.float32(0.0)
                u2 = np.float32(0.0)
                u3 = np.float32(0.0)
                for t in range(d):
                    at = queries[qa, t]
                    bt = queries[qb, t]
                    v0 = vectors[i, t]
                    v1 = vectors[i + 1, t]
                    v2 = vectors[i + 2, t]
                    v3 = vectors[i + 3, t]
                    s0 += at * v0
                    s1 += at * v1
                    s2 += at * v2
                    s3 += at * v3
                    u0 += bt * v0
                    u1 += bt * v1
                    u2 += bt * v2
                    u3 += bt * v3
                if max(max(s0, s1), max(s2, s3)) >= hs[qa, 0]:
                    _offer4(hs[qa], hr[qa], s0, s1, s2, s3, ids, i)
                if max(max(u0, u1), max(u2, u3)) >= hs[qb, 0]:
                    _offer4(hs[qb], hr[qb], u0, u1, u2, u3, ids, i)
                g += 2
            if g < g1:
                qa = qidx[g]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for t in range(d):
                    at = queries[qa, t]
                    s0 += at * vectors[i, t]
                    s1 += at * vectors[i + 1, t]
                    s2 += at * vectors[i + 2, t]
                    s3 += at * vectors[i + 3, t]
                if max(max(s0, s1), max(s2, s3)) >= hs[qa, 0]:
                    _offer4(hs[qa], hr[qa], s0, s1, s2, s3, ids, i)
            i += 4
        while i < hi:
            for g in range(g0, g1):
                qa = qidx[g]
                s0 = np.float32(0.0)
                for t in range(d):
                    s0 += queries[qa, t] * vectors[i, t]
                if s0 >= hs[qa, 0]:
                    _offer(hs[qa], hr[qa], s0, ids[i])
            i += 1


@njit(cache=True, inline="always")
def _offer4(bs, br, s0, s1, s2, s3, ids, i):
    """Offer the scores of rows i .. i+3 to one query's heap."""
    _offer(bs, br, s0, ids[i])
    _offer(bs, br, s1, ids[i + 1])
    _offer(bs, br, s2, ids[i + 2])
    _offer(bs, br, s3, ids[i + 3])


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
            _sift_down(hs, hr, end, hs[end], hr[end])
            hs[end] = s
            hr[end] = r


@njit(cache=True, nogil=True)
def group_by_list(probes, sizes):
    """The (query, list) pairs of ``probes`` (nq, p; -1: none) grouped by list: ``qidx[offsets[l] :
    offsets[l + 1]]`` are the queries that probe list ``l``, in increasing order; ``todo`` the lists probed
    that hold vectors, in increasing order, and ``cost`` for each, its size times its queries."""
    nq, p = probes.shape
    nlists = sizes.shape[0]
    offsets = np.zeros(nlists + 1, dtype=np.int64)
    for i in range(nq):
        for j in range(p):
            lst = probes[i, j]
            if lst >= 0:
                offsets[lst + 1] += 1
    ntodo = 0
    for lst in range(nlists):
        if offsets[lst + 1] > 0 and sizes[lst] > 0:
            ntodo += 1
        offsets[lst + 1] += offsets[lst]
    fill = offsets[:-1].copy()
    qidx = np.empty(offsets[nlists], dtype=np.int64)
    for i in range(nq):
        for j in range(p):
            lst = probes[i, j]
            if lst >= 0:
                qidx[fill[lst]] = i
                fill[lst] += 1
    todo = np.empty(ntodo, dtype=np.int64)
    cost = np.empty(ntodo, dtype=np.int64)
    t = 0
    for lst in range(nlists):
        m = offsets[lst + 1] - offsets[lst]
        if m > 0 and sizes[lst] > 0:
            todo[t] = lst
            cost[t] = m * sizes[lst]
            t += 1
    return offsets, qidx, todo, cost


_SMALL_NORM = 1e-140  # below this a row's squared values may have underflowed float64 (as engine.searcher)
_F32_MAX = float(np.finfo(np.float32).max)


@njit(cache=True, nogil=True)
def prepare_rows(x, cosine, out):
    """``out`` = the rows of ``x`` (float32 or float64) as float32; with ``cosine`` each row divided by its L2
    norm first, in float64 from the values given (a row whose squares could underflow is scaled by its largest
    magnitude first; a zero row stays zero). Returns -1, or the first row the caller must refuse (and then
    re-examines to name them all): one holding NaN or inf once cast to float32, or, without ``cosine``, one
    whose squared norm (of the float32 values, in float64) exceeds float32's range."""
    n, d = x.shape
    for i in range(n):
        sq = 0.0
        peak = 0.0
        for t in range(d):
            v32 = np.float32(x[i, t])
            if not np.isfinite(v32):
                return i
            v = np.float64(x[i, t]) if cosine else np.float64(v32)
            sq += v * v
            peak = max(peak, abs(v))
        if not cosine:
            if sq > _F32_MAX:
                return i
            for t in range(d):
                out[i, t] = np.float32(x[i, t])
            continue
        scale = 1.0
        norm = np.sqrt(sq)
        if norm < _SMALL_NORM and peak > 0.0:
            scale = peak
            sq = 0.0
            for t in range(d):
                v = np.float64(x[i, t]) / scale
                sq += v * v
            norm = np.sqrt(sq)
        if norm == 0.0:
            norm = 1.0
        for t in range(d):
            out[i, t] = np.float32(np.float64(x[i, t]) / scale / norm)
    return -1


# -- compressed lists (engine.kernels.quant's codes; the scores as there) -----------------------------------


@njit(cache=True, nogil=True)
def copy_list_rows(src, starts, sizes, dst, new_starts):
    """Copy each list's stored rows of ``src`` (codes of any dtype), in order, to its place in ``dst``."""
    for lst in range(sizes.shape[0]):
        a = starts[lst]
        b = new_starts[lst]
        for r in range(sizes[lst]):
            dst[b + r] = src[a + r]


@njit(cache=True, nogil=True)
def scan_grouped_int8(qi, qstep, const, qidx, offsets, lists, codes, ids, use_rows, starts, sizes, hs, hr):
    """``scan_grouped`` over uint8 codes: score = float32(const[q] + qstep[q] * sum_t qi[q, t] * codes[i, t]),
    the sum in int32 (exact; ``engine.kernels.quant.levels`` keeps it below 2**31). With ``use_rows`` the heaps
    get the row ``i`` instead of ``ids[i]`` (ties then go to the lower row)."""
    d = qi.shape[1]
    for li in range(lists.shape[0]):
        lst = lists[li]
        g0 = offsets[lst]
        g1 = offsets[lst + 1]
        lo = starts[lst]
        for i in range(lo, lo + sizes[lst]):
            for g in range(g0, g1):
                qa = qidx[g]
                acc = np.int32(0)
                for t in range(d):
                    acc = np.int32(acc + np.int32(qi[qa, t]) * np.int32(np.int16(codes[i, t])))  # see quant.int8_block
                s = np.float32(const[qa] + qstep[qa] * np.float64(acc))
                if s >= hs[qa, 0]:
                    _offer(hs[qa], hr[qa], s, i if use_rows else ids[i])


_F16_UNIT = np.float32(2.0**112)


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def scan_grouped_f16(queries, qidx, offsets, lists, bits, ids, use_rows, starts, sizes, hs, hr):
    """``scan_grouped`` over float16 codes (their uint16 ``bits``), each row widened to float32 once (bit
    operations, exact) and scored against the queries that probe its list; ``use_rows`` as above."""
    d = queries.shape[1]
    buf = np.empty(d, dtype=np.uint32)
    vals = buf.view(np.float32)
    for li in range(lists.shape[0]):
        lst = lists[li]
        g0 = offsets[lst]
        g1 = offsets[lst + 1]
        lo = starts[lst]
        for i in range(lo, lo + sizes[lst]):
            for t in range(d):
                b = np.uint32(bits[i, t])
                buf[t] = ((b & np.uint32(0x8000)) << np.uint32(16)) | ((b & np.uint32(0x7FFF)) << np.uint32(13))
            for g in range(g0, g1):
                qa = qidx[g]
                s = np.float32(0.0)
                for t in range(d):
                    s += queries[qa, t] * (vals[t] * _F16_UNIT)
                if s >= hs[qa, 0]:
                    _offer(hs[qa], hr[qa], s, i if use_rows else ids[i])
