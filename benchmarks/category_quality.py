"""Category quality: do LA's embeddings (``--similar content``) find species and CIFAR-10 classes better than raw
pixels and HSV colour histograms? Every variant trained with ``python -m train.la`` for several seeds, evaluated
beside the baselines on the same images in the same run.

    .venv/bin/python benchmarks/category_quality.py                                  # LA defaults, seeds 0 1 2
    .venv/bin/python benchmarks/category_quality.py --variant default= --variant e120="--epochs 120" \\
        --flip-average --json runs/category_quality.json

Data: ../shared/data/fungi-sample (158 photos, 12 species; leave-one-out 1-NN and k-means NMI with k = 12 on all
of them, as ``train.la`` evaluates a data set without a held-out part) and the CIFAR-10 test batch
(../shared/data/cifar-10-batches-py: ``train.la`` trains on the first 8,000 images; the last 2,000 are evaluated,
1-NN against the 8,000 and k-means NMI with k = 10 among themselves). Each (variant, data set, seed) is one
``train.la`` process (``--seed``; torch limited to ``--threads`` threads); its exported encoder (the checkpoint's,
exactly what ``export`` writes) embeds the images here. k-means for NMI uses the run's seed, so the baselines' NMI
also gets a standard error; their 1-NN does not depend on a seed.

Per variant, besides the embedding ``train.la`` exports (``LA``), with ``--flip-average`` the mean of the
normalised codes of each image and its mirror image (``+flip``), and with ``--code`` the backbone's code before
the linear head (``code``; what dropping the head at export would give). Every training process's wall time,
CPU time (user + sys, from ``wait4``) and the load average around it are recorded: on a shared machine the CPU
time, not the wall time, is the budget (``CPU s / 2`` is the 2-core equivalent).

Prints one table (mean +- standard error over the seeds) and the margins the issue's targets ask for; ``--json``
writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LOOKALIKE_SHARED_DATA", ROOT.parent / "shared" / "data"))

DATA = {"fungi": ("fungi", SHARED / "fungi-sample", 0.0), "cifar10": ("cifar10", SHARED / "cifar-10-batches-py", 0.2)}
METRICS = ("knn1", "nmi")


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    v = np.asarray(values, np.float64)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def train(variant_args: list[str], data: str, seed: int, out: Path, threads: int) -> dict:
    """One ``train.la`` process -> its wall / CPU seconds and load averages (raises on a failed run)."""
    name, root, _ = DATA[data]
    argv = [sys.executable, "-m", "train.la", "--data", name, "--data-root", str(root), "--seed", str(seed),
            "--out", str(out), "--no-progress", *variant_args]
    # numba's threads too: beyond torch's, on a loaded machine they multiply the CPU time of every step by ~10
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out / "train.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"train.la exited with {proc.returncode}: {' '.join(map(shlex.quote, argv))}\n{tail}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_start": [round(x, 2) for x in load0], "load_end": [round(x, 2) for x in os.getloadavg()],
            "train_seconds": metrics.get("train_seconds"), "epochs": metrics.get("epochs"),
            "la_knn1": metrics.get("knn1_accuracy"), "la_nmi": metrics.get("kmeans_nmi"),
            "command": " ".join(["python -m train.la", *map(shlex.quote, argv[3:])])}


def embeddings(run: Path, images, *, flip: bool, code: bool) -> dict[str, np.ndarray]:
    """The run's exported embedding of ``images`` and, on request, its flip average and its pre-head code."""
    from train.evaluate import embed, l2_normalize
    from train.registry import load_encoder

    model, info = load_encoder(run)
    pre = info.preprocess
    mirrored = [np.ascontiguousarray(im[:, ::-1]) for im in images] if flip else None
    out = {"LA": embed(model, images, pre)}
    if flip:
        out["LA+flip"] = l2_normalize(out["LA"]) + l2_normalize(embed(model, mirrored, pre))
    if code:
        backbone = model.backbone
        torch_code = embed(backbone, images, pre)
        out["code"] = torch_code
        if flip:
            out["code+flip"] = l2_normalize(torch_code) + l2_normalize(embed(backbone, mirrored, pre))
    return out


def scores(emb_tr: np.ndarray, y_tr, emb_te: np.ndarray | None, y_te, seed: int) -> dict:
    """1-NN (held out against train, else leave-one-out) and k-means NMI (held-out rows, else all), as train.la."""
    from train import evaluate as ev

    if emb_te is None:
        return {"knn1": ev.loo_knn1_accuracy(emb_tr, y_tr), "nmi": ev.kmeans_nmi(emb_tr, y_tr, seed=seed)}
    return {"knn1": ev.knn1_accuracy(emb_tr, y_tr, emb_te, y_te), "nmi": ev.kmeans_nmi(emb_te, y_te, seed=seed)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help='a name and train.la options, e.g. e120="--epochs 120" (repeatable; default: default=)')
    p.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA), help="data sets (default: both)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training process (default: 2)")
    p.add_argument("--flip-average", action="store_true", help="also evaluate test-time flip averaging")
    p.add_argument("--code", action="store_true", help="also evaluate the backbone's code before the head")
    p.add_argument("--out", default="runs/category_quality", help="run folders go here (default: %(default)s)")
    p.add_argument("--reuse", action="store_true", help="evaluate run folders already trained instead of training")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    from train import evaluate as ev
    from train.split import load_split

    variants = {}
    for v in args.variant or ["default="]:
        name, sep, rest = v.partition("=")
        if not sep or not name:
            p.error(f"--variant must be NAME=ARGS, got {v!r}")
        variants[name] = shlex.split(rest)
    out_root = Path(args.out)
    figures: dict = {"seeds": args.seeds, "threads": args.threads, "cpu": _cpu_name(), "data": {}, "runs": {}}
    per: dict = {}  # (method, data, metric) -> [values over seeds]
    for data in args.data:
        name, root, holdout = DATA[data]
        tr, te = load_split(name, root, limit=None, holdout=holdout, min_train=3, who="LA")
        figures["data"][data] = {"train": len(tr), "evaluated": len(te) if te is not None else len(tr)}
        base = {"raw pixels": lambda im: ev.raw_pixels(im, size=32), "HSV histogram": ev.hsv_histogram}
        for bname, fn in base.items():
            e_tr, e_te = fn(tr.images), (fn(te.images) if te is not None else None)
            for seed in args.seeds:
                for m, val in scores(e_tr, tr.labels, e_te, None if te is None else te.labels, seed).items():
                    per.setdefault((bname, data, m), []).append(val)
        for vname, vargs in variants.items():
            for seed in args.seeds:
                run = out_root / f"{vname}-{data}-s{seed}"
                if args.reuse and (run / "metrics.json").exists():
                    rec = {"reused": True}
                else:
                    rec = train(vargs, data, seed, run, args.threads)
                print(f"{vname} {data} seed {seed}: {rec}", file=sys.stderr)
                figures["runs"][f"{vname}/{data}/{seed}"] = rec
                emb_tr = embeddings(run, tr.images, flip=args.flip_average, code=args.code)
                emb_te = embeddings(run, te.images, flip=args.flip_average, code=args.code) if te is not None else None
                for kind, e in emb_tr.items():
                    got = scores(e, tr.labels, None if emb_te is None else emb_te[kind],
                                 None if te is None else te.labels, seed)
                    for m, val in got.items():
                        per.setdefault((f"{vname} {kind}", data, m), []).append(val)

    table = {}
    for (method, data, m), vals in per.items():
        mu, se = mean_se(vals)
        table.setdefault(method, {})[f"{data} {m}"] = {"mean": round(mu, 4), "se": round(se, 4),
                                                       "values": [round(v, 4) for v in vals]}
    figures["table"] = table
    cols = [f"{d} {m}" for d in args.data for m in METRICS]
    print(f"| method | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for method, row in table.items():
        cells = [f"{row[c]['mean']:.3f} ± {row[c]['se']:.3f}" if c in row else "-" for c in cols]
        print(f"| {method} | {' | '.join(cells)} |")
    figures["targets"] = targets(table, args.data)
    for method, t in figures["targets"].items():
        print(f"{method}: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    cpu = {}
    for key, rec in figures["runs"].items():
        if "cpu_s" in rec:
            vname, data, _ = key.split("/")
            cpu.setdefault(f"{vname} {data}", []).append(rec)
    for k, recs in cpu.items():
        cpu_s, wall_s = np.mean([r["cpu_s"] for r in recs]), np.mean([r["wall_s"] for r in recs])
        print(f"{k}: CPU {cpu_s:.0f} s, wall {wall_s:.0f} s "
              f"per run (load {recs[0]['load_start'][0]:.1f}-{recs[-1]['load_end'][0]:.1f})")
    if args.json:
        from train.common import atomic_write_json

        atomic_write_json(args.json, figures)
    return 0


def targets(table: dict, datasets) -> dict:
    """Per LA method: species 1-NN / NMI above HSV in standard errors of the difference (LA's and HSV's SE
    combined), and CIFAR-10 1-NN against 0.50."""
    hsv = table.get("HSV histogram", {})
    out = {}
    for method, row in table.items():
        if method in ("raw pixels", "HSV histogram"):
            continue
        t = {}
        if "fungi" in datasets:
            for m in METRICS:
                a, b = row[f"fungi {m}"], hsv[f"fungi {m}"]
                se = float(np.hypot(a["se"], b["se"]))
                t[f"species {m} margin/SE"] = round((a["mean"] - b["mean"]) / se, 2) if se > 0 else None
        if "cifar10" in datasets:
            t["cifar 1-NN >= 0.50"] = bool(row["cifar10 knn1"]["mean"] >= 0.50)
        out[method] = t
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
