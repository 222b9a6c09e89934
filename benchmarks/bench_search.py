"""Exact top-k search: Searcher vs faiss IndexFlatIP vs numpy (matmul + argpartition) vs the GEMM-only floor.

L2-normalised float32 random vectors, k = 10, query batches Q in {1, 16, 256, 1024}. The floor is the bare
matrix product of the same shapes (at Q = 1 the matrix-vector product; for Q > 1 written into a buffer
allocated once, so it pays no page faults), i.e. the work any exact method must do, without selecting.
Target: Searcher throughput >= 0.8x the floor at every Q. faiss runs with 2 OpenMP threads.

Sizes (``LOOKALIKE_BENCH_SIZES``, comma-separated; default ``small``):
    small: N=200,000 x D=128 and N=50,000 x D=512          (default run: a couple of minutes)
    full:  N=1,000,000 x D=128 and N=200,000 x D=512       (the claim in BENCHMARKS.md)

    NUMBA_CACHE_DIR=.numba_cache LOOKALIKE_BENCH_SIZES=full .venv/bin/python -m pytest \
        benchmarks/bench_search.py -q --benchmark-columns=min,median,rounds --benchmark-sort=name

Each (size, Q, method) is one pytest-benchmark entry (grouped by size and Q). The last tests measure the
ratios again from an interleaved loop (searcher, floor, faiss, numpy, searcher, ...), which shares the
machine's load evenly between the four, print the table of ratios, and measure peak memory during search
in a fresh subprocess (tracemalloc peak of numpy allocations, and the RSS high-water mark above the
index, from before the first search, so it counts loading the kernels and BLAS's buffers), which must
stay within 256 MB above the index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.searcher import Searcher

faiss = pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[1]
K = 10
QS = (1, 16, 256, 1024)
SIZES = {
    "small": [(200_000, 128), (50_000, 512)],
    "full": [(1_000_000, 128), (200_000, 512)],
}
MEMORY_LIMIT = 256 * 2**20  # bytes allowed above the index during search


def chosen_sizes():
    names = os.environ.get("LOOKALIKE_BENCH_SIZES", "small").split(",")
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        raise pytest.UsageError(f"LOOKALIKE_BENCH_SIZES: unknown {unknown}; choose from {sorted(SIZES)}")
    return [nd for s in names for nd in SIZES[s]]


SHAPES = chosen_sizes()


def unit_vectors(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Setup:
    """One database in three forms (Searcher, faiss, numpy) plus the query batches."""

    def __init__(self, n, d):
        self.n, self.d = n, d
        self.searcher = Searcher(d)
        self.searcher.add(unit_vectors(n, d, seed=0))
        self.xb = self.searcher._vectors[:n]  # (n, d) the same normalised vectors, no second copy
        self.faiss = faiss.IndexFlatIP(d)
        self.faiss.add(self.xb)
        self.queries = {q: unit_vectors(q, d, seed=q) for q in QS}
        self.buffers = {}

    def floor(self, q):
        xq = self.queries[q]
        if q == 1:
            return lambda: self.xb @ xq[0]
        out = self.buffers.setdefault(q, np.empty((q, self.n), dtype=np.float32))
        return lambda: np.matmul(xq, self.xb.T, out=out)

    def method(self, name, q):
        xq = self.queries[q]
        if name == "searcher":
            return lambda: self.searcher.search(xq, K)
        if name == "faiss":
            return lambda: self.faiss.search(xq, K)
        if name == "numpy":
            return lambda: numpy_topk(xq, self.xb, K)
        if name == "floor":
            return self.floor(q)
        raise KeyError(name)

    def release(self):
        self.buffers.clear()


def numpy_topk(xq, xb, k, chunk_floats=1 << 26):
    """The textbook numpy answer: scores by matmul, argpartition, sort the k; queries in chunks of <= 256 MB."""
    nq, n = xq.shape[0], xb.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    step = max(1, chunk_floats // n)
    for q0 in range(0, nq, step):
        s = xq[q0 : q0 + step] @ xb.T  # (c, n)
        part = np.argpartition(s, n - k, axis=1)[:, n - k :]  # (c, k) unordered
        ps = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        scores[q0 : q0 + step] = np.take_along_axis(ps, order, axis=1)
        ids[q0 : q0 + step] = np.take_along_axis(part, order, axis=1)
    return scores, ids


@pytest.fixture(scope="module", params=SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
def setup(request):
    faiss.omp_set_num_threads(2)
    s = Setup(*request.param)
    yield s
    s.release()


def rounds_for(fn, budget_s=2.0, most=30):
    """Rounds that fit ``budget_s`` (at least 3), timing one call after a warm-up call."""
    fn()
    t0 = time.perf_counter()
    fn()
    return int(max(3, min(most, budget_s / max(time.perf_counter() - t0, 1e-6))))


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("name", ["searcher", "floor", "faiss", "numpy"])
def test_search(benchmark, setup, name, q):
    fn = setup.method(name, q)
    benchmark.group = f"top-{K} of {setup.n:,} x {setup.d}, Q={q}"
    benchmark.extra_info.update(n=setup.n, d=setup.d, q=q, method=name)
    benchmark.pedantic(fn, rounds=rounds_for(fn), warmup_rounds=0)
    setup.release()  # the floor's output buffer (up to 4 GB at Q=1024)


def test_answers_agree(setup):
    """The four methods answer the same (sanity check of the benchmark itself)."""
    xq = setup.queries[16]
    s_scores, s_ids = setup.searcher.search(xq, K)
    f_scores, f_ids = setup.faiss.search(xq, K)
    n_scores, n_ids = numpy_topk(xq, setup.xb, K)
    np.testing.assert_allclose(s_scores, f_scores, atol=1e-5)
    np.testing.assert_allclose(s_scores, n_scores, atol=1e-5)
    assert (s_ids == f_ids).mean() > 0.99 and (s_ids == n_ids).mean() > 0.99  # differences: near-ties only


def interleaved(setup, q, budget_s=8.0, names=("searcher", "floor", "faiss", "numpy")):
    """Best time per call of each method, measured round-robin so that all see the same load."""
    fns = {name: setup.method(name, q) for name in names}
    per_round = 0.0
    for fn in fns.values():  # warm-up, and an estimate of one round
        fn()
        t0 = time.perf_counter()
        fn()
        per_round += time.perf_counter() - t0
    rounds = int(max(3, min(25, budget_s / per_round)))
    best = {name: float("inf") for name in names}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, rounds


def test_ratio_table(setup, capsys):
    rows = []
    for q in QS:
        best, rounds = interleaved(setup, q)
        setup.release()
        rows.append((q, best, rounds))
    load = os.getloadavg()[0]
    lines = [
        f"\nSearcher ratios, interleaved, {setup.n:,} x {setup.d}, k={K} (load average {load:.1f} on "
        f"{os.cpu_count()} cores); throughput in queries/s, best of the rounds",
        f"{'Q':>5} {'searcher':>9} {'floor':>9} {'faiss':>9} {'numpy':>9} {'vs floor':>9} {'vs faiss':>9} "
        f"{'vs numpy':>9} {'rounds':>6}",
    ]
    for q, best, rounds in rows:
        qps = {name: q / t for name, t in best.items()}
        lines.append(
            f"{q:>5} {qps['searcher']:>9.0f} {qps['floor']:>9.0f} {qps['faiss']:>9.0f} {qps['numpy']:>9.0f} "
            f"{qps['searcher'] / qps['floor']:>9.2f} {qps['searcher'] / qps['faiss']:>9.2f} "
            f"{qps['searcher'] / qps['numpy']:>9.2f} {rounds:>6}"
        )
    with capsys.disabled():
        print("\n".join(lines))


MEMORY_SCRIPT = r"""
import json, sys, threading, time, tracemalloc
import numpy as np, psutil
from engine.searcher import Searcher
n, d, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = Searcher(d)
x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
s.add(x)
del x
index_bytes = s._vectors.nbytes + s._ids.nbytes
proc = psutil.Process()
queries = {q: np.random.default_rng(q).standard_normal((q, d), dtype=np.float32) for q in (1, 16, 256, 1024)}
before = proc.memory_info().rss  # index built, nothing searched yet
peak = [before]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
out = {"index_bytes": index_bytes}
for q, xq in queries.items():
    s.search(xq, k)  # the first search of a size also loads kernels and BLAS buffers: counted in RSS
    tracemalloc.start()
    for _ in range(3):
        s.search(xq, k)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out[q] = {"tracemalloc_peak": traced, "rss_above_index": peak[0] - before}
stop.set()
sampler.join()
print(json.dumps(out))
"""


def test_peak_memory_during_search(setup, capsys):
    """Peak memory while searching stays within 256 MB above the index (fresh process, after a warm-up)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(setup.n), str(setup.d), str(K)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    mib = 2**20
    index_mib = res["index_bytes"] / mib
    lines = [f"\nSearcher peak memory during search, {setup.n:,} x {setup.d} (index {index_mib:.0f} MiB)"]
    for q in QS:
        r = res[str(q)]
        lines.append(
            f"  Q={q:>5}: tracemalloc peak {r['tracemalloc_peak'] / mib:7.1f} MiB, "
            f"RSS high-water mark above the index (since before the first search) {r['rss_above_index'] / mib:7.1f} MiB"
        )
    with capsys.disabled():
        print("\n".join(lines))
    for q in QS:
        r = res[str(q)]
        assert r["tracemalloc_peak"] <= MEMORY_LIMIT and r["rss_above_index"] <= MEMORY_LIMIT, (q, r)
