"""Memory-bank update: MemoryBank.update vs numpy fancy indexing, side by side in one run.

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
