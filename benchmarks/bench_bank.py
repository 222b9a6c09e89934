"""Memory-bank update: MemoryBank.update vs numpy fancy indexing, side by side in one run (and, at the end of
the file, MemoryBank.neighbours vs numpy matmul + argpartition).

N = 1,000,000 rows x D = 128, batches of 256 random indices (repeats possible), mixing rate 0.5. The numpy
reference is the textbook one-liner ``x = r*new + (1-r)*bank[idx]; bank[idx] = x / norm(x)`` (its result on a
repeated index is whichever write lands last, which is why MemoryBank does not use it). Target: >= 5x numpy.

    NUMBA_CACHE_DIR=.numba_cache .venv/bin/python -m pytest benchmarks/bench_bank.py -q -s \
        --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

Besides pytest-benchmark's table the last test prints the ratio from the two benchmarks' minima, from each
implementation timed alone (20 x 200 calls), and from an interleaved loop (A, B, A, B, ...) that shares the
machine's load evenly between the two, in wall time and in the calling thread's CPU time (both
implementations are single-threaded at batch 256).
"""

import time

import numpy as np
import pytest

from engine.memory_bank import MemoryBank

N, D, BATCH, R = 1_000_000, 128, 256, 0.5
N_BATCHES = 512
_results = {}


@pytest.fixture(scope="module")
def data():
    bank = MemoryBank(N, D, mixing_rate=R, seed=0)
    ref = bank.vectors.copy()  # (N, D) the numpy reference's own bank
    rng = np.random.default_rng(1)
    idx = rng.integers(N, size=(N_BATCHES, BATCH))  # (N_BATCHES, BATCH) int64
    new = rng.standard_normal((N_BATCHES, BATCH, D), dtype=np.float32)
    new /= np.linalg.norm(new, axis=2, keepdims=True)
    bank.update(idx[0], new[0])  # compile (or load from numba's cache) the kernels for D before any timing
    numpy_update(ref, idx[0], new[0])
    return bank, ref, idx, new


def numpy_update(bank, idx, new, r=R):
    x = r * new + (1 - r) * bank[idx]  # (B, D)
    bank[idx] = x / np.linalg.norm(x, axis=1, keepdims=True)


def cycler(fn, target, idx, new):
    state = {"j": 0}

    def step():
        j = state["j"] = (state["j"] + 1) % N_BATCHES
        fn(target, idx[j], new[j])

    return step


def test_update_memory_bank(benchmark, data):
    bank, _, idx, new = data
    step = cycler(lambda b, i, v: b.update(i, v), bank, idx, new)
    benchmark.group = "bank update 1M x 128, batch 256"
    benchmark(step)
    if benchmark.stats:
        _results["ours"] = benchmark.stats.stats.min


def test_update_numpy_reference(benchmark, data):
    _, ref, idx, new = data
    step = cycler(numpy_update, ref, idx, new)
    benchmark.group = "bank update 1M x 128, batch 256"
    benchmark(step)
    if benchmark.stats:
        _results["numpy"] = benchmark.stats.stats.min


def _interleaved(fns, clock, rounds=20, calls=200):
    """Best and median seconds per call of each fn, measured in alternation (A, B, A, B, ...)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            t0 = clock()
            for _ in range(calls):
                fn()
            out.append((clock() - t0) / calls)
    return [(min(t), float(np.median(t))) for t in times]


def test_update_ratio(data, capsys):
    bank, ref, idx, new = data
    ours = cycler(lambda b, i, v: b.update(i, v), bank, idx, new)
    theirs = cycler(numpy_update, ref, idx, new)
    with capsys.disabled():
        print()
        if {"ours", "numpy"} <= _results.keys():
            print(
                f"bank update: pytest-benchmark minima  ours {_results['ours'] * 1e6:.2f} us  numpy "
                f"{_results['numpy'] * 1e6:.2f} us  ratio {_results['numpy'] / _results['ours']:.1f}x"
            )
        # Each alone: 20 rounds of 200 calls of one implementation, then of the other.
        (o_min, o_med), = _interleaved([ours], time.perf_counter)
        (n_min, n_med), = _interleaved([theirs], time.perf_counter)
        print(
            f"bank update: each alone, wall time, best of 20 x 200 calls: ours {o_min * 1e6:.2f} us  numpy "
            f"{n_min * 1e6:.2f} us  ratio {n_min / o_min:.1f}x (medians: {n_med / o_med:.1f}x)"
        )
        # Both run on the calling thread only, so its CPU time is the robust measure on a loaded machine
        # (wall time also counts the time other processes hold the core). Alternating blocks of 200 calls
        # leave each side the other's cache lines to evict (numpy's 128 KB of dirty rows per call); that
        # costs the memory-bound kernel more than the numpy reference.
        for name, clock in (("wall", time.perf_counter), ("thread CPU", time.thread_time)):
            (o_min, o_med), (n_min, n_med) = _interleaved([ours, theirs], clock)
            print(
                f"bank update: interleaved {name} time, best of 20 x 200 calls: ours {o_min * 1e6:.2f} us  numpy "
                f"{n_min * 1e6:.2f} us  ratio {n_min / o_min:.1f}x (medians: {n_med / o_med:.1f}x)"
            )


# -- neighbours: MemoryBank.neighbours vs numpy, side by side ------------------------------------------------
# A bank the size of a photo collection (100,000 x 128), k = 10, one and 16 queries per call. The numpy
# reference normalises the queries, multiplies (OpenBLAS, both cores) and sorts the argpartition's top k.
# Back-to-back calls are the case that matters here: BLAS's threads still spin on the other core when the next
# call starts, and a numba parallel region that needs that core waits for the scheduler (see normalise_rows).
NB_ROWS, NB_K = 100_000, 10


@pytest.fixture(scope="module")
def small_bank():
    bank = MemoryBank(NB_ROWS, D, seed=2)
    queries = np.random.default_rng(3).standard_normal((16, D), dtype=np.float32)
    bank.neighbours(queries, NB_K)  # compile (or load) before timing
    return bank, queries


def numpy_neighbours(bank, queries, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ bank.T  # (m, n)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(top, order, axis=1)


@pytest.mark.parametrize("m", [1, 16])
def test_neighbours_memory_bank(benchmark, small_bank, m):
    bank, queries = small_bank
    benchmark.group = f"bank neighbours 100k x 128, k = 10, queries per call: {m}"
    scores, rows = benchmark(bank.neighbours, queries[:m], NB_K)
    ref_scores, ref_rows = numpy_neighbours(bank.vectors, queries[:m], NB_K)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)  # the answer is the reference's, not just fast
    np.testing.assert_array_equal(rows, ref_rows)
    if benchmark.stats:
        _results[f"nb ours {m}"] = benchmark.stats.stats.min


@pytest.mark.parametrize("m", [1, 16])
def test_neighbours_numpy_reference(benchmark, small_bank, m):
    bank, queries = small_bank
    benchmark.group = f"bank neighbours 100k x 128, k = 10, queries per call: {m}"
    benchmark(numpy_neighbours, bank.vectors, queries[:m], NB_K)
    if benchmark.stats:
        _results[f"nb numpy {m}"] = benchmark.stats.stats.min


def test_neighbours_ratio(capsys):
    with capsys.disabled():
        for m in (1, 16):
            if {f"nb ours {m}", f"nb numpy {m}"} <= _results.keys():
                ours, theirs = _results[f"nb ours {m}"], _results[f"nb numpy {m}"]
                print(f"\nbank neighbours, queries per call {m}: pytest-benchmark minima  ours {ours * 1e6:.0f} us  numpy "
                      f"{theirs * 1e6:.0f} us  ratio {theirs / ours:.2f}x")
