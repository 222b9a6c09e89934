"""python -m export: trained runs -> ONNX files with preprocessing metadata, checked against torch."""

from __future__ import annotations

import argparse
import sys

from export.options import DEFAULT_OPSET, EXPORTERS, MIN_OPSET, TOLERANCE
from train.checkpoint import CheckpointError
from train.registry import MODEL_NAMES

EPILOG = f"""\
what it writes, for each NAME (a run folder RUNS/NAME/ holding checkpoint.pt; a folder named after a model
must hold that model's checkpoint):
  OUT/NAME.onnx        the encoder only (no decoder), dynamic batch axis, input "images" (n, 3, H, W) float32,
                       output "embeddings" (n, dim) L2-normalised float32; its metadata carries the model name,
                       architecture, embedding size, input size, preprocessing (resize/crop, mean/std, colour
                       order, grayscale), a format version, the sha256 of the source checkpoint, whether
                       the run is complete, and the file's own sha256 (the engine refuses a damaged or
                       edited file)
  OUT/NAME.fp16.onnx   with --fp16: float16 weights and arithmetic, float32 inputs and outputs
  OUT/NAME.int8.onnx   with --int8: static int8 quantisation calibrated on real images
  OUT/export_report.json   measured differences (float32 vs torch; variants vs float32, with overlap@10)

checks: every file passes onnx.checker (full_check) and onnxruntime is compared with torch on real images
(the fungi photos of ../shared/data when present, else photographs and video frames embedded in installed
packages); a float32 export that differs by more than --tolerance writes nothing and fails. A run that stopped
before the end of its training (--max-steps, a signal) is refused unless --allow-incomplete is given.

model names: {", ".join(MODEL_NAMES)}

examples:
  python -m export all                    # every runs/*/checkpoint.pt -> models/*.onnx
  python -m export la mpnn --fp16 --int8  # two models, with their fp16 and int8 variants
  python -m export all --runs /data/runs --out /srv/models
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export trained lookalike encoders to ONNX files the engine runs without torch.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="'all' (every trained run under --runs) or run names such as la, mpnn, ae-conv")
    p.add_argument("--runs", default="runs", help="folder of run folders, each with checkpoint.pt (default: runs/)")
    p.add_argument("--out", default="models", help="where the .onnx files and export_report.json go (default: models/)")
    p.add_argument("--fp16", action="store_true", help="also write NAME.fp16.onnx (float16) and measure it")
    p.add_argument("--int8", action="store_true", help="also write NAME.int8.onnx (int8, calibrated on real images)")
    p.add_argument("--check-images", type=int, default=64, metavar="N",
                   help="real images used by the checks (half for int8 calibration when --int8; default: 64)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"max abs difference allowed between onnxruntime and torch (default: {TOLERANCE:g})")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} up to the newest the installed onnx and torch exporter write "
                        f"(default: {DEFAULT_OPSET})")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="also export a run that stopped before the end of its training (--max-steps, a signal); "
                        "the file records it and the engine warns when it loads it (default: refuse such a run)")
    p.add_argument("--exporter", default="auto", choices=EXPORTERS,
                   help="torch exporter: auto tries TorchScript, then dynamo (dynamo alone for an opset newer than "
                        "the TorchScript exporter writes; default: auto)")
    return p


if __name__ == "__main__":  # python -m export: --help and argument errors answer here, before the machinery loads
    build_parser().parse_args()

# the export machinery (OpenCV, numba; torch, onnx and onnxruntime as it works), imported once the command line
# has been read
from export.onnx import ExportError, cannot_write, export_many  # noqa: E402


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_images < 2:
        print(f"error: --check-images must be at least 2, got {args.check_images}", file=sys.stderr)
        return 2
    variants = tuple(v for v, on in (("fp16", args.fp16), ("int8", args.int8)) if on)
    try:
        report, errors = export_many(args.names, runs_dir=args.runs, out_dir=args.out, variants=variants,
                                     check_images=args.check_images, opset=args.opset, tolerance=args.tolerance,
                                     exporter=args.exporter, allow_incomplete=args.allow_incomplete)
    except (ExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # export_many lists each model's write failure: this is the rest, without a traceback
        print(f"error: {cannot_write(e, args.out)}", file=sys.stderr)
        return 2
    if report:
        print(f"report: {args.out}/export_report.json")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
