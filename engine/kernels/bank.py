"""Memory-bank kernels: the mixing update, row overwrite, row normalisation, and kNN of bank rows.

Plain numba functions over C-contiguous arrays; the caller (``engine.memory_bank``) validates and allocates
(the update allocates its own undo log).
Imports nothing else of the project but the sibling kernel module ``topk`` (the kNN search).

Update rule, for a batch ``idx`` (b,) int64 and ``new`` (b, dim) float32, mixing rate ``r``::

    for j in range(b):                                    # batch order
        x = r * new[j] + (1 - r) * bank[idx[j]]
        if |x| <= ZERO_MIX * (r * |new[j]| + (1 - r) * |bank[idx[j]]|):
            continue                                      # cancellation: the old row is kept
        bank[idx[j]] = x / |x|

so an index that repeats within a batch is updated once per occurrence, in batch order. ``update`` runs it in
float32 with kernels compiled per row length (``update_kernel(dim)``), one pass over each row and then its
write, prefetching the rows it will touch next; a row whose squared norms leave float32's range is done in
float64 (``update_careful``). The other kernels accumulate norms in float64.
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
# The update's undo log holds at most this many bytes of old rows (8,192 rows of 128 floats); longer batches
# are checked first and updated in slices (see ``update``).
LOG_BYTES = 4 << 20

# normalise_rows uses numba's thread pool from this many values (2 MB of float32) up.
PARALLEL_NORMALISE_FLOATS = 1 << 19

# fastmath without the no-NaN / no-inf assumptions: kernels start maxima at -inf and minima at +inf.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}

# check_batch codes
OK = 0
BAD_INDEX = 1
NOT_FINITE = 2
CAREFUL = 3  # internal: update_kernel left the batch (unchanged) to update_careful

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
    """The update rule row by row in float64, after check_batch: for what the float32 kernels of
    ``update_kernel`` leave (a NaN/inf, or magnitudes whose squares leave float32's range)."""
    code = check_batch(bank.shape[0], idx, new)
    if code != OK:
        return code
    for j in range(idx.shape[0]):
        _mix_row_f64(bank, idx[j], new, j, r)
    return OK


@njit(cache=True, fastmath=FAST, inline="always")
def _mix_row(bank, i, new, j, dim, r, log, buf, sums):
    """log[j] = bank[i]; then bank[i] = normalise(r new[j] + (1 - r) bank[i]) unless the mix cancels.

    Float32, one pass over the row and the write. Returns False, with bank[i] untouched, when the squared norms
    leave float32's normal range: a NaN/inf in new[j], |new| above ~1e19, or the mix's squared norm below 1e-30
    (a cancelled mix, or r = 1 with a tiny new), all rare; the caller then decides the row in float64.
    Inlined into the kernel of ``update_kernel(dim)``, so ``dim`` is a compile-time constant and the row
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
        log[j, t] = o
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
        bank[i, t] = log[j, t] if keep else buf[t] * inv
    return True


@functools.cache
def update_kernel(dim):
    """The float32 mixing-update kernel ``(bank, idx, new, r) -> code`` for rows of exactly ``dim`` values.

    One pass in batch order with no separate check of ``new`` (that pass would read the whole batch from
    memory once more): each row's old values go to an undo log as they are read, and a row it cannot decide in
    float32 (``_mix_row``) makes it restore rows j-1..0 from the log (newest first, so a repeated index ends
    at its original value) and return CAREFUL, having changed nothing; else OK or BAD_INDEX. Compiled per
    ``dim`` (numba caches each on disk), so the row loops have fixed trip counts; the log and scratch are
    allocated inside so LLVM sees they alias nothing (passed in, the kernel was 20-50% slower).
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")

    @njit(cache=True, fastmath=FAST)
    def logged(bank, idx, new, r):
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
            if not _mix_row(bank, idx[j], new, j, dim, r, log, buf, sums):
                for u in range(j - 1, -1, -1):
                    for t in range(dim):
                        bank[idx[u], t] = log[u, t]
                return CAREFUL
        return OK

    return logged


@functools.cache
def log_rows(dim, log_bytes=LOG_BYTES):
    """How many rows of ``dim`` floats ``update`` runs under one undo log of ``log_bytes`` (at least 1)."""
    return max(1, log_bytes // (4 * dim))


def update(bank, idx, new, r, *, log_bytes=None):
    """Checked mixing update of ``bank`` (n, dim) float32 by ``idx`` (b,) int64 and ``new`` (b, dim) float32,
    all C-contiguous, in batch order: OK, BAD_INDEX or NOT_FINITE, and nothing changed unless OK.

    A batch whose old rows fit in ``log_bytes`` (default LOG_BYTES) is one pass of ``update_kernel``. A longer
    one is checked first (``check_batch``) and then updated in slices that fit, so the undo log stays a few
    MB: a whole-batch log of 65,536 x 128 (32 MB, a fresh mapping each call) made the update 3x slower. A
    slice or batch the kernel hands back (CAREFUL) is done in float64 by ``update_careful``. Keep that call out
    of fastmath kernels: compiled first as the callee of one (a parallel kernel, since removed), its row
    function kept a 1e-25 row that float64 decides, on later direct calls too (numba reused the callee).
    """
    kernel = update_kernel(bank.shape[1])
    b = idx.shape[0]
    step = log_rows(bank.shape[1], LOG_BYTES if log_bytes is None else log_bytes)
    if b <= step:
        code = kernel(bank, idx, new, r)
        return update_careful(bank, idx, new, r) if code == CAREFUL else code
    code = check_batch(bank.shape[0], idx, new)
    if code != OK:
        return code
    for s in range(0, b, step):  # checked: every slice applies, in batch order
        if kernel(bank, idx[s : s + step], new[s : s + step], r) == CAREFUL:
            update_careful(bank, idx[s : s + step], new[s : s + step], r)
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


@njit(cache=True, inline="always")
def _normalise_row(x, out, i):
    s = 0.0
    for t in range(x.shape[1]):
        a = np.float64(x[i, t])
        s += a * a
    inv = 0.0 if s == 0.0 else 1.0 / np.sqrt(s)
    for t in range(x.shape[1]):
        out[i, t] = np.float32(np.float64(x[i, t]) * inv)


@njit(cache=True)
def _normalise_rows_serial(x, out):
    for i in range(x.shape[0]):
        _normalise_row(x, out, i)


@njit(cache=True, parallel=True)
def _normalise_rows_parallel(x, out):
    for i in prange(x.shape[0]):
        _normalise_row(x, out, i)


def normalise_rows(x, out):
    """out[i] = x[i] / |x[i]| (norm in float64); a zero row stays zero. Returns nothing.

    Inputs below PARALLEL_NORMALISE_FLOATS values are done on the calling thread: a few query rows gain nothing
    from numba's thread pool, and starting it right after a BLAS call (whose threads still spin on the other core)
    cost 3-7 ms here, several times a whole ``MemoryBank.neighbours`` search of 100,000 rows (BENCHMARKS.md).
    """
    if x.shape[0] * x.shape[1] < PARALLEL_NORMALISE_FLOATS:
        _normalise_rows_serial(x, out)
    else:
        _normalise_rows_parallel(x, out)


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
