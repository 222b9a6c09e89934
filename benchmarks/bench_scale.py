"""engine.scale on one machine: Ray embedding vs the in-process Encoder, sharded search vs one Searcher.

    PYTHONPATH=$PWD NUMBA_CACHE_DIR=$PWD/.numba_cache .venv/bin/python benchmarks/bench_scale.py \
        [--copies 6] [--rounds 2] [--vectors 200000] [--dim 128]

1. Embedding (issue 16's target: Ray's overhead <= 15%). The fungi photos of ../shared/data (158 JPEGs, longest
   side 512) copied ``--copies`` times into a temporary folder (distinct files), embedded with the packaged
   image encoder, batch 32:
   - peer: ``Encoder(model).encode(paths)`` in this process (onnxruntime's default threads: every core);
   - Ray, cluster already up: ``embed_collection(folder, out)`` (actor pool start, Ray Data, Parquet shards,
     manifest), with 2 actors x 1 thread and 1 actor x 2 threads;
   - Ray with start-up: ``ray.init`` + the same + ``ray.shutdown`` (what ``python -m engine.scale index`` costs);
   - Ray steady state: the time after the first embeddings came back (``first_result_seconds``: actor pool and
     Ray Data start-up), scaled to the whole collection (time x n / (n - 32)).
   Rounds alternate peer and Ray (the machine may be shared); each figure is the best round. Ratios are
   images/s of Ray over images/s of the peer.
2. Sharded search: ``--vectors`` random unit vectors of ``--dim`` (cosine), k = 10, at Q = 1 and Q = 256
   queries per call: one ``Searcher`` in this process, and ``ShardedSearcher`` with 1, 2 and 4 shard actors on
   this same machine (so the shards share its cores: this measures the fan-out's cost, not a cluster's speed-up;
   Ray gives each actor one BLAS thread, printed, where this process has one per core, so "1 shards" is the peer
   that differs only by the fan-out),
   queries/s over >= 2 s per figure, interleaved rounds, best round. Memory per shard: the shard actor's
   resident memory and the vectors + ids it holds, the slope between shard sizes, and the bytes per vector a
   ``Searcher.load`` holds in this process.
Prints the CPU (``lscpu``), the settings and every figure.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs"


def photo_folder(copies: int, tmp: Path) -> list[str]:
    src = sorted((SHARED / "fungi-sample" / "images").glob("*.jpg"))
    if not src:
        raise SystemExit(f"needs the fungi photos in {SHARED / 'fungi-sample' / 'images'}")
    folder = tmp / "photos"
    for c in range(copies):
        d = folder / f"copy{c}"
        d.mkdir(parents=True)
        for f in src:
            shutil.copy(f, d / f.name)
    return folder


def bench_embedding(args, tmp: Path) -> None:
    import ray

    from engine import Encoder
    from engine.default_models import default_model
    from engine.scale.embed import embed_collection
    from engine.search_cli import list_images

    folder = photo_folder(args.copies, tmp)
    files = [str(f) for f in list_images(folder)]
    n = len(files)
    model = default_model("image")
    print(f"\n== embedding {n} photos ({args.copies} x 158 fungi JPEGs), {model.name}, batch 32 ==")
    enc = Encoder(model, batch_size=32)
    enc.encode(files[:64])  # warm the session
    best = {}

    def keep(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds)

    configs = [("ray 2 actors x 1 thread", 2, 1), ("ray 1 actor x 2 threads", 1, 2)]
    for r in range(args.rounds):
        t = time.perf_counter()
        enc.encode(files)
        keep("in-process Encoder", time.perf_counter() - t)
        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        up = time.perf_counter() - t0
        took = {}
        try:
            for name, actors, threads in configs:
                out = tmp / f"emb-{r}-{actors}"
                t = time.perf_counter()
                res = embed_collection(folder, out, model=model, actors=actors, threads=threads, batch_size=32,
                                       progress=False, log=lambda m: None)
                took[name] = time.perf_counter() - t
                keep(name, took[name])
                # steady state: the images after the first returned block, over the time after it
                first = res["first_result_seconds"]
                keep(name + ", steady state", (took[name] - first) * n / (n - 32))
                print(f"    {name}: {took[name]:.2f} s, first embeddings back after {first:.2f} s")
                assert res["embedded"] == n, res
                shutil.rmtree(out)
        finally:
            t = time.perf_counter()
            ray.shutdown()
            down = time.perf_counter() - t
        keep("ray 2 actors x 1 thread + ray.init/shutdown", up + took[configs[0][0]] + down)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items())
              + f" (ray.init {up:.1f} s, shutdown {down:.1f} s)")
    peer = n / best["in-process Encoder"]
    print(f"{'':44s} {'s':>7s} {'img/s':>8s} {'vs peer':>8s}")
    for name, sec in best.items():
        print(f"{name:44s} {sec:7.2f} {n / sec:8.1f} {n / sec / peer:8.2f}x")


def shard_memory(s) -> list[tuple[float, float]]:
    """(resident MiB now, vectors + ids MiB) of each shard actor (Linux /proc)."""
    import ray

    def probe(self):
        import os

        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        n = len(self.searcher)
        return resident / 2**20, n * (self.searcher.dim * 4 + 8) / 2**20

    return ray.get([a.__ray_call__.remote(probe) for a in s._actors])


def _resident() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info()) or "none loaded"
    except ImportError:
        import os

        return f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"


def qps(fn, q, seconds: float = 2.0) -> float:
    fn(q)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(q)
        calls += 1
        el = time.perf_counter() - t0
        if el >= seconds:
            return calls * len(q) / el


def bench_search(args, tmp: Path) -> None:
    import ray

    from engine import Searcher
    from engine.scale.sharded import ShardedSearcher

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.vectors, args.dim)).astype(np.float32)
    queries = {1: rng.standard_normal((1, args.dim)).astype(np.float32),
               256: rng.standard_normal((256, args.dim)).astype(np.float32)}
    print(f"\n== search: {args.vectors} x {args.dim} float32 (cosine), k = 10 ==")
    one = Searcher(args.dim)
    one.add(x)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        sharded = {s: ShardedSearcher.build(tmp / f"idx{s}", x, shards=s) for s in (1, 2, 4)}
        blas = ray.get(sharded[1]._actors[0].__ray_call__.remote(lambda self: _blas_threads()))
        print(f"BLAS threads in a shard actor: {blas} (in this process: {_blas_threads()})")
        best = {}
        for _ in range(args.rounds):
            for nq, q in queries.items():
                best[("1 Searcher", nq)] = max(best.get(("1 Searcher", nq), 0), qps(lambda v: one.search(v, 10), q))
                for s, ss in sharded.items():
                    key = (f"{s} shards", nq)
                    best[key] = max(best.get(key, 0), qps(lambda v, ss=ss: ss.search(v, 10), q))
        print(f"{'':12s} {'Q=1 q/s':>9s} {'ms/query':>9s} {'Q=256 q/s':>10s} {'vs 1 Searcher (Q=1, Q=256)':>28s}")
        for name in ["1 Searcher", "1 shards", "2 shards", "4 shards"]:
            a, b = best[(name, 1)], best[(name, 256)]
            print(f"{name:12s} {a:9.1f} {1000 / a:9.2f} {b:10.1f} {a / best[('1 Searcher', 1)]:13.2f}x "
                  f"{b / best[('1 Searcher', 256)]:8.2f}x")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"1 Searcher: vectors + ids {args.vectors * (args.dim * 4 + 8) / 2**20:.1f} MiB "
              f"(this process's peak RSS {own:.0f} MiB, with everything else in it)")
        mems = {}
        sharded.pop(1).close()
        for s, ss in sharded.items():
            mems[s] = shard_memory(ss)
            print(f"{s} shards: per shard " + ", ".join(f"RSS {r:.0f} MiB (data {d:.1f} MiB)" for r, d in mems[s]))
            ss.close()
        per_vec = (np.mean([r for r, _ in mems[2]]) - np.mean([r for r, _ in mems[4]])) * 2**20 / (
            args.vectors / 2 - args.vectors / 4)
        print(f"shard actor memory per stored vector (RSS slope between {args.vectors // 2} and {args.vectors // 4} "
              f"vectors per shard): {per_vec:.0f} bytes (the float32 row alone: {args.dim * 4} bytes + 8 for its id)")
        # A fresh process (this one's heap has freed memory to reuse, which would hide the growth).
        code = ("import sys, gc; sys.path.insert(0, sys.argv[2]); from benchmarks.bench_scale import _resident; "
                "from engine import Searcher; gc.collect(); a = _resident(); s = Searcher.load(sys.argv[1]); "
                "gc.collect(); print((_resident() - a) / len(s))")
        held = subprocess.run([sys.executable, "-c", code, str(tmp / "idx2" / "shard-000.lkx"), str(ROOT)],
                              capture_output=True, text=True, check=True).stdout.strip()
        print(f"Searcher.load of a {args.vectors // 2}-vector shard file in a fresh process: {float(held):.0f} bytes "
              f"held per vector (rows, ids, the id -> row table)")
        # Fan-out cost alone: shards of 1,000 vectors, where the search itself is negligible.
        tiny = x[:1000]
        for s in (1, 2, 4):
            with ShardedSearcher.build(tmp / f"tiny{s}", tiny, shards=s) as ts:
                lat = min(1 / qps(lambda v: ts.search(v, 10), queries[1], seconds=1.0) for _ in range(args.rounds))
            one_tiny = Searcher(args.dim)
            one_tiny.add(tiny)
            base = 1 / qps(lambda v: one_tiny.search(v, 10), queries[1], seconds=1.0)
            print(f"fan-out to {s} shard actor(s) of <= 1000 vectors, Q=1: {lat * 1000:.2f} ms per call "
                  f"(one in-process Searcher of 1000: {base * 1000:.3f} ms)")
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=6, help="copies of the 158 fungi photos to embed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_embedding:
            bench_embedding(args, Path(d))
        if not args.skip_search:
            bench_search(args, Path(d))


if __name__ == "__main__":
    main()
