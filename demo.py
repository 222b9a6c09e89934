"""The main job (`make demo`): the whole path on embedded data, on a fresh machine, in a few minutes.

1. trains each encoder briefly on data that ships inside registry packages;
2. exports them all to ONNX (parity-checked against torch);
3. indexes the embedded photos with the engine's Searcher and queries them (a PNG of results);
4. streams the embedded video through the MPNN and reports shots and transitions (a PNG timeline);
and writes runs/demo/report.json with what every step measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import numpy as np
from pathlib import Path

# Brief training runs: (model name, trainer module, arguments). Each finishes in well under a minute or two
# on a 2-core CPU; the MPNN keeps its default budget so that every level reaches its similarity threshold
# (the stream in step 4 depends on it), and LA its default 60 epochs on the photos (18 s on the quiet reference
# machine; step 3 searches with it).
TRAINING = [
    ("mpnn", "train.mpnn", []),
    ("siamese", "train.siamese", ["--data", "mnist-5k", "--epochs", "1"]),
    ("ae-conv", "train.ae", ["--arch", "conv", "--data", "photos", "--epochs", "10"]),
    ("ae-vgg16bn", "train.ae", ["--arch", "vgg16bn", "--data", "photos", "--epochs", "1", "--image-size", "64"]),
    ("la", "train.la", ["--data", "photos"]),
]
SEARCH_MODEL = "la"  # the encoder used to index the photos
K = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--skip-training", action="store_true", help="reuse the run folders already under --out")
    return p.parse_args(argv)


def step(title: str):
    print(f"\n== {title}", flush=True)
    return time.time()


def train_all(out: Path) -> dict:
    seconds = {}
    for name, module, args in TRAINING:
        t0 = step(f"train {name}: python -m {module} {' '.join(args)}")
        importlib.import_module(module).main(args + ["--out", str(out / "runs" / name), "--seed", "0"])
        seconds[name] = round(time.time() - t0, 1)
    return trained(out, seconds)


def trained(out: Path, seconds: dict | None = None) -> dict:
    """``{name: {"seconds", "metrics"}}`` for each model of TRAINING whose run folder under ``out/runs`` holds a
    metrics.json: the metrics exactly as its trainer wrote them (``seconds``: training time, when measured)."""
    results = {}
    for name, _, _ in TRAINING:
        path = out / "runs" / name / "metrics.json"
        if path.is_file():
            results[name] = {"seconds": (seconds or {}).get(name), "metrics": json.loads(path.read_text())}
    return results


def evaluation(metrics: dict) -> list[tuple[str, object]]:
    """The headline evaluation in one run's metrics.json, as (label, value) pairs; the one place that knows
    which keys each trainer writes (``name`` is the model, as ``Run.write_metrics`` records it).

    mpnn: levels that reached the similarity threshold, then (complete runs) the embedding's mean max |cos|
    between maps and, on a whole video with known cuts, the share of cuts at the 5 lowest frame-to-frame
    similarities. siamese: held-out pair accuracy and 1-NN label accuracy (raw pixels beside it). ae-*: held-out
    reconstruction MSE, with labels 1-NN accuracy. la: with labels 1-NN accuracy and k-means NMI (raw pixels
    beside them); without labels only the training loss, the last epoch's."""
    name = metrics.get("name") or metrics.get("model") or ""
    out: list[tuple[str, object]] = []
    if name == "mpnn":
        levels = metrics.get("per_level") or []
        out.append(("levels reached", f"{sum(bool(lv.get('reached')) for lv in levels)}/{metrics.get('levels')}"))
        ev = metrics.get("eval")
        if ev:
            out.append(("mean max|cos|", ev["per_level"][-1]["mean_max_cos"]))
            cuts = (ev.get("consecutive_frames") or {}).get("cut_recall_at_5")
            if cuts is not None:
                out.append(("cut recall@5", cuts))
        else:
            out.append(("stopped at step", metrics.get("steps")))
    elif name == "siamese":
        out += [("pair accuracy", metrics.get("pair_accuracy")), ("1-NN", metrics.get("knn1_accuracy")),
                ("1-NN raw pixels", metrics.get("knn1_raw_pixels"))]
    elif name.startswith("ae-"):
        out += [("held-out MSE", metrics.get("test_mse")), ("1-NN", metrics.get("knn1_accuracy"))]
    elif name == "la":
        if "knn1_accuracy" in metrics:
            out += [("1-NN", metrics["knn1_accuracy"]), ("NMI", metrics.get("kmeans_nmi")),
                    ("1-NN raw pixels", metrics.get("knn1_accuracy_raw_pixels"))]
        elif metrics.get("loss_per_epoch"):
            out.append(("final loss (no labels)", metrics["loss_per_epoch"][-1]))
    if metrics.get("skipped_images"):
        out.append(("unreadable images skipped", len(metrics["skipped_images"])))
    return [(k, v) for k, v in out if v is not None]


def headline(metrics: dict) -> str:
    """``evaluation(metrics)`` on one line: ``1-NN 0.912, NMI 0.734``."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in evaluation(metrics))


def training_lines(training: dict) -> list[str]:
    """One summary line per trained model of ``trained()``: its name, training time and headline evaluation."""
    lines = []
    for name, r in training.items():
        took = "" if r.get("seconds") is None else f" in {r['seconds']:>5.0f} s"
        lines.append(f"  trained {name:<11}{took}  {headline(r['metrics'])}")
    return lines


def export_all(out: Path) -> dict:
    from export.__main__ import main as export_main

    t0 = step("export all")
    rc = export_main(["all", "--runs", str(out / "runs"), "--out", str(out / "models")])
    if rc:
        raise SystemExit(f"export failed with exit code {rc}")
    report = json.loads((out / "models" / "export_report.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "report": report}


def search_photos(out: Path) -> dict:
    from engine import Searcher
    from engine.search_cli import format_results, results_picture
    from train.data import photo_files

    t0 = step(f"search the embedded photos with models/{SEARCH_MODEL}.onnx")
    paths = [str(p) for p in photo_files()]
    searcher = Searcher.from_model(out / "models" / f"{SEARCH_MODEL}.onnx")
    ids = searcher.add_images(paths, ids=np.arange(len(paths)))
    queries = paths[::6]
    scores, hits = searcher.search_images(queries, k=K)
    index = out / "photos.idx"
    searcher.save(index)
    res = {"queries": queries, "scores": scores, "ids": hits, "paths": paths, "root": "/", "model": SEARCH_MODEL}
    picture = results_picture(res, out / "search.png")
    print(format_results(res))
    first_is_self = [int(h[0]) == paths.index(q) for q, h in zip(queries, hits)]
    return {"seconds": round(time.time() - t0, 1), "indexed": len(ids), "k": K, "index": str(index),
            "query_finds_itself_first": sum(first_is_self) / len(first_is_self),
            "queries": [{"photo": Path(q).name,
                         "hits": [{"photo": Path(paths[int(i)]).name, "score": round(float(s), 4)}
                                  for s, i in zip(srow, irow) if i >= 0]}
                        for q, srow, irow in zip(queries, scores, hits)],
            "picture": str(picture)}


def stream_video(out: Path) -> dict:
    from engine import stream
    from train.data import embedded_video

    video = embedded_video("bikes")
    t0 = step(f"stream {Path(video).name} through models/mpnn.onnx")
    rc = stream.main([str(video), "--model", str(out / "models" / "mpnn.onnx"), "--out", str(out / "stream")])
    if rc:
        raise SystemExit(f"streaming failed with exit code {rc}")
    report = json.loads((out / "stream" / "report.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "report": report}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"training": trained(out) if args.skip_training else train_all(out)}
    report["export"] = export_all(out)
    report["search"] = search_photos(out)
    report["stream"] = stream_video(out)
    report["seconds"] = round(time.time() - started, 1)

    from train.common import atomic_write_json

    atomic_write_json(out / "report.json", report)
    print(summary(report, out))
    return 0


def summary(report: dict, out: Path) -> str:
    lines = ["", f"== done in {report['seconds']:.0f} s; everything is under {out}/"]
    lines += training_lines(report["training"] or {})
    s = report["search"]
    lines.append(f"  search: {s['indexed']} photos indexed, top-{s['k']} results in {s['picture']}")
    st = report["stream"]["report"]
    lines.append(f"  stream: {st.get('frames')} frames at {st.get('fps', 0):.0f} frames/s, "
                 f"{len(st.get('transitions', []))} transitions, {len(st.get('shots', []))} shots")
    lines.append(f"  report: {out / 'report.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
