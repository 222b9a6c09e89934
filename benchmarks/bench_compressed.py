"""Compressed storage: the exact Searcher with float16 and int8 codes vs float32 storage (the reference), side by side.

Each index is built, saved and loaded back (``Searcher.load(path)``, the way an index is served: a compressed
one keeps its codes in memory and its float32 vectors mapped in the file, read only for the re-ranked short
list). Measured per index, in one run:
- memory: ``resident_bytes()`` (the vector data the index holds in its own memory) and, in a fresh
  subprocess that loads the index and answers one re-ranked search, the process's anonymous resident memory
  (RssAnon, after ``malloc_trim(0)``: glibc keeps the freed temporaries of the load's checks otherwise) above
  the interpreter's before the load (it includes the ids, 8 bytes a vector, for every storage), and its
  file-backed resident pages (RssFile: what the index maps and the search touched; the re-ranked rows are read
  with pread, so it stays flat);
- throughput: queries/s at Q = 1 (a loop of ``Q1_LOOP`` single-query searches) and at Q = 256 (one batch),
  best of interleaved rounds (every method once per round, the order rotating, 5 ms apart, so all see the
  same load), as ratios to the float32 index;
- recall@10 against the float32 index's answer (``N_RECALL`` queries), without and with ``rerank=RERANK``.
Targets (issue 16): memory 2x (float16) / 4x (int8) lower; exact-search throughput at Q = 1 >= 1.7x the
float32 index; recall@10 of the re-ranked answer >= 0.99.

Data (``LOOKALIKE_BENCH_DATA``, comma-separated; default both): L2-normalised float32 vectors, queries drawn
from the same distribution (not stored): ``gaussian`` (i.i.d. normal coordinates, the hard case: the 10 best
scores are packed closely) and ``mixture`` (10,000 unit centres plus noise of norm 0.75, as in bench_ivf.py).

Sizes (``LOOKALIKE_BENCH_SIZES``, comma-separated; default ``small``):
    small: N=200,000 x D=128      (a quick run: a minute or two)
    full:  N=1,000,000 x D=128    (the issue's size)

    NUMBA_CACHE_DIR=.numba_cache LOOKALIKE_BENCH_SIZES=full .venv/bin/python -m pytest \\
        benchmarks/bench_compressed.py -q -s --benchmark-columns=min,median,rounds --benchmark-sort=name

Each (size, data, storage, Q) is one pytest-benchmark entry (re-ranked for the compressed ones);
``test_table`` prints the ratios, the CPU and the load average.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.searcher import Searcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import vectors  # noqa: E402  (benchmarks/synthetic.py)

K = 10
QS = (1, 256)
Q1_LOOP = 16  # single-query searches per timed call at Q = 1
N_RECALL = 1000
RERANK = int(os.environ.get("LOOKALIKE_BENCH_RERANK", "100"))
ROUNDS = int(os.environ.get("LOOKALIKE_BENCH_ROUNDS", "7"))
STORAGES = ("float32", "float16", "int8")
SIZES = {"small": [(200_000, 128)], "full": [(1_000_000, 128)]}
DATASETS = ("gaussian", "mixture")
ROOT = Path(__file__).resolve().parents[1]


def _chosen(var, default, known):
    names = os.environ.get(var, default).split(",")
    unknown = [s for s in names if s not in known]
    if unknown:
        raise pytest.UsageError(f"{var}: unknown {unknown}; choose from {sorted(known)}")
    return names


CASES = [(n, d, data) for s in _chosen("LOOKALIKE_BENCH_SIZES", "small", SIZES) for n, d in SIZES[s]
         for data in _chosen("LOOKALIKE_BENCH_DATA", ",".join(DATASETS), DATASETS)]


_RSS_PROBE = r"""
import ctypes, json, sys
import numpy as np
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split()[:2]
                out[key[:-1]] = int(value) * 1024
    return out
from engine.searcher import Searcher
q = np.load(sys.argv[2])
Searcher(q.shape[1]).search(q, 10)  # the kernels' and BLAS's own memory, before the load
before = status()
s = Searcher.load(sys.argv[1])
s.search(q, 10, rerank=int(sys.argv[3]))
ctypes.CDLL(None).malloc_trim(0)  # glibc keeps freed temporaries of the load's checks: give them back first
after = status()
print(json.dumps({"anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"],
                  "resident_bytes": s.resident_bytes()}))
"""


class Setup:
    def __init__(self, n, d, data, folder: Path):
        self.n, self.d, self.data = n, d, data
        x = vectors(data, n, d, seed=1)
        self.queries = vectors(data, N_RECALL, d, seed=2)
        self.paths, self.index = {}, {}
        for storage in STORAGES:
            s = Searcher(d, storage=storage)
            s.add(x)
            self.paths[storage] = folder / f"{storage}.lkx"
            s.save(self.paths[storage])
            del s
            self.index[storage] = Searcher.load(self.paths[storage])
        del x
        qfile = folder / "q.npy"
        np.save(qfile, self.queries[:1])
        self.rss = {}
        for storage in STORAGES:
            out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(self.paths[storage]), str(qfile), str(RERANK)],
                                 capture_output=True, text=True, check=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            self.rss[storage] = json.loads(out.stdout.strip().splitlines()[-1])

    def methods(self):
        """name -> (index, rerank): the float32 reference, each compressed index plain and re-ranked."""
        out = {"float32": (self.index["float32"], None)}
        for storage in STORAGES[1:]:
            out[storage] = (self.index[storage], None)
            out[f"{storage}+rerank"] = (self.index[storage], RERANK)
        return out

    def run(self, name, q):
        s, rerank = self.methods()[name]
        if q == 1:
            for i in range(Q1_LOOP):
                s.search(self.queries[i], K, rerank=rerank)
        else:
            s.search(self.queries[:q], K, rerank=rerank)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def setup(request, tmp_path_factory):
    n, d, data = request.param
    return Setup(n, d, data, tmp_path_factory.mktemp(f"bench_compressed_{n}_{data}"))


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("name", ["float32", "float16+rerank", "int8+rerank"])
def test_search(benchmark, setup, name, q):
    benchmark.group = f"{setup.n}x{setup.d} {setup.data} Q={q}"
    benchmark.pedantic(setup.run, args=(name, q), rounds=3, iterations=1, warmup_rounds=1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return ", ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni") if f in flags)


def test_table(setup, capsys):
    methods = list(setup.methods())
    best = {(m, q): np.inf for m in methods for q in QS}
    for r in range(ROUNDS):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for q in QS:
            for m in order:
                t0 = time.perf_counter()
                setup.run(m, q)
                best[m, q] = min(best[m, q], time.perf_counter() - t0)
                time.sleep(0.005)
    qps = {(m, q): (Q1_LOOP if q == 1 else q) / best[m, q] for m in methods for q in QS}
    want = np.concatenate([setup.index["float32"].search(setup.queries[a : a + 256], K)[1]
                           for a in range(0, N_RECALL, 256)])
    ref_bytes = setup.index["float32"].resident_bytes()
    lines = [f"\n{setup.n:,} x {setup.d} {setup.data}; CPU {cpu_name()} ({os.cpu_count()} cores; {cpu_flags()}); "
             f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; rerank {RERANK}; best of {ROUNDS} "
             f"interleaved rounds",
             f"{'index':16} {'resident MB':>11} {'x less':>7} {'RssAnon MB':>10} {'RssFile MB':>10} "
             f"{'Q=1 q/s':>9} {'x f32':>6} {'Q=256 q/s':>9} {'x f32':>6} {'recall@10':>9}"]
    for m in methods:
        storage = m.split("+")[0]
        s, rerank = setup.methods()[m]
        got = np.concatenate([s.search(setup.queries[a : a + 256], K, rerank=rerank)[1]
                              for a in range(0, N_RECALL, 256)])
        rec = np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(want, got)])
        res = s.resident_bytes()
        rss = setup.rss[storage]
        lines.append(f"{m:16} {res / 1e6:11.1f} {ref_bytes / res:7.2f} {rss['anon'] / 1e6:10.1f} "
                     f"{rss['file'] / 1e6:10.1f} {qps[m, 1]:9.1f} {qps[m, 1] / qps['float32', 1]:6.2f} "
                     f"{qps[m, 256]:9.1f} {qps[m, 256] / qps['float32', 256]:6.2f} {rec:9.4f}")
    with capsys.disabled():
        print("\n".join(lines))
