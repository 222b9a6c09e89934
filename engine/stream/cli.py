"""The command line: ``python -m engine.stream VIDEO --out FOLDER`` (``--help`` says the rest).

Imports only the standard library and light modules of the engine until the arguments are parsed, so that
``--help`` answers at once: numpy's users, OpenCV, onnxruntime, numba and matplotlib load in ``main``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from engine.errors import InputError, LookalikeError
from engine.fileio import atomic_write, unwritable
from engine.stream.events import FrameScore, Shot, Transition
from engine.stream.options import add_flags, from_flags
from engine.stream.scenelist import transition_name

EPILOG = """\
what it writes in OUT (STEM: the video file's name without its extension):
  report.json       the model used (path, name, sha256; default: true when it is the packaged one), frames
                    (decoded) and frames_embedded (through the network: the gate skips the network where nothing
                    can change the answer; --every-frame embeds all), frames per second processed (decode + embed +
                    compare, end to end), seconds per stage (decode, preprocess, gate, network, compare, write;
                    summed over threads, which overlap), the options, every transition {type: cut|gradual, fade,
                    move (wipe, push, slide or null), first, last, score, times} and every shot {index, start, end
                    (both inclusive, 0-based), recurs_with: an earlier shot showing the same scene, or null};
                    frames_expected (the count the
                    container lists), decode_ended_early (true when the decoder stopped before it: a truncated or
                    damaged file, also warned about on stderr) and outputs (the files below)
  STEM-Scenes.csv   the shots in PySceneDetect's list-scenes layout and conventions (Start Frame counts from 1;
                    End Frame and End Timecode are exclusive as PySceneDetect's: End Frame = report.json's end + 1,
                    End Timecode = the time after the last frame), then five more columns: Transition
                    (cut, dissolve, fade, wipe, push or slide: how the shot begins), Transition Start / End
                    Frame, Recurs With Scene (the Scene Number of the earlier shot it shows again) and Recurrence
                    Score
  STEM.edl          the shots as a CMX 3600 edit decision list, one event per shot, non-drop-frame timecode at the
                    video's frame rate (out points exclusive, as in every EDL); not for a source without a rate
  timeline.png      per frame: the similarity to the previous frame and to the start of the shot (the published
                    MPNN demo's curve); cuts as red lines, dissolves as orange, wipes / pushes / slides as cyan and
                    fades as grey bands
  report.html       one self-contained page (pictures inlined, no requests): the timeline, and each shot with a
                    picture of its middle frame, its times, how it begins and the earlier shot it shows again
  STEM-Scene-001-01.jpg ...  with --save-images: --num-images pictures per shot (PySceneDetect's save-images
                    names and choice of frames)
  STEM-Scene-001.mp4 ...     with --split: one video per shot, exactly its frames (PySceneDetect's split-video
                    names); shots that are whole groups of key frames are stream-copied, the others re-encoded
                    (H.264), with the ffmpeg of the imageio-ffmpeg package
  annotated.mp4     with --annotate: the video with the two similarities and the events drawn on each frame
                    (mp4v codec)

Frames of a dissolve or fade belong to neither the shot before nor the one after. SOURCE is a video file or a
camera index (0, 1, ...); a camera gets no pictures and cannot be split (it cannot be read twice). --show opens
a window with the annotated frames (needs a display; q or Esc stops). Frames are decided a few frames late (the
lookahead the decisions need); the end of the stream drains them. A progress bar shows on stderr for files
whose frame count is known. Files are written atomically (a temporary name, then renamed).

examples:
  python -m engine.stream video.mp4 --out runs/stream
  python -m engine.stream video.mp4 --out runs/stream --save-images --split
  python -m engine.stream video.mp4 --model models/mpnn.onnx --out runs/stream --annotate
  python -m engine.stream 0 --out runs/camera --max-frames 600 --show
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.stream",
        description="Compare the frames of a video as they stream: find cuts, dissolves and fades, and shots "
                    "that show the same scene again, with an exported image encoder (an MPNN).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="video file, or camera index (0, 1, ...)")
    p.add_argument("--model", default=None,
                   help="exported encoder (.onnx from `python -m export mpnn`; default: the MPNN packaged with the "
                        "engine, engine/models/mpnn.onnx)")
    p.add_argument("--out", required=True, help="folder for what it writes (listed below)")
    p.add_argument("--save-images", action="store_true",
                   help="also save --num-images JPEG pictures of each shot (as PySceneDetect's save-images)")
    p.add_argument("--num-images", "-n", type=int, default=3,
                   help="pictures per shot with --save-images (default: 3, as PySceneDetect; 1: the middle frame)")
    p.add_argument("--frame-margin", "-m", type=int, default=1,
                   help="frames between a shot's first / last picture and its start / end (default: 1)")
    p.add_argument("--split", action="store_true",
                   help="also write one video file per shot (as PySceneDetect's split-video; needs imageio-ffmpeg)")
    p.add_argument("--annotate", action="store_true", help="also write annotated.mp4 (similarities drawn on frames)")
    p.add_argument("--show", action="store_true", help="show the annotated frames in a window (needs a display)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (a camera never ends)")
    p.add_argument("--workers", type=int, default=2,
                   help="batches embedded at once, each on its own thread (default: 2, one per core)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads per worker (default: 1 with several workers, else onnxruntime's own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_flags(p)  # the comparator's options the command line offers (StreamOptions)
    return p


class _Console:
    """Lines for stdout and stderr that do not tear the progress bar (written through tqdm while one shows)."""

    def __init__(self):
        self.bar = None

    def say(self, line: str, *, err: bool = False) -> None:
        file = sys.stderr if err else sys.stdout
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=file)
            file.flush()
        else:
            print(line, file=file, flush=True)

    def warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """A warning on the command line: one ``warning: ...`` line on stderr, without the source location."""
        self.say(f"warning: {message}", err=True)


def _bar(total: int | None, desc: str, *, off: bool, leave: bool = True, unit: str = "frame"):
    """A tqdm bar on stderr over ``total`` items, or None (no total: a camera; or --no-progress)."""
    if off or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=leave)


def _stem(source) -> str:
    from engine.video import camera_index

    cam = camera_index(source)
    return f"camera{cam}" if cam is not None else (Path(str(source)).stem or "video")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # the heavy modules (numpy, OpenCV, onnxruntime, numba, matplotlib) only now: --help stays fast
    from engine.default_models import default_model
    from engine.encoder import Encoder
    from engine.stream.comparator import StreamComparator
    from engine.stream.overlay import Overlay, check_display
    from engine.stream.pipeline import frames_of
    from engine.stream.report import build_report
    from engine.video import camera_index

    out = Path(args.out)
    console = _Console()
    camera = camera_index(args.source) is not None
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
        if args.num_images < 1:
            raise InputError(f"--num-images must be a positive int, got {args.num_images}")
        if args.frame_margin < 0:
            raise InputError(f"--frame-margin must be a non-negative int, got {args.frame_margin}")
        for flag, on in (("--save-images", args.save_images), ("--split", args.split)):
            if on and camera:
                raise InputError(f"{flag} needs a video file (it reads the file a second time), got camera "
                                 f"{args.source}")
        if args.split:
            from engine.stream.split import ffmpeg_exe

            ffmpeg_exe()  # absent: said now, not after the whole video
        model_default = args.model is None
        model = default_model("video") if model_default else Path(args.model)
        threads = args.threads if args.threads is not None else (1 if args.workers > 1 else None)
        encoder = Encoder(model, threads=threads, batch_size=max(1, args.batch_size))
        console.say(f"model: {model} ({encoder.describe}"
                    + (", the packaged default video model)" if model_default else ")"), err=True)
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
        if console.bar is not None:
            console.bar.update(1)
        if overlay is not None:
            t = time.perf_counter()
            overlay.on_score(s)
            write[0] += time.perf_counter() - t

    try:
        comp = StreamComparator(encoder, on_score=on_score, **from_flags(args))
    except LookalikeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = None if reader is None or reader.frame_count is None else \
        min(reader.frame_count, args.max_frames or reader.frame_count)
    transitions: list[Transition] = []
    shots: list[Shot] = []
    ok = False
    t0 = time.perf_counter()
    console.bar = _bar(total, f"stream ({encoder.name})", off=args.no_progress)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = console.warning  # e.g. a damaged file's early end, from the decoding thread
            source = overlay.feed(frames) if overlay is not None else frames
            for ev in comp.run(source, fps=rate, prefetch=8 if overlay is not None else 32, workers=args.workers):
                if overlay is not None:
                    t = time.perf_counter()
                    overlay.on_event(ev)
                    write[0] += time.perf_counter() - t
                (transitions if isinstance(ev, Transition) else shots).append(ev)
                if isinstance(ev, Transition):
                    what = f"{ev.type} {ev.first}" + (f"-{ev.last}" if ev.last != ev.first else "")
                    console.say(f"{what} (score {ev.score:.3f})")
        ok = True
    except (LookalikeError, OSError) as e:
        console.say(f"error: {e}", err=True)
        return 2
    finally:
        if console.bar is not None:
            console.bar.close()
            console.bar = None
        if overlay is not None:
            t = time.perf_counter()
            overlay.close(ok)
            write[0] += time.perf_counter() - t
    seconds = time.perf_counter() - t0
    t = time.perf_counter()
    n = int(comp.stats.get("frames", 0))
    title = (f"{Path(str(args.source)).name}: {len(transitions)} transitions, {len(shots)} shots, "
             f"{n} frames at {round(n / seconds, 2) if seconds > 0 else None} frames/s ({encoder.name})")
    outputs: dict = {"timeline": "timeline.png", "annotated": "annotated.mp4" if args.annotate else None}
    failed = None
    try:
        _write_outputs(args, out, _stem(args.source), camera, rate, reader, n, title, scores, transitions, shots,
                       encoder, model, model_default, seconds, outputs)
    except (LookalikeError, OSError) as e:
        failed = e
    write[0] += time.perf_counter() - t
    report = build_report(source=args.source, model=model, encoder=encoder, comparator=comp, reader=reader,
                          seconds=seconds, video_fps=rate, workers=args.workers, threads=threads,
                          transitions=transitions, shots=shots, write_seconds=write[0], model_default=model_default,
                          outputs=outputs)
    atomic_write(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    if failed is not None:
        print(f"error: {failed}", file=sys.stderr)
        return 2
    cuts = sum(t.type == "cut" for t in transitions)
    print(f"{n} frames in {seconds:.1f} s ({report['fps']} frames/s, {report['frames_embedded']} embedded): "
          f"{cuts} cuts, {len(transitions) - cuts} gradual, "
          f"{len(shots)} shots, {sum(s.recurs_with is not None for s in shots)} recurring; {out}/report.json")
    return 0


def _write_outputs(args, out: Path, stem: str, camera: bool, rate, reader, n: int, title: str, scores: dict,
                   transitions: list, shots: list, encoder, model, model_default: bool, seconds: float,
                   outputs: dict) -> None:
    """Write everything but report.json (which lists what this wrote, in ``outputs``)."""
    from engine.stream.edl import edl_text
    from engine.stream.html import report_html
    from engine.stream.images import pictures
    from engine.stream.report import timeline_png
    from engine.stream.scenelist import scene_list_csv, scene_list_name

    png = timeline_png(scores, transitions, shots, title)
    atomic_write(out / "timeline.png", png)
    name = scene_list_name(stem)
    atomic_write(out / name, scene_list_csv(shots, transitions, rate))
    outputs["scene_list"] = name
    if rate:
        atomic_write(out / f"{stem}.edl", edl_text(shots, transitions, rate, title=stem,
                                                    clip=Path(str(args.source)).name))
        outputs["edl"] = f"{stem}.edl"
    else:
        outputs["edl"] = None
        print(f"warning: {args.source} gives no frame rate: no {stem}.edl (an EDL's timecodes need one)",
              file=sys.stderr)
    thumbs: dict = {}
    note = ""
    if camera:
        note = "No pictures: a camera cannot be read a second time."
    elif shots:
        last = max(sh.end for sh in shots) + 1
        bar = _bar(last, "pictures", off=args.no_progress, leave=False)
        try:
            images, thumbs = pictures(str(args.source), shots, out, stem, save=args.save_images,
                                      num_images=args.num_images, frame_margin=args.frame_margin,
                                      progress=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
        if args.save_images:
            outputs["images"] = images
    recurring = sum(s.recurs_with is not None for s in shots)
    kinds = [transition_name(t) for t in transitions]
    summary = {
        "video": str(args.source),
        "frames": f"{n}" + (f" at {rate:g} frames/s ({n / rate:.2f} s)" if rate else ""),
        "model": f"{model} ({encoder.name}" + (", the packaged default)" if model_default else ")"),
        "transitions": ", ".join(f"{kinds.count(k)} {k}{'s' if kinds.count(k) != 1 else ''}"
                                 for k in ("cut", "dissolve", "fade")),
        "shots": f"{len(shots)}, {recurring} showing an earlier shot again",
        "processed": f"{n / seconds:.1f} frames/s" if seconds > 0 else "",
    }
    atomic_write(out / "report.html", report_html(title=f"lookalike: {Path(str(args.source)).name}",
                                                  summary=summary, shots=shots, transitions=transitions, fps=rate,
                                                  timeline_png=png, thumbnails=thumbs, note=note))
    outputs["html"] = "report.html"
    if args.split:
        from engine.stream.split import split

        bar = _bar(len(shots), "split", off=args.no_progress, leave=False, unit="shot")
        try:
            outputs["split"] = split(str(args.source), shots, out, stem, fps=rate,
                                     frame_count=None if reader is None else reader.frame_count,
                                     progress=None if bar is None else bar.update)
        finally:
            if bar is not None:
                bar.close()
