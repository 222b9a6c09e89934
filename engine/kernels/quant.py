"""Compressed vectors: float16 and int8 (scalar-quantised) codes, and exact top-k over them.

Codes (what ``engine.searcher.Searcher(storage=...)`` keeps resident instead of float32 rows):
- ``"float16"``: each component rounded to float16 (numpy's round to nearest even), stored as its 16 bits.
  A row's value is exactly ``codes.astype(float32)``.
- ``"int8"``: per dimension j an ``offset[j]`` and a ``scale[j] > 0`` (float32); component x becomes the code
  ``c = clip(rint((x - offset[j]) / scale[j]), 0, 255)`` (uint8, float32 arithmetic, so the encoding is the
  same on every CPU), which stands for ``offset[j] + scale[j] * c``.

Scores (``topk_codes``): the inner product of each float32 query with the stored rows' dequantised values.
- int8, exact and the same on every CPU: with ``q'[j] = q[j] * scale[j]`` (float64, exact) the score is
  ``sum_j q[j] offset[j] + sum_j q'[j] c[j]``. The first sum is one constant per query (``math.fsum`` of the
  exact float64 products: correctly rounded). For the second, ``q'`` is rounded to integers ``qi`` of at most
  ``levels(dim)`` in magnitude with one step ``qstep = max|q'| / levels`` per query, and ``sum_j qi[j] c[j]`` is
  accumulated in int32 (never int16: ``levels`` bounds it below 2**31, so it cannot saturate or wrap on any
  CPU, AVX2 without VNNI included; ``qi`` fits int16, so the products are int16 x int16 pairs summed in 32
  bits: ``vpmaddwd``, which does not saturate, never ``vpmaddubsw``, which does). score = float32(const + qstep * acc), in float64. Its distance from the
  dequantised inner product is at most ``qstep / 2 * sum_j c[j]`` (the rounding of ``q'``), about 1 / 70 of
  the quantisation's own error at dim 128. Few queries: a numba kernel (int32 accumulator); many: BLAS in
  float64 over the integers (every product and partial sum is an integer below 2**53, so exact whatever the
  order): both give the same bits.
- float16: float32 products summed in float32 (few queries: a numba kernel that widens the 16 bits by bit
  operations; many: the block widened to float32, then BLAS). Like the float32 index, the last bits of a
  score may depend on the summation order (CPU, BLAS); nothing can saturate.

Order and padding as ``engine.kernels.topk``: higher score first, then the lower row; -inf / -1 padding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from engine.kernels.topk import heap_init, heap_sort, merge_block_serial, merge_heaps
from engine.threads import blas_controllable, blas_single_thread, worker_pool

STORAGES = ("float32", "float16", "int8")
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # float16 kernels only (the int8 one is exact)
FEW_QUERIES = 8  # up to this many queries: the numba kernels; more: BLAS over widened blocks
BLOCK_FLOATS = 1 << 20  # scores (or widened values) per block: 4-8 MiB, stays in cache
MIN_BLOCK = 256  # fewest stored rows per block
PART_ROWS = 1 << 16  # fewest rows per worker part in the numba kernels
_F16_UNIT = np.float32(2.0**112)  # float16 magnitude bits << 13 read as float32, times this: the value
_INT32_MAX = 2**31 - 1


def levels(dim: int) -> int:
    """Largest |integer| a query component is rounded to (int8 scores): ``dim * 255 * levels < 2**31``."""
    return min(32767, _INT32_MAX // (255 * dim))


# -- encoding -------------------------------------------------------------------------------------


def int8_range(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float64 per dimension of the rows ``x`` (n >= 1, dim)."""
    return x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)


def int8_params(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) float32 (dim,) that cover ``[lo, hi]`` per dimension in 255 steps: offset = lo, scale =
    (hi - lo) / 255, or 1 where that is not a positive float32 (a constant dimension: code 0 is exact)."""
    offset = lo.astype(np.float32)
    scale = ((hi - offset.astype(np.float64)) / 255.0).astype(np.float32)
    bad = ~(np.isfinite(scale) & (scale > 0))
    scale[bad] = 1.0
    return scale, offset


def encode_int8(x: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """uint8 codes (n, dim) of float32 rows ``x``: clip(rint((x - offset) / scale), 0, 255), in float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        c = np.rint((x - offset) / scale)
    np.clip(c, 0, 255, out=c)
    return c.astype(np.uint8)


def encode_float16(x: np.ndarray) -> np.ndarray:
    """float16 codes (n, dim) of float32 rows ``x`` (the caller refuses values beyond float16's range)."""
    return x.astype(np.float16)


def decode(codes: np.ndarray, scale=None, offset=None) -> np.ndarray:
    """The float32 values the codes stand for (the slow reference the tests compare the kernels with)."""
    if codes.dtype == np.float16:
        return codes.astype(np.float32)
    return offset + scale * codes.astype(np.float32)


# -- int8 ----------------------------------------------------------------------------------------


def int8_queries(queries: np.ndarray, scale: np.ndarray, offset: np.ndarray):
    """(qi (nq, dim) int16, qstep (nq,) float64, const (nq,) float64) of float32 queries; see the module notes."""
    q = queries.astype(np.float64)
    qp = q * scale.astype(np.float64)  # exact: 24 x 24 bits
    top = np.abs(qp).max(axis=1) if qp.shape[1] else np.zeros(qp.shape[0])
    qstep = top / levels(q.shape[1])
    safe = np.where(qstep > 0, qstep, 1.0)
    qi = np.rint(qp / safe[:, None]).astype(np.int16)  # |qi| <= levels(dim) <= 32767
    prods = q * offset.astype(np.float64)  # exact
    const = np.array([math.fsum(row) for row in prods.tolist()], dtype=np.float64)
    return qi, qstep, const


@njit(cache=True, nogil=True)
def int8_block(codes, r0, r1, qi, qstep, const, out):
    """``out[q, i - r0]`` = float32(const[q] + qstep[q] * sum_j qi[q, j] * codes[i, j]) for rows r0 .. r1-1,
    the sum in int32 (exact: the caller's ``levels`` keeps it below 2**31). Written as int16 x int16 products
    summed in int32, which LLVM turns into ``vpmaddwd`` (pairs of products added in 32 bits, no saturation:
    |qi| <= 32767 and codes <= 255 keep each pair below 2**31): measured 2x the speed of 32-bit multiplies."""
    nq, d = qi.shape
    for i in range(r0, r1):
        row = codes[i]
        for q in range(nq):
            qq = qi[q]
            acc = np.int32(0)
            for j in range(d):  # kept in int32 at every step (numba would widen to int64: 64-bit multiplies)
                acc = np.int32(acc + np.int32(qq[j]) * np.int32(np.int16(row[j])))
            out[q, i - r0] = np.float32(const[q] + qstep[q] * np.float64(acc))


@njit(cache=True, nogil=True)
def widen_int8(codes, r0, r1, out):
    """``out[:r1 - r0]`` = codes[r0:r1] as float64 (the integers themselves)."""
    d = codes.shape[1]
    for i in range(r0, r1):
        for j in range(d):
            out[i - r0, j] = np.float64(codes[i, j])


@njit(cache=True, nogil=True)
def finish_int8(acc, m, qstep, const, out):
    """``out[q, :m]`` = float32(const[q] + qstep[q] * acc[q, :m]) (float64 integers from BLAS)."""
    for q in range(acc.shape[0]):
        for i in range(m):
            out[q, i] = np.float32(const[q] + qstep[q] * acc[q, i])


# -- float16 -------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, fastmath=FASTMATH)
def f16_block(bits, r0, r1, queries, out):
    """``out[q, i - r0]`` = queries[q] . float32(float16 rows r0 .. r1-1), from their uint16 ``bits``."""
    nq, d = queries.shape
    buf = np.empty(d, dtype=np.uint32)
    vals = buf.view(np.float32)
    for i in range(r0, r1):
        for j in range(d):
            b = np.uint32(bits[i, j])
            buf[j] = ((b & np.uint32(0x8000)) << np.uint32(16)) | ((b & np.uint32(0x7FFF)) << np.uint32(13))
        for q in range(nq):
            s = np.float32(0.0)
            for j in range(d):
                s += queries[q, j] * (vals[j] * _F16_UNIT)
            out[q, i - r0] = s


@njit(cache=True, nogil=True)
def widen_f16(bits, r0, r1, out):
    """``out[:r1 - r0]`` = float16 rows r0 .. r1-1 (uint16 ``bits``) as float32, exactly (subnormals too)."""
    d = bits.shape[1]
    u = out.view(np.uint32)
    for i in range(r0, r1):
        for j in range(d):
            b = np.uint32(bits[i, j])
            u[i - r0, j] = ((b & np.uint32(0x8000)) << np.uint32(16)) | ((b & np.uint32(0x7FFF)) << np.uint32(13))
        for j in range(d):
            out[i - r0, j] = out[i - r0, j] * _F16_UNIT


# -- driver --------------------------------------------------------------------------------------


def _part(kind, q, codes, lo, hi, k, prep):
    """Heaps of the stored rows lo .. hi-1, block by block."""
    nq, d = q.shape
    best_scores, best_rows = heap_init(nq, k)
    few = nq <= FEW_QUERIES
    rows = max(MIN_BLOCK, BLOCK_FLOATS // max(nq, d))
    scores = np.empty((nq, rows), dtype=np.float32)
    if kind == "int8":
        qi, qstep, const = prep
        if not few:
            qf = qi.astype(np.float64)
            wide = np.empty((rows, d), dtype=np.float64)
            acc = np.empty((nq, rows), dtype=np.float64)
    else:
        bits = codes.view(np.uint16)
        if not few:
            wide = np.empty((rows, d), dtype=np.float32)
    for r0 in range(lo, hi, rows):
        r1 = min(hi, r0 + rows)
        m = r1 - r0
        if kind == "int8" and few:
            int8_block(codes, r0, r1, qi, qstep, const, scores)
        elif kind == "int8":
            widen_int8(codes, r0, r1, wide)
            np.matmul(qf, wide[:m].T, out=acc[:, :m])
            finish_int8(acc, m, qstep, const, scores)
        elif few:
            f16_block(bits, r0, r1, q, scores)
        else:
            widen_f16(bits, r0, r1, wide)
            np.matmul(q, wide[:m].T, out=scores[:, :m])
        merge_block_serial(scores, m, r0, best_scores, best_rows)
    return best_scores, best_rows


def topk_codes(queries, codes, n, k, *, scale=None, offset=None, threads=1):
    """Exact top-k of float32 ``queries`` (nq, d) against the values the ``codes[:n]`` stand for (float16, or
    uint8 with ``scale`` and ``offset``): ``(scores (nq, k) float32, rows (nq, k) int64)``, best first, padded
    with -inf / -1. ``threads`` >= 2 splits the rows over worker threads (the numba kernels release the GIL;
    BLAS at one thread each meanwhile)."""
    nq = queries.shape[0]
    kind = "float16" if codes.dtype == np.float16 else "int8"
    if n == 0 or nq == 0:
        return heap_init(nq, k)
    if k > n:  # every row is a hit: search for n, then pad
        scores, rows = topk_codes(queries, codes, n, n, scale=scale, offset=offset, threads=threads)
        best_scores, best_rows = heap_init(nq, k)
        best_scores[:, :n] = scores
        best_rows[:, :n] = rows
        return best_scores, best_rows
    prep = int8_queries(queries, scale, offset) if kind == "int8" else None
    parts = max(1, min(threads, n // PART_ROWS))
    if parts == 1:
        best_scores, best_rows = _part(kind, queries, codes, 0, n, k, prep)
    else:
        step = math.ceil(n / parts)
        pool = worker_pool(parts)
        blas = nq > FEW_QUERIES and blas_controllable()
        with blas_single_thread() if blas else _Nothing():
            futures = [pool.submit(_part, kind, queries, codes, lo, min(n, lo + step), k, prep)
                       for lo in range(0, n, step)]
            results = [f.result() for f in futures]
        best_scores, best_rows = results[0]
        for s, r in results[1:]:
            merge_heaps(s, r, best_scores, best_rows)
    heap_sort(best_scores, best_rows)
    return best_scores, best_rows


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
