"""Memory-bank kernels: the mixing update, row overwrite, row normalisation, and kNN of bank rows.

Plain numba functions over C-contiguous arrays; the caller (``engine.memory_bank``) validates and allocates.
Imports nothing else of the project but the sibling kernel module ``topk`` (the kNN search).

Update rule, for a batch ``idx`` (b,) int64 and ``new`` (b, dim) float32, mixing rate ``r``::

    for j in range(b):                                    # batch order
        x = r * new[j] + (1 - r) * bank[idx[j]]
        if |x| <= ZERO_MIX * (r * |new[j]| + (1 - r) * |bank[idx[j]]|):
            continue                                      # cancellation: the old row is kept
        bank[idx[j]] = x / |x|

so an index that repeats within a batch is updated once per occurrence, in batch order. ``update_parallel``
gives bit-identical results: it groups the batch by index (stable sort) and runs the groups in parallel, each
group sequentially in batch order. The update computes in float32 (one pass, then the write) and prefetches
the rows it will touch next; the other kernels accumulate norms in float64.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .topk import topk_ip

# A mixed vector shorter than this fraction of its parts' scale is cancellation noise: keep the old row.
ZERO_MIX = 1e-5
# Rows ahead to prefetch in the update: random bank rows are DRAM misses, the update is latency-bound.
PREFETCH_ROWS = 12

# fastmath without the no-NaN / no-inf assumptions: kernels start maxima at -inf and minima at +inf.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}

# check_batch codes
OK = 0
BAD_INDEX = 1
NOT_FINITE = 2


@intrinsic
def prefetch_row(typingctx, arr, i):
    """Hint the CPU to fetch row i of a C-contiguous 2-D array (every 64-byte line) for writing; no-op
    semantically, never faults."""
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        shape = cgutils.unpack_tuple(builder, ary.shape)
        strides = cgutils.unpack_tuple(builder, ary.strides)
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer2(
            context, builder, ary.data, shape, strides, aryty.layout, [args[1], zero], wraparound=False
        )
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        base = builder.bitcast(ptr, i8p)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(aryty.dtype)))
        rowbytes = builder.mul(shape[1], itemsize)
        line = context.get_constant(types.intp, 64)
        with cgutils.for_range_slice(builder, zero, rowbytes, line) as (off, _):
            # (address, rw=1 write, locality=3 keep in all caches, cache type=1 data)
            builder.call(fn, [builder.gep(base, [off]), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def check_batch(n, idx, new):
    """OK, BAD_INDEX (some idx outside [0, n)) or NOT_FINITE (some NaN/inf in float32 new); reads only."""
    bad = False
    for j in range(idx.shape[0]):
        bad |= (idx[j] < 0) | (idx[j] >= n)
    if bad:
        return BAD_INDEX
    bits = new.reshape(-1).view(np.uint32)  # NaN/inf <=> all exponent bits set; branch-free, vectorises
    acc = np.uint32(0)
    for t in range(bits.shape[0]):
        acc |= np.uint32((bits[t] & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    return NOT_FINITE if acc else OK


@njit(cache=True, fastmath=FAST)
def _mix_row(bank, i, new, j, r, buf):
    """bank[i] = normalise(r new[j] + (1 - r) bank[i]) unless the mix cancels; float32, one pass + write."""
    rr = np.float32(r)
    q = np.float32(1.0 - r)
    sx = np.float32(0.0)
    sn = np.float32(0.0)
    so = np.float32(0.0)
    for t in range(bank.shape[1]):
        a = new[j, t]
        o = bank[i, t]
        x = rr * a + q * o
        buf[t] = x
        sx += x * x
        sn += a * a
        so += o * o
    nx = np.sqrt(sx)
    if nx == 0 or nx <= np.float32(ZERO_MIX) * (rr * np.sqrt(sn) + q * np.sqrt(so)):
        return
    inv = np.float32(1.0) / nx
    for t in range(bank.shape[1]):
        bank[i, t] = buf[t] * inv


@njit(cache=True)
def update_serial(bank, idx, new, r):
    """Checked mixing update in batch order; returns a check_batch code and changes nothing unless OK."""
    b = idx.shape[0]
    for j in range(min(PREFETCH_ROWS, b)):
        if 0 <= idx[j] < bank.shape[0]:
            prefetch_row(bank, idx[j])  # overlaps the first misses with the check
    code = check_batch(bank.shape[0], idx, new)
    if code != OK:
        return code
    buf = np.empty(bank.shape[1], dtype=np.float32)
    for j in range(b):
        if j + PREFETCH_ROWS < b:
            prefetch_row(bank, idx[j + PREFETCH_ROWS])
        _mix_row(bank, idx[j], new, j, r, buf)
    return OK


@njit(cache=True, parallel=True)
def update_parallel(bank, idx, new, r):
    """Same result as update_serial (bit for bit): repeats grouped by index, groups run in parallel."""
    code = check_batch(bank.shape[0], idx, new)
    if code != OK:
        return code
    b = idx.shape[0]
    order = np.argsort(idx, kind="mergesort")  # stable: a group keeps batch order
    starts = np.empty(b + 1, dtype=np.int64)
    g = 0
    for p in range(b):
        if p == 0 or idx[order[p]] != idx[order[p - 1]]:
            starts[g] = p
            g += 1
    starts[g] = b
    nchunks = min(g, 64 * 8)
    for c in prange(nchunks):  # contiguous runs of groups, so each thread prefetches its own next rows
        buf = np.empty(bank.shape[1], dtype=np.float32)
        s0 = c * g // nchunks
        s1 = (c + 1) * g // nchunks
        for s in range(s0, s1):
            if s + PREFETCH_ROWS < s1:
                prefetch_row(bank, idx[order[starts[s + PREFETCH_ROWS]]])
            for p in range(starts[s], starts[s + 1]):
                j = order[p]
                _mix_row(bank, idx[j], new, j, r, buf)
    return OK


@njit(cache=True)
def set_rows(bank, idx, new):
    """bank[idx[j]] = new[j] / |new[j]| in batch order (a repeated index keeps its last row).

    The caller guarantees valid indices and finite, non-zero rows.
    """
    dim = bank.shape[1]
    for j in range(idx.shape[0]):
        s = 0.0
        for t in range(dim):
            a = np.float64(new[j, t])
            s += a * a
        inv = 1.0 / np.sqrt(s)
        i = idx[j]
        for t in range(dim):
            bank[i, t] = np.float32(np.float64(new[j, t]) * inv)


@njit(cache=True, parallel=True)
def normalise_rows(x, out):
    """out[i] = x[i] / |x[i]|; a zero row stays zero. Returns nothing."""
    for i in prange(x.shape[0]):
        s = 0.0
        for t in range(x.shape[1]):
            a = np.float64(x[i, t])
            s += a * a
        inv = 0.0 if s == 0.0 else 1.0 / np.sqrt(s)
        for t in range(x.shape[1]):
            out[i, t] = np.float32(np.float64(x[i, t]) * inv)


def knn(bank, queries, k, exclude, **options):
    """Exact top-k bank rows by inner product for each query (cosine on unit vectors).

    bank (n, dim) float32 C-contiguous, queries (m, dim) float32 C-contiguous, exclude (m,) int64: a bank row
    to leave out per query (-1: none). Returns scores (m, k) float32 best first (ties: lower row first) and
    rows (m, k) int64; slots beyond the available rows hold -inf / -1. The search itself is
    ``engine.kernels.topk.topk_ip`` (blocked, bounded memory; ``options``: its ``method`` / ``block_rows``);
    with exclusions it asks for k + 1 and drops, per query, the excluded row if present, else the last one.
    """
    n = bank.shape[0]
    if not (exclude >= 0).any():
        return topk_ip(queries, bank, n, k, **options)
    s, r = topk_ip(queries, bank, n, k + 1, **options)  # (m, k + 1)
    drop = (r == exclude[:, None]) & (exclude[:, None] >= 0)
    drop[:, -1] |= ~drop.any(axis=1)  # exactly one dropped per query
    keep = ~drop
    m = queries.shape[0]
    return np.ascontiguousarray(s[keep].reshape(m, k)), np.ascontiguousarray(r[keep].reshape(m, k))
