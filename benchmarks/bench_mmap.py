"""Memory-mapped loads of a large exact index (and an IVF index): open time, resident memory, answers.

    PYTHONPATH=$PWD NUMBA_CACHE_DIR=$PWD/.numba_cache .venv/bin/python benchmarks/bench_mmap.py \
        [--rows 10000000] [--dim 128] [--dir /work/tmp-bench] [--ivf-rows 1000000] [--keep]

1. Writes a cosine ``Searcher`` file (format 3, what ``save`` writes) of ``--rows`` x ``--dim`` unit float32
   vectors (Gaussian rows normalised in float64, as ``add`` does) by streaming, block by block, into a temporary
   file renamed over the target (``save`` would need the whole index in memory first, twice over as it grows):
   10M x 128 is 5.1 GB; check ``df -h`` first. The file is deleted at the end unless ``--keep``.
2. In a fresh process each, side by side and alternating (the machine may be shared), with the file's pages
   first dropped from the page cache (``posix_fadvise(DONTNEED)``: a cold open, as after a reboot) and then
   again with them cached (warm):
   - ``Searcher.load(path, mmap=True)``: open time, resident memory (psutil RSS) after the open, after one
     query (Q = 1, k = 10: it reads every vector once) and the peak;
   - ``Searcher.load(path)`` (reads the file whole): the same figures.
   Then ``verify()`` of the mapped index (reads and hashes the vectors) and queries/s at Q = 1 and Q = 16 of both.
3. Answers: 4 queries (2 stored rows plus noise, 2 random) answered by the mapped index and by a brute-force
   numpy scan of the whole file through ``np.memmap`` (float64 scores, block by block, independent of the
   engine's kernels): the ids must be equal and the scores within 1e-5.
4. ``--ivf-rows`` (0 to skip): an ``IVFSearcher`` (nlist 1024) of that many vectors saved and opened mapped and
   whole: open time, RSS after the open and after one query at nprobe 16 (it touches only the probed lists),
   the answer compared with the whole load's.
Prints the CPU, the load average before and after, and every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.searcher import MAGIC, _normalised, header_line  # noqa: E402

BLOCK = 1 << 19  # rows generated and written at a time (256 MiB of float32 at dim 128)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    flags = f" {info.get('Flags', '')} "
    simd = "+".join(f for f in ("avx2", "fma", "avx512f") if f" {f} " in flags)
    return (f"{info.get('Model name', '?')} (family {info.get('CPU family', '?')}, model {info.get('Model', '?')}), "
            f"{info.get('CPU(s)', '?')} CPUs, {simd}")


def block_rows(seed: int, r0: int, r1: int, dim: int) -> np.ndarray:
    """Rows r0 .. r1-1 of the benchmark's vectors (unit float32, the same on every call)."""
    rng = np.random.default_rng([seed, r0])
    return _normalised(rng.standard_normal((r1 - r0, dim)))


def write_index(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """Stream a format-3 cosine index of ``rows`` vectors to ``path`` (temporary file, fsync, rename). The header
    comes first but holds the sections' digests: it is written with placeholders of the same length, then
    rewritten in place once the payload is hashed (the line's length, so the payload's offset, is unchanged)."""
    header = {"format_version": 3, "dim": dim, "metric": "cosine", "count": rows, "next_id": rows, "model": None,
              "model_path": None, "stamps": False, "meta_bytes": None,
              "section_sha256": {"ids": "0" * 64, "vectors": "0" * 64, "stamps": None, "meta": None}}
    placeholder = header_line(MAGIC, header)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(placeholder)
            ids_hash, vec_hash = hashlib.sha256(), hashlib.sha256()
            for r0 in range(0, rows, BLOCK):  # ids: 0 .. rows-1
                ids = np.arange(r0, min(rows, r0 + BLOCK), dtype="<i8")
                ids_hash.update(ids.tobytes())
                f.write(ids.tobytes())
            for r0 in range(0, rows, BLOCK):
                x = block_rows(seed, r0, min(rows, r0 + BLOCK), dim).astype("<f4")
                vec_hash.update(memoryview(x.reshape(-1)).cast("B"))
                f.write(memoryview(x.reshape(-1)).cast("B"))
            header["section_sha256"] = {"ids": ids_hash.hexdigest(), "vectors": vec_hash.hexdigest(),
                                        "stamps": None, "meta": None}
            line = header_line(MAGIC, header)
            assert len(line) == len(placeholder)
            f.seek(0)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def stored_row(r: int, dim: int, seed: int = 0) -> np.ndarray:
    b0 = r - r % BLOCK
    return block_rows(seed, b0, r + 1, dim)[-1]


def queries(dim: int, rows: int) -> np.ndarray:
    """2 stored rows (``rows // 3`` and the last) plus a little noise, then 2 random queries."""
    rng = np.random.default_rng(123)
    q = np.vstack([stored_row(r, dim) for r in (rows // 3, rows - 1)]).astype(np.float64)
    q += 0.05 / np.sqrt(dim) * rng.standard_normal(q.shape)
    return np.vstack([q, rng.standard_normal((2, dim))])


# -- measurements in a fresh process --------------------------------------------------------------------------


def measure(kind: str, path: str, dim: int, rows: int, cold: bool) -> dict:
    q = np.load(Path(path).with_suffix(".queries.npy"))  # made by the parent: no block of rows made here
    import psutil

    from engine.ivf import IVFSearcher
    from engine.searcher import Searcher

    proc = psutil.Process()
    mib = 1 << 20
    ivf = kind.startswith("ivf")
    cls = IVFSearcher if ivf else Searcher
    with tempfile.TemporaryDirectory() as tmp:  # compile / load the kernels first: the figures are the index's
        tiny = (IVFSearcher(dim, nlist=4) if ivf else Searcher(dim))
        tiny.add(np.random.default_rng(0).standard_normal((300, dim)))
        tiny.save(Path(tmp) / "tiny")
        cls.load(Path(tmp) / "tiny", mmap=kind.endswith("mmap")).search(np.ones((1, dim)), 10)
        del tiny
    if cold:
        drop_cache(Path(path))
    out = {"kind": kind, "cold": cold, "rss_start_mib": proc.memory_info().rss / mib}
    t0 = time.perf_counter()
    s = cls.load(path, mmap=kind.endswith("mmap"))
    out["open_s"] = time.perf_counter() - t0
    out["rss_open_mib"] = proc.memory_info().rss / mib
    t0 = time.perf_counter()
    scores, ids = s.search(q[:1], 10)
    out["first_query_s"] = time.perf_counter() - t0
    out["rss_query_mib"] = proc.memory_info().rss / mib
    scores, ids = s.search(q, 10)
    out["answer_ids"] = ids.tolist()
    out["answer_scores"] = scores.tolist()
    if not cold and not ivf:
        for nq in (1, 16):
            qq = np.random.default_rng(nq).standard_normal((nq, dim))
            s.search(qq, 10)
            t0, calls = time.perf_counter(), 0
            while time.perf_counter() - t0 < 3.0:
                s.search(qq, 10)
                calls += 1
            out[f"qps_Q{nq}"] = calls * nq / (time.perf_counter() - t0)
        if kind.endswith("mmap"):
            t0 = time.perf_counter()
            s.verify()
            out["verify_s"] = time.perf_counter() - t0
            out["rss_verify_mib"] = proc.memory_info().rss / mib
    with open("/proc/self/status") as f:  # VmHWM: this process image's peak (ru_maxrss keeps the parent's)
        out["peak_rss_mib"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return out


def run_measure(kind: str, path: Path, dim: int, rows: int, cold: bool) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--path", str(path), "--dim", str(dim), "--rows", str(rows)]
    if cold:
        cmd.append("--cold")
    if not path.with_suffix(".queries.npy").exists():
        np.save(path.with_suffix(".queries.npy"), queries(dim, rows))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{kind} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def brute_force(path: Path, q: np.ndarray, k: int, dim: int, rows: int):
    """Top-k by a numpy scan of the file's vectors through np.memmap (float64 scores, lowest row on ties)."""
    with open(path, "rb") as f:
        line = f.readline()
    offset = len(line) + rows * 8
    x = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(rows, dim))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    best_s = np.full((q.shape[0], 0), -np.inf)
    best_r = np.zeros((q.shape[0], 0), dtype=np.int64)
    step = 1 << 17
    for r0 in range(0, rows, step):
        s = qn @ np.asarray(x[r0 : r0 + step], dtype=np.float64).T
        cs = np.hstack([best_s, s])
        cr = np.hstack([best_r, np.broadcast_to(np.arange(r0, r0 + s.shape[1]), s.shape)])
        order = np.lexsort((cr, -cs), axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(cs, order, 1), np.take_along_axis(cr, order, 1)
    return best_s, best_r


def fmt(r: dict) -> str:
    keys = ["open_s", "rss_open_mib", "first_query_s", "rss_query_mib", "peak_rss_mib", "qps_Q1", "qps_Q16",
            "verify_s", "rss_verify_mib"]
    return ", ".join(f"{k} {r[k]:.3f}" if k.endswith("_s") or k.startswith("qps") else f"{k} {r[k]:.0f}"
                     for k in keys if k in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dir", default=None, help="folder for the index files (default: a temporary folder in /work)")
    ap.add_argument("--ivf-rows", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.path, args.dim, args.rows, args.cold)))
        return
    print(f"CPU: {cpu_name()}; load average before: {os.getloadavg()}")
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-mmap-", dir="/work"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "big.lkx"
    try:
        t0 = time.perf_counter()
        write_index(path, args.rows, args.dim)
        print(f"wrote {path}: {args.rows} x {args.dim}, {path.stat().st_size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.1f} s (streamed)")
        results = {}
        for cold in (True, False):
            for kind in ("mmap", "full", "mmap", "full") if not cold else ("mmap", "full"):
                r = run_measure(kind, path, args.dim, args.rows, cold)
                key = (kind, cold)
                if key not in results or r["open_s"] < results[key]["open_s"]:
                    results[key] = r
                print(f"  {'cold' if cold else 'warm'} {kind:4s}: {fmt(r)}", flush=True)
        q = np.load(path.with_suffix(".queries.npy"))
        t0 = time.perf_counter()
        bs, br = brute_force(path, q, 10, args.dim, args.rows)
        print(f"brute-force numpy scan of the file: {time.perf_counter() - t0:.1f} s")
        for key, r in results.items():
            same = np.array_equal(np.asarray(r["answer_ids"]), br)
            close = np.allclose(np.asarray(r["answer_scores"]), bs, atol=1e-5, rtol=0)
            print(f"  {key[0]} ({'cold' if key[1] else 'warm'}): ids equal to brute force: {same}; scores within "
                  f"1e-5: {close}")
            if not (same and close):
                raise SystemExit("answers differ from the brute-force scan")
        print(f"  stored rows {args.rows // 3} and {args.rows - 1} (plus noise) found first: {br[:2, 0].tolist()}")
        for cold in (True, False):
            m, f = results[("mmap", cold)], results[("full", cold)]
            print(f"{'cold' if cold else 'warm'}: open {m['open_s']:.3f} s mapped vs {f['open_s']:.3f} s whole "
                  f"({f['open_s'] / m['open_s']:.0f}x); RSS after open {m['rss_open_mib']:.0f} vs "
                  f"{f['rss_open_mib']:.0f} MiB; after one query {m['rss_query_mib']:.0f} vs "
                  f"{f['rss_query_mib']:.0f} MiB; peak {m['peak_rss_mib']:.0f} vs {f['peak_rss_mib']:.0f} MiB")
        m, f = results[("mmap", False)], results[("full", False)]
        print(f"warm queries/s mapped vs whole: Q=1 {m['qps_Q1']:.2f} vs {f['qps_Q1']:.2f} "
              f"({m['qps_Q1'] / f['qps_Q1']:.2f}x), Q=16 {m['qps_Q16']:.1f} vs {f['qps_Q16']:.1f} "
              f"({m['qps_Q16'] / f['qps_Q16']:.2f}x); verify() {m['verify_s']:.1f} s")
        path.unlink()
        if args.ivf_rows:
            ivf_part(folder, args.ivf_rows, args.dim)
    finally:
        if not args.keep:  # only the files made here
            for name in ("big.lkx", "big.queries.npy", "ivf.lkv", "ivf.queries.npy"):
                (folder / name).unlink(missing_ok=True)
            if not args.dir:
                folder.rmdir()
    print(f"load average after: {os.getloadavg()}")


def ivf_part(folder: Path, rows: int, dim: int) -> None:
    from engine.ivf import IVFSearcher

    path = folder / "ivf.lkv"
    x = np.vstack([block_rows(1, r0, min(rows, r0 + BLOCK), dim) for r0 in range(0, rows, BLOCK)])
    t0 = time.perf_counter()
    s = IVFSearcher(dim, nlist=1024, nprobe=16)
    s.train(x[: 64 * 1024])
    s.add(x)
    s.save(path)
    del s, x
    print(f"IVF: {rows} x {dim}, nlist 1024, built and saved in {time.perf_counter() - t0:.1f} s, "
          f"{path.stat().st_size / 1e9:.2f} GB")
    res = {}
    for kind in ("ivf-mmap", "ivf-full", "ivf-mmap", "ivf-full"):
        r = run_measure(kind, path, dim, rows, True)
        print(f"  cold {kind}: {fmt(r)}", flush=True)
        if kind not in res or r["open_s"] < res[kind]["open_s"]:
            res[kind] = r
    m, f = res["ivf-mmap"], res["ivf-full"]
    same = m["answer_ids"] == f["answer_ids"] and m["answer_scores"] == f["answer_scores"]
    print(f"IVF cold: open {m['open_s']:.3f} s mapped vs {f['open_s']:.3f} s whole; RSS after open "
          f"{m['rss_open_mib']:.0f} vs {f['rss_open_mib']:.0f} MiB, after one query (nprobe 16) "
          f"{m['rss_query_mib']:.0f} vs {f['rss_query_mib']:.0f} MiB; answers identical: {same}")
    if not same:
        raise SystemExit("IVF answers differ between the mapped and the whole load")
    path.unlink()


if __name__ == "__main__":
    main()
