"""The command line: ``python -m engine.stream VIDEO --model MODEL --out FOLDER`` (``--help`` says the rest)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from engine.errors import InputError, LookalikeError
from engine.fileio import atomic_write, unwritable
from engine.stream.comparator import StreamComparator
from engine.stream.events import FrameScore, Shot, Transition
from engine.stream.options import add_flags, from_flags
from engine.stream.overlay import Overlay, check_display
from engine.stream.pipeline import frames_of
from engine.stream.report import build_report, timeline_png

EPILOG = """\
what it writes in OUT:
  report.json     frames (decoded) and frames_embedded (through the network: the gate skips the network
                  where nothing can change the answer; --every-frame embeds all), frames per second
                  processed (decode + embed + compare, end to end), seconds per stage (decode, preprocess,
                  gate, network, compare, write; summed over threads, which overlap), the options, every transition {type: cut|gradual, first, last, score, times} and every
                  shot {index, start, end, recurs_with: an earlier shot showing the same scene, or null};
                  frames_expected (the count the container lists) and decode_ended_early (true when the
                  decoder stopped before it: a truncated or damaged file, also warned about on stderr)
  timeline.png    per frame: similarity with the frame before and with the anchor (the published MPNN demo's
                  curve); cuts drawn as red lines, gradual transitions as orange bands
  annotated.mp4   with --annotate: the video with the two similarities and the events drawn on each frame
                  (mp4v codec)

SOURCE is a video file or a camera index (0, 1, ...). --show opens a window with the annotated frames (needs a
display; q or Esc stops). Frames are decided a few frames late (the lookahead the decisions need); the end
of the stream drains them. Files are written atomically (a temporary name, then renamed).

examples:
  python -m engine.stream video.mp4 --model models/mpnn.onnx --out runs/stream
  python -m engine.stream 0 --model models/mpnn.onnx --out runs/camera --max-frames 600 --show
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.stream",
        description="Compare the frames of a video as they stream: find cuts, dissolves and fades, and shots "
                    "that show the same scene again, with an exported image encoder (an MPNN).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="video file, or camera index (0, 1, ...)")
    p.add_argument("--model", required=True, help="exported encoder (.onnx from `python -m export mpnn`)")
    p.add_argument("--out", required=True, help="folder for report.json, timeline.png and annotated.mp4")
    p.add_argument("--annotate", action="store_true", help="also write annotated.mp4 (similarities drawn on frames)")
    p.add_argument("--show", action="store_true", help="show the annotated frames in a window (needs a display)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (a camera never ends)")
    p.add_argument("--workers", type=int, default=2,
                   help="batches embedded at once, each on its own thread (default: 2, one per core)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads per worker (default: 1 with several workers, else onnxruntime's own)")
    add_flags(p)  # the comparator's options the command line offers (StreamOptions)
    return p


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on the command line: one ``warning: ...`` line on stderr, without the source location."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from engine.encoder import Encoder

    out = Path(args.out)
    try:
        why = unwritable(out)
        if why is not None:
            raise InputError(f"--out {out}: {why}; expected a folder to write report.json and timeline.png into")
        if args.show:
            check_display()
        if args.max_frames is not None and args.max_frames < 1:
            raise InputError(f"--max-frames must be a positive int, got {args.max_frames}")
        if args.workers < 1:
            raise InputError(f"--workers must be a positive int, got {args.workers}")
        threads = args.threads if args.threads is not None else (1 if args.workers > 1 else None)
        encoder = Encoder(args.model, threads=threads, batch_size=max(1, args.batch_size))
        frames, rate, reader = frames_of(args.source, args.max_frames)
        out.mkdir(parents=True, exist_ok=True)
    except (LookalikeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overlay = Overlay(out / "annotated.mp4" if args.annotate else None, args.show, rate) \
        if args.annotate or args.show else None
    scores = {"index": [], "similarity": [], "anchor": [], "outlier": []}

    write = [0.0]  # seconds drawing and writing (annotated video, window, report, timeline)

    def on_score(s: FrameScore) -> None:
        scores["index"].append(s.index)
        scores["similarity"].append(round(s.similarity, 6))
        scores["anchor"].append(round(s.anchor_similarity, 6))
        scores["outlier"].append(s.outlier)
        if overlay is not None:
            t = time.perf_counter()
            overlay.on_score(s)
            write[0] += time.perf_counter() - t

    try:
        comp = StreamComparator(encoder, on_score=on_score, **from_flags(args))
    except LookalikeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    transitions: list[Transition] = []
    shots: list[Shot] = []
    ok = False
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning  # e.g. a damaged file's early end, from the decoding thread
            source = overlay.feed(frames) if overlay is not None else frames
            for ev in comp.run(source, fps=rate, prefetch=8 if overlay is not None else 32, workers=args.workers):
                if overlay is not None:
                    t = time.perf_counter()
                    overlay.on_event(ev)
                    write[0] += time.perf_counter() - t
                (transitions if isinstance(ev, Transition) else shots).append(ev)
                if isinstance(ev, Transition):
                    what = f"{ev.type} {ev.first}" + (f"-{ev.last}" if ev.last != ev.first else "")
                    print(f"{what} (score {ev.score:.3f})", flush=True)
        ok = True
    except (LookalikeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if overlay is not None:
            t = time.perf_counter()
            overlay.close(ok)
            write[0] += time.perf_counter() - t
    seconds = time.perf_counter() - t0
    t = time.perf_counter()
    n = int(comp.stats.get("frames", 0))
    title = (f"{Path(str(args.source)).name}: {len(transitions)} transitions, {len(shots)} shots, "
             f"{n} frames at {round(n / seconds, 2) if seconds > 0 else None} frames/s ({encoder.name})")
    png = timeline_png(scores, transitions, shots, title)
    atomic_write(out / "timeline.png", png)
    write[0] += time.perf_counter() - t
    report = build_report(source=args.source, model=args.model, encoder=encoder, comparator=comp, reader=reader,
                          seconds=seconds, video_fps=rate, workers=args.workers, threads=threads,
                          transitions=transitions, shots=shots, write_seconds=write[0])
    atomic_write(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    cuts = sum(t.type == "cut" for t in transitions)
    print(f"{n} frames in {seconds:.1f} s ({report['fps']} frames/s, {report['frames_embedded']} embedded): "
          f"{cuts} cuts, {len(transitions) - cuts} gradual, "
          f"{len(shots)} shots, {sum(s.recurs_with is not None for s in shots)} recurring; {out}/report.json")
    return 0
