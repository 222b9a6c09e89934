"""What ``python -m engine.stream`` writes: report.json's contents and the similarity timeline (PNG); the other
outputs are in ``scenelist``, ``edl``, ``images``, ``html`` and ``split``."""

from __future__ import annotations

import numpy as np

from engine.stream.events import Shot, Transition
from engine.stream.scenelist import transition_name

COLOURS = {"cut": "red", "dissolve": "orange", "fade": "dimgray", "wipe": "tab:cyan", "push": "tab:cyan",
           "slide": "tab:cyan"}  # timeline.png


def timeline_png(scores: dict, transitions: list[Transition], shots: list[Shot], title: str) -> bytes:
    """The similarity timeline as PNG bytes: per frame, the similarity to the previous frame and to the start of
    the shot (the published MPNN demo's anchor curve); cuts as red lines, dissolves as orange bands, wipes /
    pushes / slides as cyan bands, fades as grey bands; a shot that shows an earlier one again is marked ``shot N again`` (N counting shots from 1, as
    the scene list does)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.asarray(scores["index"])
    fig, ax = plt.subplots(figsize=(12, 4))
    kinds = set()
    for tr in transitions:
        kind = transition_name(tr)
        kinds.add(kind)
        if kind == "cut":
            ax.axvline(tr.first, color=COLOURS["cut"], lw=1.2, alpha=0.8)
        else:
            ax.axvspan(tr.first - 0.5, tr.last + 0.5, color=COLOURS[kind], alpha=0.35, lw=0)
    ax.plot(idx, scores["similarity"], lw=1, color="tab:green", label="similarity to the previous frame")
    ax.plot(idx, scores["anchor"], lw=1, color="tab:blue", label="similarity to the start of the shot")
    flashes = idx[np.asarray(scores["outlier"], bool)] if len(idx) else idx
    if len(flashes):
        ax.plot(flashes, np.ones(len(flashes)), "x", color="purple", ms=4, label="flash frames (ignored)")
    for sh in shots:
        if sh.recurs_with is not None:
            ax.annotate(f"shot {sh.recurs_with + 1} again", ((sh.start + sh.end) / 2, 1.02), ha="center", fontsize=7,
                        xycoords=("data", "axes fraction"))
    ax.plot([], [], color=COLOURS["cut"], label="cut")
    for kind in ("dissolve", "fade", "wipe", "push", "slide"):
        if kind in kinds:
            ax.fill_between([], [], [], color=COLOURS[kind], alpha=0.35, label=kind)
    ax.set_xlabel("frame")
    ax.set_ylabel("cosine similarity")
    lo = min([0.0] + [float(v) for v in scores["similarity"]] + [float(v) for v in scores["anchor"]])
    ax.set_ylim(lo - 0.05, 1.05)
    ax.set_xlim(-1, max(1, len(idx)))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=7, ncol=3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def build_report(*, source, model, encoder, comparator, reader, seconds: float, video_fps: float | None,
                 workers: int, threads: int | None, transitions: list[Transition], shots: list[Shot],
                 write_seconds: float = 0.0, model_default: bool = False, outputs: dict | None = None) -> dict:
    """report.json's contents for a finished run of ``comparator`` (``reader``: the video's, or None;
    ``write_seconds``: what drawing and writing the outputs took; ``model_default``: ``model`` is the packaged
    default model; ``outputs``: the other files written, by kind)."""
    stats = comparator.stats
    n = int(stats.get("frames", 0))
    stages = {k[: -len("_seconds")]: round(float(v), 3) for k, v in stats.items() if k.endswith("_seconds")}
    stages["write"] = round(float(write_seconds), 3)
    return {
        "source": str(source),
        "model": {"path": str(model), "name": encoder.name, "dim": encoder.dim, "similar": encoder.similar,
                  "sha256": encoder.sha256,
                  "providers": encoder.providers, "default": bool(model_default)},
        "frames": n,  # decoded
        "frames_embedded": int(stats.get("frames_embedded", 0)),  # through the network (the gate skips the rest)
        "frames_expected": None if reader is None else reader.frame_count,  # what the container lists
        "decode_ended_early": reader is not None and reader.ended_early,  # the decoder stopped before: damaged
        "seconds": round(seconds, 3),
        "fps": round(n / seconds, 2) if seconds > 0 else None,
        # seconds per stage, summed over threads (decode and preprocess run on one, the network on the workers)
        "stage_seconds": stages,
        "video_fps": video_fps,
        "latency_frames": comparator.latency + (workers - 1) * comparator.options.batch_size,
        "workers": workers,
        "onnxruntime_threads": threads,
        "options": comparator.options.to_dict(),
        "transitions": [t.to_dict() for t in transitions],
        "shots": [s.to_dict() for s in shots],  # start and end both inclusive (the scene list's End Frame is end + 1)
        "outputs": outputs or {},
    }
