"""``lookalike``: one command for the whole project; each subcommand runs the code of its ``python -m`` twin.

    lookalike index PHOTOS --model models/la.onnx --index photos.idx   # python -m engine.search index ...
    lookalike query IMAGE... --index photos.idx                        # python -m engine.search query ...
    lookalike dups PHOTOS ...                                          # python -m engine.search dups ...
    lookalike stream VIDEO ...                                         # python -m engine.stream VIDEO ...
    lookalike train la --data photos                                   # python -m train.la ...   ([train] extra)
    lookalike export all                                               # python -m export all     ([train] extra)
    lookalike scale index PHOTOS --out emb                             # python -m engine.scale ... ([scale] extra)

Everything after the subcommand goes to the twin untouched: its options, its ``--help``, its errors and its exit
status are the twin's. This module imports nothing heavy itself, so ``lookalike --help`` answers at once; the
twins read their command line before they load torch, onnxruntime or OpenCV.
"""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from dataclasses import dataclass

TRAINERS = ("la", "ae", "mpnn", "siamese")
TRAIN_EXTRA = "pip install 'lookalike[train]'"
SCALE_EXTRA = "pip install 'lookalike[scale]'"


@dataclass(frozen=True)
class Command:
    usage: str  # the command with its main argument, as the overview lists it
    help: str  # one line for the overview
    twin: str  # the python -m command that does the same
    needs: tuple[str, ...] = ()  # top-level packages of an extra it cannot run without
    extra: str = "training"  # that extra: "training" ([train]) or "scale" ([scale])


COMMANDS = {
    "index": Command("index DIR", "embed every image under DIR and write a search index",
                     "python -m engine.search index"),
    "query": Command("query IMAGE...", "find the indexed images most similar to query images",
                     "python -m engine.search query"),
    "dups": Command("dups DIR", "find near-duplicate images under DIR", "python -m engine.search dups"),
    "stream": Command("stream VIDEO", "cuts, dissolves, fades and recurring shots of a video or camera",
                      "python -m engine.stream"),
    "train": Command("train MODEL", f"train an encoder without labels: {', '.join(TRAINERS)} ([train] extra)",
                     "python -m train.MODEL", needs=("torch", "torchvision")),
    "export": Command("export NAME...", "export trained runs to ONNX files the engine runs ([train] extra)",
                      "python -m export", needs=("torch", "onnx")),
    "scale": Command("scale index|shard", "embed a collection with Ray, split it into shards ([scale] extra)",
                     "python -m engine.scale", needs=("ray", "pyarrow"), extra="scale"),
}


def build_parser() -> argparse.ArgumentParser:
    """The overview only: the subcommands' own options belong to their twins."""
    width = max(len(c.usage) for c in COMMANDS.values())
    listing = "\n".join(f"  {c.usage:<{width}}  {c.help}" for c in COMMANDS.values())
    twins = "\n".join(f"  lookalike {name:<7} = {c.twin}" for name, c in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="lookalike", usage="lookalike COMMAND [ARGS...]",
        description="Search images and compare video frames with ONNX encoders; train and export your own.",
        epilog=f"commands:\n{listing}\n\n'lookalike COMMAND --help' shows a command's own options. Each command "
               f"runs the same code as its python -m twin:\n{twins}\n\ntrain and export need the training "
               f"extra: {TRAIN_EXTRA}; scale needs the scale extra (Ray): {SCALE_EXTRA}",
        formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if not argv:
        parser.error(f"expected a command: {', '.join(COMMANDS)}")
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}")
    missing = [m for m in COMMANDS[name].needs if importlib.util.find_spec(m) is None]
    if missing:
        command = COMMANDS[name]
        how = SCALE_EXTRA if command.extra == "scale" else TRAIN_EXTRA
        print(f"error: lookalike {name} needs the {command.extra} extra, which is not installed (no "
              f"{', '.join(missing)} here): {how}", file=sys.stderr)
        return 2
    if name in ("index", "query", "dups"):
        from engine.search_cli import main as search_main

        return search_main([name, *rest])
    if name == "stream":
        from engine.stream.cli import main as stream_main

        return stream_main(rest)
    if name == "export":
        return _run_module("export", rest)
    if name == "scale":
        return _run_module("engine.scale", rest)
    return _train(parser, rest)


def _train(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        out = sys.stdout if argv else sys.stderr
        print(f"usage: lookalike train {{{','.join(TRAINERS)}}} [OPTIONS...]\n\n"
              f"Train an encoder without labels; 'lookalike train MODEL --help' shows the trainer's options.\n"
              f"  la        Local Aggregation encoder (python -m train.la)\n"
              f"  ae        autoencoder, conv or vgg16bn (python -m train.ae)\n"
              f"  mpnn      multi-perspective network for video frames (python -m train.mpnn)\n"
              f"  siamese   Siamese pair network on labelled images (python -m train.siamese)", file=out)
        if not argv:
            parser.exit(2, f"lookalike: error: expected a model to train: {', '.join(TRAINERS)}\n")
        return 0
    model, rest = argv[0], argv[1:]
    if model not in TRAINERS:
        parser.error(f"unknown model {model!r} for train; expected one of {', '.join(TRAINERS)}")
    return _run_module(f"train.{model}", rest)


def _run_module(module: str, argv: list[str]) -> int:
    """Run ``module`` exactly as ``python -m module *argv`` does: it reads its command line before it imports
    torch (``--help`` stays fast), and its exit status (``SystemExit``) passes through."""
    saved = sys.argv
    sys.argv = [module, *argv]  # runpy sets argv[0] to the module's file, as python -m does
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
