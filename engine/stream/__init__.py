"""Streaming comparison of video frames: shot transitions (cuts, dissolves, fades) and recurring shots.

``StreamComparator`` takes frames one at a time (uint8 RGB (H, W, 3)), embeds them in small batches with an
image encoder (anything with ``encode(frames) -> (n, dim)`` unit rows and ``dim``; normally
``engine.Encoder`` on an exported MPNN) and compares each embedding with the ones before it::

    comparator = StreamComparator(Encoder("models/mpnn.onnx"))
    for t, frame in enumerate(frames):
        for event in comparator.process_frame(frame, t / fps):
            print(event)
    for event in comparator.flush():            # the end of the stream: drain what is still buffered
        print(event)

    events = detect("video.mp4", Encoder("models/mpnn.onnx"))       # the same in one call

It starts from the published MPNN demo: each frame is compared with an *anchor* (the first frame of the
current shot) on the embedding dimensions of highest variance over a window of recent frames, and a new
anchor is taken when that similarity falls low. Unlike the demo, memory is bounded (ring buffers of fixed
size; at most ``max_shots`` shot signatures), and the frames are turned into events:

- a **cut** is a frame much less similar to the frame before than its neighbours are to theirs (a spike of
  dissimilarity: ``cut_threshold`` and ``cut_ratio``) that also changes the picture in one step; when the
  content comes back within ``flash_frames`` frames it was a flash or an occlusion, and those frames are
  ignored as outliers;
- a **fade** is found by brightness: it falls steadily to near black and / or rises steadily from it (the
  dark frames in between belong to the transition);
- a **dissolve** is found where the mean embeddings of the ``gradual_window`` frames before and after a point
  differ, then checked on small colour thumbnails (a dissolve is a blend, frame = (1 - a) * P + a * Q): the
  straightest long stretch of thumbnails is taken, the content before and after it must differ by
  ``gradual_threshold`` (embeddings), its frames must lie near the blends of P and Q (``blend_residual``),
  blend the whole picture alike (``blend_spread``) and move from P to Q a little at a time
  (``smooth_ratio``). Camera pans and moving objects fail those tests;
- a **shot** runs from one transition to the next; when it ends, its signature (the mean embedding, pooled)
  is compared with those of earlier shots, and ``recurs_with`` names the earlier shot that shows the same
  scene again.

Transitions of either kind are ``gradual``. Events come out in order, each with a latency of a few frames (the lookahead the decisions need, plus the
batch); ``flush()`` ends the stream and resets the comparator for a new one.

Frame indices count from 0 in the order frames were given. A cut has ``first == last ==`` the first frame
of the new shot; a gradual transition spans its blended / darkened frames ``first..last``, which belong to
neither shot. Shots give inclusive ``start``/``end`` frames.

Command line (``python -m engine.stream --help``)::

    python -m engine.stream video.mp4 --out runs/stream [--model models/mpnn.onnx] [--save-images] [--split]
                                                        [--annotate] [--show]

The modules, one concern each: ``events`` (what is emitted), ``options`` (``StreamOptions``: defaults, checks,
command-line flags), ``frames`` (``PreparedFrame``, the ring buffers of recent frames), ``cuts``, ``fades``,
``dissolves`` (the three transition tests), ``comparator`` (``StreamComparator``: ingest, decide, emit, shots),
``pipeline`` (``run``'s decode and embed threads), ``cli``, ``report``, ``scenelist``, ``edl``, ``images``, ``html``,
``split`` and ``overlay`` (the command line and what it writes and draws). Videos are read with ``engine.video.VideoReader``.
"""

from importlib import import_module

# The public names load on first use (PEP 562), so ``python -m engine.stream --help`` imports none of numpy's
# users, OpenCV, onnxruntime, numba or matplotlib.
_PUBLIC = {
    "build_parser": "engine.stream.cli", "main": "engine.stream.cli",
    "StreamComparator": "engine.stream.comparator", "detect": "engine.stream.comparator",
    "TRANSITION_TYPES": "engine.stream.events", "Event": "engine.stream.events",
    "FrameScore": "engine.stream.events", "Shot": "engine.stream.events", "Transition": "engine.stream.events",
    "PreparedFrame": "engine.stream.frames",
    "OPTION_NAMES": "engine.stream.options", "StreamOptions": "engine.stream.options",
    "timeline_png": "engine.stream.report",
    "VideoReader": "engine.video",
}

__all__ = ["OPTION_NAMES", "TRANSITION_TYPES", "Event", "FrameScore", "PreparedFrame", "Shot", "StreamComparator",
           "StreamOptions", "Transition", "VideoReader", "build_parser", "detect", "main", "timeline_png"]


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine.stream' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
