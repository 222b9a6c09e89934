"""Approximate search: lookalike IVFSearcher vs faiss IndexIVFFlat vs the exact Searcher, side by side.

Two data sets of L2-normalised float32 vectors (cosine), queries drawn from the same distribution (not stored):
- ``gaussian``: i.i.d. standard normal coordinates, the hard case (no cluster structure to exploit);
- ``mixture``: a mixture of 10,000 Gaussians, equally likely: unit centre + noise of norm ~0.75 (like
  embeddings of many near-duplicate groups: a vector's 10 nearest are mostly from its own component).
Both IVF indexes get the same ``nlist``, are trained on the same sample (64 * nlist stored vectors, uniform)
with 20 k-means iterations, spherical (faiss: ``cp.niter = 20``, ``cp.spherical = True``, inner-product
metric), and hold the same vectors. recall@10 is measured on 1,000 queries against the exact Searcher's
answer; throughput at Q = 1 (a loop of single-query searches) and Q = 256 (one batch), best of interleaved
rounds (ours, faiss, exact, and ours with the BLAS list scorer, round-robin so that all see the same load).
Targets (issue 16): recall@10 >= 0.95 at >= 10x the exact index's throughput at Q = 1 and 256, and at least
faiss IVF's throughput at equal recall. faiss runs with 2 OpenMP threads.

Sizes (``LOOKALIKE_BENCH_SIZES``, comma-separated; default ``small``):
    small: N=200,000 x D=128, nlist=512     (the default run: a few minutes)
    full:  N=1,000,000 x D=128, nlist=1024  (the issue's size)

    NUMBA_CACHE_DIR=.numba_cache LOOKALIKE_BENCH_SIZES=full .venv/bin/python -m pytest \
        benchmarks/bench_ivf.py -q -s --benchmark-columns=min,median,rounds --benchmark-sort=name

Each (size, data set, Q, method) at nprobe 16 is one pytest-benchmark entry; ``test_table`` prints, per data
set, recall@10 and queries/s at several nprobe, the nprobe each IVF needs for recall@10 >= 0.95 and its
speed there against the exact index and against the other IVF.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from engine.ivf import IVFSearcher
from engine.searcher import Searcher

faiss = pytest.importorskip("faiss")

K = 10
QS = (1, 256)
Q1_LOOP = 32  # single-query searches per timed call at Q = 1
N_RECALL = 1000
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_NPROBE = 16
TARGET_RECALL = 0.95
SIZES = {"small": [(200_000, 128, 512)], "full": [(1_000_000, 128, 1024)]}
DATASETS = ("gaussian", "mixture")
MIXTURE_CENTRES = 10_000
MIXTURE_NOISE = 0.75  # norm of the noise around a unit centre (per coordinate 0.75 / sqrt(d))


def chosen_sizes():
    names = os.environ.get("LOOKALIKE_BENCH_SIZES", "small").split(",")
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        raise pytest.UsageError(f"LOOKALIKE_BENCH_SIZES: unknown {unknown}; choose from {sorted(SIZES)}")
    return [nd for s in names for nd in SIZES[s]]


CASES = [(n, d, nlist, data) for n, d, nlist in chosen_sizes() for data in DATASETS]


def vectors(data, n, d, seed, chunk=65536):
    """n unit float32 vectors of the data set, generated in chunks (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((MIXTURE_CENTRES, d)) if data == "mixture" else None
    if centres is not None:
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for r0 in range(0, n, chunk):
        m = min(chunk, n - r0)
        x = rng.standard_normal((m, d))
        if centres is not None:
            x = centres[rng.integers(MIXTURE_CENTRES, size=m)] + MIXTURE_NOISE / np.sqrt(d) * x
        out[r0 : r0 + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


class Setup:
    """One data set in three indexes (ours, faiss IVF, exact) plus the queries and their true top 10."""

    def __init__(self, n, d, nlist, data):
        self.n, self.d, self.nlist, self.data = n, d, nlist, data
        x = vectors(data, n, d, seed=0)
        self.queries = vectors(data, N_RECALL, d, seed=1)
        rng = np.random.default_rng(2)
        sample = x[np.sort(rng.choice(n, size=64 * nlist, replace=False))]
        self.build = {}
        t0 = time.perf_counter()
        self.ours = IVFSearcher(d, nlist=nlist)
        self.ours.train(sample)
        self.ours.add(x)
        self.build["ivf"] = time.perf_counter() - t0
        faiss.omp_set_num_threads(2)
        t0 = time.perf_counter()
        self.faiss = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        self.faiss.cp.niter = 20
        self.faiss.cp.spherical = True
        self.faiss.train(sample)
        self.faiss.add(x)
        self.build["faiss"] = time.perf_counter() - t0
        self.exact = Searcher(d)
        self.exact.add(x)
        del x
        self.truth = self.exact.search(self.queries, K)[1]

    def recall(self, name, nprobe):
        if name == "faiss":
            self.faiss.nprobe = nprobe
            ids = self.faiss.search(self.queries, K)[1]
        else:
            ids = self.ours.search(self.queries, K, nprobe=nprobe)[1]
        return float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ids, self.truth)]))

    def method(self, name, q, nprobe):
        """A call answering ``q`` queries (Q = 1: a loop of ``Q1_LOOP`` single queries) and how many it answers."""
        one = [self.queries[i : i + 1] for i in range(Q1_LOOP)]
        batch = self.queries[:q]
        if name == "faiss":
            def search(x):
                self.faiss.nprobe = nprobe
                return self.faiss.search(x, K)
        elif name == "exact":
            def search(x):
                return self.exact.search(x, K)
        elif name in ("ivf", "ivf_blas"):
            method = "blas" if name == "ivf_blas" else "numba"

            def search(x):
                self.ours._method = method
                try:
                    return self.ours.search(x, K, nprobe=nprobe)
                finally:
                    self.ours._method = "numba"
        else:
            raise KeyError(name)
        if q == 1:
            return (lambda: [search(x) for x in one]), Q1_LOOP
        return (lambda: search(batch)), q


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}x{d}-nlist{nl}-{data}" for n, d, nl, data in CASES])
def setup(request):
    return Setup(*request.param)


def rounds_for(fn, budget_s=2.0, most=20):
    fn()
    t0 = time.perf_counter()
    fn()
    return int(max(3, min(most, budget_s / max(time.perf_counter() - t0, 1e-6))))


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("name", ["ivf", "faiss", "exact"])
def test_search(benchmark, setup, name, q):
    fn, answered = setup.method(name, q, DEFAULT_NPROBE)
    benchmark.group = f"top-{K} of {setup.n:,} x {setup.d} {setup.data}, nlist {setup.nlist}, Q={q}"
    benchmark.extra_info.update(n=setup.n, d=setup.d, q=q, queries_per_call=answered, method=name,
                                nprobe=DEFAULT_NPROBE, data=setup.data)
    benchmark.pedantic(fn, rounds=rounds_for(fn), warmup_rounds=0)


def test_answers_agree(setup):
    """nprobe = nlist scans every list: both IVF indexes then give the exact answer (up to float near-ties)."""
    ours = setup.ours.search(setup.queries[:64], K, nprobe=setup.nlist)
    setup.faiss.nprobe = setup.nlist
    theirs = setup.faiss.search(setup.queries[:64], K)
    exact = setup.exact.search(setup.queries[:64], K)
    np.testing.assert_allclose(ours[0], exact[0], atol=1e-5)
    np.testing.assert_allclose(theirs[0], exact[0], atol=1e-5)
    assert (ours[1] == exact[1]).mean() > 0.99


def interleaved(fns, budget_s=6.0):
    """Best time per call of each function, measured round-robin so that all see the same load."""
    per_round = 0.0
    for fn in fns.values():
        fn()
        t0 = time.perf_counter()
        fn()
        per_round += time.perf_counter() - t0
    rounds = int(max(3, min(15, budget_s / per_round)))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, rounds


def test_table(setup, capsys):
    names = ("ivf", "faiss", "exact", "ivf_blas")
    nprobes = [p for p in NPROBES if p <= setup.nlist // 2] + [setup.nlist]
    rows = []
    exact_qps = {}
    for p in nprobes:
        rec = {"ivf": setup.recall("ivf", p), "faiss": setup.recall("faiss", p)}
        qps = {}
        for q in QS:
            fns, answered = {}, None
            for name in names:
                if name == "exact" and q in exact_qps:
                    continue
                fns[name], answered = setup.method(name, q, p)
            best, _ = interleaved(fns)
            for name, t in best.items():
                qps[(name, q)] = answered / t
            exact_qps.setdefault(q, qps.get(("exact", q)))
        rows.append((p, rec, qps))
    load = os.getloadavg()[0]
    lines = [
        f"\nIVF, {setup.data}, {setup.n:,} x {setup.d}, nlist {setup.nlist}, k={K} (load average {load:.1f} on "
        f"{os.cpu_count()} cores); build: ours {setup.build['ivf']:.1f} s, faiss {setup.build['faiss']:.1f} s",
        f"exact Searcher: Q=1 {exact_qps[1]:.0f} q/s, Q=256 {exact_qps[256]:.0f} q/s",
        f"{'nprobe':>6} {'recall ours':>11} {'faiss':>6} | {'Q=1 ours':>9} {'faiss':>7} {'x exact':>7} | "
        f"{'Q=256 ours':>10} {'blas':>7} {'faiss':>7} {'x exact':>7}",
    ]
    for p, rec, qps in rows:
        lines.append(
            f"{p:>6} {rec['ivf']:>11.3f} {rec['faiss']:>6.3f} | {qps[('ivf', 1)]:>9.0f} {qps[('faiss', 1)]:>7.0f} "
            f"{qps[('ivf', 1)] / exact_qps[1]:>7.1f} | {qps[('ivf', 256)]:>10.0f} {qps[('ivf_blas', 256)]:>7.0f} "
            f"{qps[('faiss', 256)]:>7.0f} {qps[('ivf', 256)] / exact_qps[256]:>7.1f}"
        )
    at_target = {}
    for name in ("ivf", "faiss"):
        hit = [(p, rec, qps) for p, rec, qps in rows if rec[name] >= TARGET_RECALL]
        if not hit:
            lines.append(f"{name}: recall@10 {TARGET_RECALL} not reached below nprobe = nlist")
            continue
        p, rec, qps = at_target[name] = hit[0]
        lines.append(
            f"{name} reaches recall@10 {rec[name]:.3f} at nprobe {p}: Q=1 {qps[(name, 1)]:.0f} q/s "
            f"({qps[(name, 1)] / exact_qps[1]:.1f}x exact), Q=256 {qps[(name, 256)]:.0f} q/s "
            f"({qps[(name, 256)] / exact_qps[256]:.1f}x exact)"
        )
    if len(at_target) == 2:
        ours, theirs = at_target["ivf"][2], at_target["faiss"][2]
        lines.append("ours / faiss at recall@10 >= {}: Q=1 {:.2f}x, Q=256 {:.2f}x".format(
            TARGET_RECALL, ours[("ivf", 1)] / theirs[("faiss", 1)], ours[("ivf", 256)] / theirs[("faiss", 256)]))
    with capsys.disabled():
        print("\n".join(lines))
