"""Memory-bank kernels: the mixing update, row overwrite, row normalisation, and kNN of bank rows.

Plain numba functions over C-contiguous arrays; the caller (``engine.memory_bank``) validates and allocates.
Imports nothing else of the project but the sibling kernel module ``topk`` (the kNN search).

Update rule, for a batch ``idx`` (b,) int64 and ``new`` (b, dim) float32, mixing rate ``r``::

    for j in range(b):                                    # batch order
        x = r * new[j] + (1 - r) * bank[idx[j]]
        if |x| <= ZERO_MIX * (r * |new[j]| + (1 - r) * |bank[idx[j]]|):
            continue                                      # cancellation: the old row is kept
        bank[idx[j]] = x / |x|

so an index that repeats within a batch is updated once per occurrence, in batch order. The kernels are
compiled per row length (``update_kernels(dim)``) and run in float32, one pass over each row and then its
write, prefetching the rows they will touch next; a row whose squared norms leave float32's range is decided
in float64 (``update_careful``). ``update_parallel`` groups the batch by index (stable sort) and runs the
groups in parallel, each in batch order: the same rule and row code as ``update_serial``, compiled separately,
so its float32 rounding can differ from serial's in the last place (tested within 1e-7). The other kernels
accumulate norms in float64.
"""

import functools

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
CAREFUL = 3  # internal: the fast serial update left the batch (unchanged) to update_careful

EXPONENT = np.uint32(0x7F800000)  # float32 exponent bits: all set <=> NaN or inf


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


@njit(cache=True, inline="always")
def _bad_index(n, idx):
    """True if some idx[j] lies outside [0, n); branch-free."""
    bad = False
    for j in range(idx.shape[0]):
        bad |= (idx[j] < 0) | (idx[j] >= n)
    return bad


@njit(cache=True)
def check_batch(n, idx, new):
    """OK, BAD_INDEX (some idx outside [0, n)) or NOT_FINITE (some NaN/inf in float32 new); reads only."""
    if _bad_index(n, idx):
        return BAD_INDEX
    bits = new.reshape(-1).view(np.uint32)  # NaN/inf <=> all exponent bits set; branch-free, vectorises
    acc = np.uint32(0)
    for t in range(bits.shape[0]):
        acc |= np.uint32((bits[t] & EXPONENT) == EXPONENT)
    return NOT_FINITE if acc else OK


@njit(cache=True)
def _mix_row_f64(bank, i, new, j, r):
    """The update of row i by new[j] in float64 (no float32 overflow or underflow of the squared norms)."""
    dim = bank.shape[1]
    sx = 0.0
    sn = 0.0
    so = 0.0
    for t in range(dim):
        a = np.float64(new[j, t])
        o = np.float64(bank[i, t])
        x = r * a + (1.0 - r) * o
        sx += x * x
        sn += a * a
        so += o * o
    nx = np.sqrt(sx)
    if nx == 0 or nx <= ZERO_MIX * (r * np.sqrt(sn) + (1.0 - r) * np.sqrt(so)):
        return  # cancellation: the old row is kept
    for t in range(dim):
        bank[i, t] = np.float32((r * np.float64(new[j, t]) + (1.0 - r) * np.float64(bank[i, t])) / nx)


@njit(cache=True)
def update_careful(bank, idx, new, r):
    """The update rule row by row in float64, after check_batch: for the batches the float32 kernels of
    ``update_kernels`` hand back (CAREFUL): a NaN/inf, or magnitudes whose squares leave float32's range."""
    code = check_batch(bank.shape[0], idx, new)
    if code != OK:
        return code
    for j in range(idx.shape[0]):
        _mix_row_f64(bank, idx[j], new, j, r)
    return OK


@njit(cache=True, fastmath=FAST, inline="always")
def _mix_row(bank, i, new, j, dim, r, log, slot, buf, sums):
    """log[slot] = bank[i]; then bank[i] = normalise(r new[j] + (1 - r) bank[i]) unless the mix cancels.

    Float32, one pass over the row and the write. Returns False, with bank[i] untouched, when the squared norms
    leave float32's normal range: a NaN/inf in new[j], |new| above ~1e19, or the mix's squared norm below 1e-30
    (a cancelled mix, or r = 1 with a tiny new), all rare; the caller then decides the row in float64.
    Inlined into each kernel of ``update_kernels(dim)``, so ``dim`` is a compile-time constant and the row
    loops vectorise fully. ``buf`` (dim,) and ``sums`` (2,) float32 are scratch.
    """
    rr = np.float32(r)
    q = np.float32(1.0 - r)
    sx = np.float32(0.0)
    sn = np.float32(0.0)
    so = np.float32(0.0)
    for t in range(dim):
        a = new[j, t]
        o = bank[i, t]
        log[slot, t] = o
        x = rr * a + q * o
        buf[t] = x
        sx += x * x
        sn += a * a
        so += o * o
    sums[0] = sx
    sums[1] = sn
    bits = sums.view(np.uint32)
    if ((bits[0] & EXPONENT) == EXPONENT) | ((bits[1] & EXPONENT) == EXPONENT) | (sx < np.float32(1e-30)):
        return False
    nx = np.sqrt(sx)
    keep = nx <= np.float32(ZERO_MIX) * (rr * np.sqrt(sn) + q * np.sqrt(so))
    inv = np.float32(1.0) / nx
    for t in range(dim):  # branch-free: a cancelled mix writes the old row back
        bank[i, t] = log[slot, t] if keep else buf[t] * inv
    return True


@functools.cache
def update_kernels(dim):
    """(serial, parallel) mixing-update kernels for rows of exactly ``dim`` float32 values.

    Both take ``(bank, idx, new, r)`` and return a check_batch code or CAREFUL, and change nothing unless OK.
    ``serial`` makes one pass in batch order with no separate check of ``new`` (that pass would read the whole
    batch from memory once more): each row's old values go to an undo log as they are read, and a row it cannot
    decide in float32 (``_mix_row``) makes it restore rows j-1..0 from the log (newest first, so a repeated
    index ends at its original value) and return CAREFUL: the caller runs ``update_careful``, which also
    reports NaN/inf. ``parallel`` groups the batch by index (stable sort) and runs the groups in parallel, each
    in batch order, with the same row code and the same undo (each thread undoes its own groups). Compiled per
    ``dim`` (numba caches each on disk); allocating the log and scratch inside the kernel lets LLVM see they
    alias nothing. ``update_careful`` is only ever called from Python: when its row function was first
    compiled as a callee inside the fastmath parallel kernel, later direct calls kept a 1e-25 row that float64
    decides (measured; numba reuses that compiled callee), so no fastmath kernel calls it.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")

    @njit(cache=True, fastmath=FAST)
    def serial(bank, idx, new, r):
        b = idx.shape[0]
        if _bad_index(bank.shape[0], idx):
            return BAD_INDEX
        log = np.empty((b, dim), dtype=np.float32)  # the undo log: old rows in batch order
        buf = np.empty(dim, dtype=np.float32)
        sums = np.empty(2, dtype=np.float32)
        for j in range(min(PREFETCH_ROWS, b)):
            prefetch_row(bank, idx[j])
        for j in range(b):
            if j + PREFETCH_ROWS < b:
                prefetch_row(bank, idx[j + PREFETCH_ROWS])
            if not _mix_row(bank, idx[j], new, j, dim, r, log, j, buf, sums):
                for u in range(j - 1, -1, -1):
                    for t in range(dim):
                        bank[idx[u], t] = log[u, t]
                return CAREFUL
        return OK

    @njit(cache=True, fastmath=FAST, parallel=True)
    def parallel(bank, idx, new, r):
        b = idx.shape[0]
        if _bad_index(bank.shape[0], idx):
            return BAD_INDEX
        order = np.argsort(idx, kind="mergesort")  # stable: a group keeps batch order
        starts = np.empty(b + 1, dtype=np.int64)
        g = 0
        for p in range(b):
            if p == 0 or idx[order[p]] != idx[order[p - 1]]:
                starts[g] = p
                g += 1
        starts[g] = b
        nchunks = min(g, 64 * 8)
        log = np.empty((b, dim), dtype=np.float32)  # old rows by batch position, as in serial
        stop = np.full(nchunks, -1, dtype=np.int64)  # per chunk: the sorted position it stopped at, or -1
        for c in prange(nchunks):  # contiguous runs of groups, so each thread prefetches its own next rows
            buf = np.empty(dim, dtype=np.float32)
            sums = np.empty(2, dtype=np.float32)
            s0 = c * g // nchunks
            s1 = (c + 1) * g // nchunks
            for s in range(s0, s1):
                if s + PREFETCH_ROWS < s1:
                    prefetch_row(bank, idx[order[starts[s + PREFETCH_ROWS]]])
                for p in range(starts[s], starts[s + 1]):
                    j = order[p]
                    if not _mix_row(bank, idx[j], new, j, dim, r, log, j, buf, sums):
                        stop[c] = p
                        break
                if stop[c] >= 0:
                    break
        if (stop < 0).all():
            return OK
        for c in range(nchunks):  # undo: each chunk's rows so far, newest first (chunks own disjoint rows)
            end = stop[c] if stop[c] >= 0 else starts[(c + 1) * g // nchunks]
            for p in range(end - 1, starts[c * g // nchunks] - 1, -1):
                j = order[p]
                for t in range(dim):
                    bank[idx[j], t] = log[j, t]
        return CAREFUL

    return serial, parallel


def update(bank, idx, new, r, *, parallel=False):
    """Checked mixing update of ``bank`` (n, dim) float32 by ``idx`` (b,) int64 and ``new`` (b, dim) float32,
    all C-contiguous: OK, BAD_INDEX or NOT_FINITE, and nothing changed unless OK. ``parallel``: the grouped
    multi-threaded kernel (worth it for large batches only)."""
    serial_kernel, parallel_kernel = update_kernels(bank.shape[1])
    code = (parallel_kernel if parallel else serial_kernel)(bank, idx, new, r)
    return update_careful(bank, idx, new, r) if code == CAREFUL else code  # never from a fastmath kernel


def update_serial(bank, idx, new, r):
    """``update`` in one thread, batch order."""
    return update(bank, idx, new, r)


def update_parallel(bank, idx, new, r):
    """``update`` with repeats grouped and the groups run in parallel."""
    return update(bank, idx, new, r, parallel=True)


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
