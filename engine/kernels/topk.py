"""Exact top-k by inner product over contiguous float32 arrays (numba kernels and their driver).

Entry point: ``topk_ip(queries, vectors, n, k)`` -> ``(scores, rows)``, both (nq, k), best first. The
caller (``engine.searcher``) validates and coerces; here inputs are trusted: ``queries`` (nq, d) and
``vectors`` (>= n, d) are C-contiguous float32 without NaN or inf, ``k >= 1``.

Order ("better than"): a higher score first; on equal scores, the lower row first. The answer is
deterministic: the first k rows by (-score, row). Rows past ``n`` never appear; when ``k > n`` the
answer is padded with row -1 and score -inf. Zero vectors score 0 like any other. Padding costs memory
that follows ``k``, not the rows: the callers answer ``engine.result_size.answer_columns(k, n)`` columns (k,
but never more than ``max(n, PAD_COLUMNS)``), so a huge ``k`` costs no more than the stored rows or a small
fixed width. Worker threads and the BLAS thread count come from ``engine.threads``.

Result state: per query a binary min-heap of the k best candidates seen so far, worst at index 0, in two
arrays ``best_scores`` (nq, k) float32 and ``best_rows`` (nq, k) int64 (``heap_init`` fills them with
padding, ``merge_heaps`` folds one set of heaps into another, ``heap_sort`` orders them best first).

Methods (``topk_ip(method=...)``):
- ``"gemm"`` (the default): the stored rows are walked in blocks; the scores of a block against a tile of
  queries come from a BLAS matrix product (numpy) into a buffer of ``GEMM_BUFFER_FLOATS`` floats that
  stays in cache, and are merged into per-query heaps with ``merge_block_serial``. The merge counts the
  scores above the current k-th best 64 at a time (a vectorised loop) and looks closer only at groups
  that hold one, so it costs a few percent of the product. Two ways to use the cores:
  - ``threads=None`` or ``1`` (the default): one part, in the calling thread; BLAS spreads each product
    over its own threads (numpy's setting). Measured on the quiet 2-core reference machine, interleaved
    with the bare product (BENCHMARKS.md): 0.94-1.11x the floor at every Q.
  - ``threads=N >= 2``: the rows are cut into parts (2 per worker) searched by N worker threads, BLAS at
    one thread per call meanwhile (threadpoolctl, restored afterwards), the parts' heaps merged at the end:
    one thread synchronisation per search instead of one per block. It equals the default when the
    machine is otherwise idle, but loses a core to BLAS's own idle threads, which keep spinning for a
    while after any multi-threaded numpy product (0.62-0.78x the floor at 1 and 16 queries when
    interleaved with it): that is why it is not the default. Without threadpoolctl it runs as one part.
  Small searches (<= ``SMALL_WORK`` multiply-adds) use few large BLAS calls.
- ``"fused"``: ``fused_topk`` computes dot products and keeps the heaps in one numba-parallel pass over
  the rows (read from memory once). Measured slower than "gemm" at 1, 4 and 16 queries on the
  reference machine; kept for BLAS-less experiments. ``"auto"`` means "gemm".
Memory stays bounded: never a full (nq, n) score matrix; a search allocates its buffers, one per worker,
plus the heaps.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
from numba import njit, prange

from engine.result_size import ResultTooLarge
from engine.threads import blas_controllable, blas_single_thread, numba_parallel_guard, worker_pool

# No "nnan"/"ninf": the padding is -inf and comparisons with it must stay exact.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

GEMM_BUFFER_FLOATS = 1 << 20  # score buffer per worker: 1M floats = 4 MiB, stays in cache
GEMM_MAX_QUERIES = 2048  # queries per BLAS call (query tile)
GEMM_MIN_BLOCK = 512  # fewest stored rows per BLAS call
MIN_PART_ROWS = 8192  # fewest stored rows worth a part of their own
SMALL_WORK = 1 << 24  # nq * n * d multiply-adds up to this (a few ms): one part, in the calling thread
ONE_CALL_FLOATS = 1 << 22  # score buffer of that one part: up to 4M floats = 16 MiB
_GROUP = 64  # scores tested per vectorised count in the merge scan (64: LLVM vectorises the loop)


# -- heaps -------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _better(s1, r1, s2, r2):
    """True when candidate (s1, r1) ranks above (s2, r2): higher score, then lower row."""
    return s1 > s2 or (s1 == s2 and r1 < r2)


@njit(cache=True, inline="always")
def _sift_down(hs, hr, size, s, r):
    """Place (s, r) at the root of the min-heap ``hs[:size]`` / ``hr[:size]`` (worst at 0) and sift it down."""
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        c = left  # the worse child
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
def _push(hs, hr, s, r):
    """Offer (s, r) to a full heap: it replaces the worst entry when it ranks above it."""
    if _better(s, r, hs[0], hr[0]):
        _sift_down(hs, hr, hs.shape[0], s, r)


def heap_init(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Heaps for ``nq`` queries holding only padding: scores -inf, rows -1."""
    try:
        return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)
    except (MemoryError, ValueError):  # ValueError: numpy's "array is too big" / "maximum dimension exceeded"
        raise ResultTooLarge(
            f"{nq} x {k} results (scores and rows, {nq * k * 12 / 2**30:.3g} GiB) cannot be allocated"
        ) from None


@njit(cache=True, nogil=True)
def merge_heaps(src_scores, src_rows, best_scores, best_rows):
    """Offer every real entry of the heaps ``src_*`` (nq, k) to the heaps ``best_*`` (nq, k)."""
    nq, k = src_scores.shape
    for q in range(nq):
        for j in range(k):
            if src_rows[q, j] >= 0:
                _push(best_scores[q], best_rows[q], src_scores[q, j], src_rows[q, j])


@njit(cache=True, nogil=True)
def heap_sort(best_scores, best_rows):
    """Order each query's heap best first (higher score, then lower row), in place; padding goes last."""
    nq, k = best_scores.shape
    for q in range(nq):
        hs = best_scores[q]
        hr = best_rows[q]
        for end in range(k - 1, 0, -1):  # move the worst (the root) to the end of the shrinking heap
            s, r = hs[0], hr[0]
            _sift_down(hs, hr, end, hs[end], hr[end])
            hs[end] = s
            hr[end] = r


# -- merging blocks of scores ----------------------------------------------------------------------


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def _merge_row(row, n, row0, hs, hr):
    """Merge ``row[:n]``, the scores of stored rows ``row0 .. row0+n-1``, into one query's heap (hs, hr).

    Those rows are higher than every row in the heap, so a score equal to the k-th best never enters.
    """
    k = hs.shape[0]
    thr = hs[0]
    j = 0
    while j + _GROUP <= n:
        c = 0
        for t in range(_GROUP):
            c += row[j + t] > thr
        if c > 0:
            for t in range(_GROUP):
                s = row[j + t]
                if s > thr:
                    _sift_down(hs, hr, k, s, row0 + j + t)
                    thr = hs[0]
        j += _GROUP
    while j < n:
        s = row[j]
        if s > thr:
            _sift_down(hs, hr, k, s, row0 + j)
            thr = hs[0]
        j += 1


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def merge_block_serial(scores, n, row0, best_scores, best_rows):
    """Merge ``scores[:, :n]`` (nq, >= n), the scores of stored rows ``row0 .. row0+n-1``, into the heaps.

    In the calling thread, without the GIL. Blocks must come in increasing row order (see ``_merge_row``).
    """
    for q in range(scores.shape[0]):
        _merge_row(scores[q], n, row0, best_scores[q], best_rows[q])


# -- fused pass ----------------------------------------------------------------------------------


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def fused_topk(queries, vectors, n, nchunks, best_scores, best_rows):
    """Top-k of ``queries`` (nq, d) against ``vectors[:n]`` in one parallel pass; merges into the heaps.

    The rows are split into ``nchunks`` contiguous chunks, each searched with its own heaps (four rows at
    a time: each query vector is loaded once per four rows); the chunk heaps are then merged into
    ``best_scores`` / ``best_rows``, which may already hold candidates.
    """
    nq, d = queries.shape
    k = best_scores.shape[1]
    cs = np.empty((nchunks, nq, k), dtype=np.float32)
    cr = np.empty((nchunks, nq, k), dtype=np.int64)
    step = (n + nchunks - 1) // nchunks
    for c in prange(nchunks):
        hs = cs[c]
        hr = cr[c]
        hs[:] = -np.inf
        hr[:] = -1
        thr = np.full(nq, -np.inf, dtype=np.float32)
        lo = c * step
        hi = min(n, lo + step)
        i = lo
        while i + 4 <= hi:
            x0 = vectors[i]
            x1 = vectors[i + 1]
            x2 = vectors[i + 2]
            x3 = vectors[i + 3]
            for q in range(nq):
                qv = queries[q]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for t in range(d):
                    a = qv[t]
                    s0 += a * x0[t]
                    s1 += a * x1[t]
                    s2 += a * x2[t]
                    s3 += a * x3[t]
                if max(max(s0, s1), max(s2, s3)) > thr[q]:
                    if s0 > thr[q]:
                        _sift_down(hs[q], hr[q], k, s0, i)
                        thr[q] = hs[q, 0]
                    if s1 > thr[q]:
                        _sift_down(hs[q], hr[q], k, s1, i + 1)
                        thr[q] = hs[q, 0]
                    if s2 > thr[q]:
                        _sift_down(hs[q], hr[q], k, s2, i + 2)
                        thr[q] = hs[q, 0]
                    if s3 > thr[q]:
                        _sift_down(hs[q], hr[q], k, s3, i + 3)
                        thr[q] = hs[q, 0]
            i += 4
        while i < hi:
            x0 = vectors[i]
            for q in range(nq):
                qv = queries[q]
                s0 = np.float32(0.0)
                for t in range(d):
                    s0 += qv[t] * x0[t]
                if s0 > thr[q]:
                    _sift_down(hs[q], hr[q], k, s0, i)
                    thr[q] = hs[q, 0]
            i += 1
    for c in range(nchunks):
        merge_heaps(cs[c], cr[c], best_scores, best_rows)


# -- driver --------------------------------------------------------------------------------------

def _gemm_part(queries, vectors, lo, hi, k, rows):
    """Heaps of the stored rows ``lo .. hi-1``: BLAS scores block by block, merged as they come."""
    nq = queries.shape[0]
    best_scores, best_rows = heap_init(nq, k)
    qtile = min(nq, GEMM_MAX_QUERIES)
    buf = np.empty((qtile, rows), dtype=np.float32)
    for q0 in range(0, nq, qtile):
        q1 = min(nq, q0 + qtile)
        bs, br = best_scores[q0:q1], best_rows[q0:q1]
        for r0 in range(lo, hi, rows):
            r1 = min(hi, r0 + rows)
            out = buf[: q1 - q0, : r1 - r0]
            np.matmul(queries[q0:q1], vectors[r0:r1].T, out=out)
            merge_block_serial(out, r1 - r0, r0, bs, br)
    return best_scores, best_rows


def topk_ip(queries, vectors, n, k, *, method="auto", threads=None, parts=None, block_rows=None):
    """Exact top-k by inner product of ``queries`` (nq, d) against ``vectors[:n]``; see the module notes.

    Returns ``(scores (nq, k) float32, rows (nq, k) int64)``, best first, padded with -inf / -1 (a ``k``
    whose result arrays cannot be allocated raises ``engine.result_size.ResultTooLarge``, a MemoryError; callers
    bound ``k`` with ``answer_columns``, which keeps the padding small).
    ``method``: "auto" (= "gemm"), "gemm" or "fused"; for "gemm": ``threads`` None or 1 searches in the
    calling thread with BLAS's own threads, N >= 2 uses N worker threads over ``parts`` parts of the rows
    (default: 2 per worker, at least ``MIN_PART_ROWS`` rows each) with single-threaded BLAS;
    ``block_rows`` stored rows per BLAS call.
    """
    nq = queries.shape[0]
    if method not in ("auto", "gemm", "fused"):
        raise ValueError(f"method must be 'auto', 'gemm' or 'fused', got {method!r}")
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be None or a positive int, got {threads!r}")
    threads = 1 if threads is None or not blas_controllable() else int(threads)
    if method == "auto":
        method = "gemm"
    if n == 0 or nq == 0:
        return heap_init(nq, k)
    if k > n:  # every row is a hit: search for n, then pad (heaps of k would only hold padding)
        scores, rows = topk_ip(queries, vectors, n, n, method=method, threads=threads, parts=parts,
                               block_rows=block_rows)
        best_scores, best_rows = heap_init(nq, k)
        best_scores[:, :n] = scores
        best_rows[:, :n] = rows
        return best_scores, best_rows
    if method == "fused":
        best_scores, best_rows = heap_init(nq, k)
        nchunks = max(1, min(8 * numba.get_num_threads(), n // 4096))
        with numba_parallel_guard(), numba.parallel_chunksize(1):
            fused_topk(queries, vectors, n, nchunks, best_scores, best_rows)
    else:
        rows = block_rows or max(GEMM_MIN_BLOCK, GEMM_BUFFER_FLOATS // min(nq, GEMM_MAX_QUERIES))
        if parts is None:
            small = nq * n * queries.shape[1] <= SMALL_WORK
            parts = 1 if threads == 1 or small else min(2 * threads, math.ceil(n / MIN_PART_ROWS))
            if small and not block_rows:  # few BLAS calls (one at one query), as in the bare product
                rows = max(rows, ONE_CALL_FLOATS // min(nq, GEMM_MAX_QUERIES))
        parts = max(1, min(parts, n))
        if parts == 1:
            best_scores, best_rows = _gemm_part(queries, vectors, 0, n, k, min(rows, n))
        else:
            step = math.ceil(n / parts)
            pool = worker_pool(threads)
            with blas_single_thread() if blas_controllable() else contextlib.nullcontext():
                futures = [
                    pool.submit(_gemm_part, queries, vectors, lo, min(n, lo + step), k, min(rows, step))
                    for lo in range(0, n, step)
                ]
                results = [f.result() for f in futures]
            best_scores, best_rows = results[0]
            for s, r in results[1:]:
                merge_heaps(s, r, best_scores, best_rows)
    heap_sort(best_scores, best_rows)
    return best_scores, best_rows
