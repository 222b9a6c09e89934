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

    python -m engine.stream video.mp4 --model models/mpnn.onnx --out runs/stream [--annotate] [--show]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.errors import InputError, LookalikeError, VideoOpenError
from engine.fileio import atomic_write, unwritable
from engine.kernels.topk import blas_single_thread

TRANSITION_TYPES = ("cut", "gradual")
OPTION_NAMES = ("window", "top_dims", "refresh", "cut_threshold", "cut_ratio", "flash_frames", "gradual_window",
                "gradual_threshold", "straightness", "blend_residual", "blend_spread", "smooth_ratio", "max_gradual",
                "dark_threshold", "anchor_threshold", "min_gap", "recur_threshold", "max_shots", "signature_dim",
                "thumb_size", "batch_size")

# ---------------------------------------------------------------------------------------------------------------
# events


@dataclass(frozen=True)
class Event:
    """Base class of what a ``StreamComparator`` emits: a ``Transition`` or a ``Shot``."""

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind
        return d


@dataclass(frozen=True)
class Transition(Event):
    type: str  # "cut" (hard cut) or "gradual" (dissolve or fade)
    first: int  # first frame of the transition (for a cut: the first frame of the new shot)
    last: int  # last frame of the transition (== first for a cut)
    score: float  # dissimilarity across it, 1 - cosine between the content before and after (0..2)
    start_time: float | None = None  # timestamp of ``first`` when the frames came with timestamps
    end_time: float | None = None  # timestamp of ``last``
    fade: bool = False  # a gradual transition found by brightness (through black), not a dissolve


@dataclass(frozen=True)
class Shot(Event):
    index: int  # 0-based number of the shot in the stream
    start: int  # first frame
    end: int  # last frame (inclusive)
    recurs_with: int | None = None  # index of an earlier shot that shows the same scene, if any
    recurrence_score: float | None = None  # cosine between the two shots' signatures
    start_time: float | None = None
    end_time: float | None = None


@dataclass(frozen=True)
class FrameScore:
    """What the comparator measured on one frame (given to ``on_score`` once the frame is decided)."""

    index: int
    time: float | None
    similarity: float  # cosine with the frame before (on the selected dimensions); 1.0 for the first frame
    anchor_similarity: float  # cosine with the current anchor (the published demo's curve)
    gradual: float  # dissimilarity of the mean embeddings of the windows before and after this frame
    outlier: bool  # ignored as part of a flash / occlusion


# ---------------------------------------------------------------------------------------------------------------
# ring buffers


class _Ring:
    """The last ``capacity`` rows of a stream, addressed by absolute index (older rows are gone)."""

    def __init__(self, capacity: int, shape: tuple = (), dtype=np.float32, fill=0):
        self.capacity = int(capacity)
        self.data = np.full((self.capacity, *shape), fill, dtype=dtype)
        self.end = 0  # absolute index of the next row

    @property
    def start(self) -> int:
        return max(0, self.end - self.capacity)

    def append(self, row) -> int:
        self.data[self.end % self.capacity] = row
        self.end += 1
        return self.end - 1

    def _bad(self, lo, hi) -> IndexError:
        return IndexError(f"ring holds rows {self.start}..{self.end - 1}, asked for {lo}..{hi}")

    def __getitem__(self, i: int):
        if i < self.end - self.capacity or i < 0 or i >= self.end:
            raise self._bad(i, i)
        return self.data[i % self.capacity]

    def __setitem__(self, i: int, value) -> None:
        if i < self.end - self.capacity or i < 0 or i >= self.end:
            raise self._bad(i, i)
        self.data[i % self.capacity] = value

    def take(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return self.data[:0]
        lo, hi = int(idx.min()), int(idx.max())
        if lo < self.start or hi >= self.end:
            raise self._bad(lo, hi)
        return self.data[idx % self.capacity]

    def reset(self) -> None:
        self.end = 0


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on one BLAS thread. These products are small (thumbnails of one transition's frames); a
    multi-threaded one would leave OpenBLAS's helper thread spinning for a while after it returns, on the core
    the network's workers need (bikes.mp4 streamed at 201-210 frames/s that way, 239-250 without it). The limit
    is process-wide for the product's duration (microseconds), as in ``Searcher``'s worker mode."""
    with blas_single_thread():
        return a @ b


def _steady(step: float, steps: list) -> bool:
    """A brightness step that continues a fade: positive, and not much smaller than the fade's steps so far."""
    return step > 0.25 and (not steps or step >= 0.3 * float(np.median(steps)))


def _pool_edges(dim: int, signature_dim: int) -> np.ndarray | None:
    """Where the blocks of dimensions averaged into a shot signature start (None: the embedding as it is)."""
    if dim <= signature_dim:
        return None
    return np.linspace(0, dim, signature_dim + 1).round().astype(np.int64)[:-1]


def _pool(x: np.ndarray, edges) -> np.ndarray:
    """(n, dim) -> (n, signature_dim): each signature entry is the sum of a block of consecutive dimensions."""
    return np.asarray(x, np.float32) if edges is None else np.add.reduceat(x, edges, axis=1).astype(np.float32)


def _block_spread(X: np.ndarray, D: np.ndarray, blocks: int) -> float:
    """How unevenly a frame blends P and Q over its picture: weighted interquartile range of per-block blends.

    ``X`` is the frame minus P and ``D`` is Q minus P, both (s, s, 3) thumbnails cut into ``blocks`` x
    ``blocks`` tiles; each tile's blend is ``<x, d> / <d, d>``, weighted by ``<d, d>``. A dissolve blends every
    tile alike (spread near 0); motion changes some tiles fully and others not yet.
    """
    s = X.shape[0]
    edges = np.linspace(0, s, blocks + 1).round().astype(np.int64)
    alpha, weight = [], []
    for i in range(blocks):
        for j in range(blocks):
            d = D[edges[i] : edges[i + 1], edges[j] : edges[j + 1]].ravel()
            dd = float(d @ d)
            if dd > 0:
                x = X[edges[i] : edges[i + 1], edges[j] : edges[j + 1]].ravel()
                alpha.append(float(x @ d) / dd)
                weight.append(dd)
    if not alpha:
        return 0.0
    alpha, weight = np.asarray(alpha), np.asarray(weight)
    order = np.argsort(alpha)
    cw = np.cumsum(weight[order]) / weight.sum()
    q1 = alpha[order][min(len(cw) - 1, int(np.searchsorted(cw, 0.25)))]
    q3 = alpha[order][min(len(cw) - 1, int(np.searchsorted(cw, 0.75)))]
    return float(q3 - q1)


# ---------------------------------------------------------------------------------------------------------------
# the comparator


class StreamComparator:
    """Compare the frames of a stream with an image encoder; emit shot transitions and shots as they are found.

    Options (keyword-only; the defaults suit an MPNN at 224 px on ordinary footage):

    - ``window``: recent frames over which each embedding dimension's variance is measured.
    - ``top_dims``: the similarities use this many highest-variance dimensions (the published demo's
      choice; None: all), chosen again every ``refresh`` frames.
    - ``cut_threshold``: a cut needs a dissimilarity (1 - cosine) with the frame before of at least this...
    - ``cut_ratio``: ...and this many times the dissimilarity typical of the neighbouring frames.
    - ``flash_frames``: content that comes back within this many frames was a flash, not a cut.
    - ``gradual_window``: frames averaged on each side of a point to find where content changes gradually.
    - ``gradual_threshold``: the least dissimilarity between the content before and after a dissolve.
    - ``straightness``: a dissolve moves the picture in a straight line from P (before) to Q (after): the
      distance covered over the path length travelled (in thumbnail space) must reach this.
    - ``blend_residual``: how far (relative to |Q - P|) the frames of a dissolve may lie from the blends of P
      and Q; motion and pans leave the line.
    - ``blend_spread``: how unevenly (interquartile range of per-tile blends) a dissolve may blend the picture.
    - ``smooth_ratio``: the largest share of the P-to-Q change one frame step may carry in a dissolve.
    - ``max_gradual``: the longest transition, in frames.
    - ``dark_threshold``: mean brightness (0..255) at or below which a frame is black (fades).
    - ``anchor_threshold``: the published demo's rule: below this similarity to the anchor, a new anchor.
    - ``min_gap``: frames at least between a transition and the next (a closer one is dropped).
    - ``recur_threshold``: cosine between two shots' signatures (after removing the stream's mean) from which
      the later shot recurs with the earlier.
    - ``max_shots``: shot signatures kept for recurrence (the oldest are forgotten).
    - ``signature_dim``: entries in a shot signature (the mean embedding, pooled in blocks when larger).
    - ``thumb_size``: side of the small colour thumbnails kept per frame to tell dissolves from motion.
    - ``batch_size``: frames embedded together (default 2: end to end with 2 workers on the 2-core reference
      machine, median frames/s at batch 1 / 2 / 4 were 218 / 222 / 217 on mixed.mp4 and 201 / 209 / 210 on
      bikes.mp4; larger batches' activations fall out of the cache).
    - ``on_score``: called with a ``FrameScore`` for every frame once it is decided (timelines, overlays).
    """

    def __init__(self, encoder, *, window: int = 64, top_dims: int | None = 4096, refresh: int = 16,
                 cut_threshold: float = 0.2, cut_ratio: float = 2.5, flash_frames: int = 4,
                 gradual_window: int = 8, gradual_threshold: float = 0.3, straightness: float = 0.3,
                 blend_residual: float = 0.3, blend_spread: float = 0.4, smooth_ratio: float = 0.25,
                 max_gradual: int = 40, dark_threshold: float = 24.0, anchor_threshold: float = 0.5,
                 min_gap: int = 8, recur_threshold: float = 0.4, max_shots: int = 256, signature_dim: int = 1024,
                 thumb_size: int = 32, batch_size: int = 2, on_score: Callable[[FrameScore], None] | None = None):
        if not hasattr(encoder, "encode") or not hasattr(encoder, "dim"):
            raise InputError(f"encoder must have encode(frames) and dim (an engine.Encoder), got {type(encoder).__name__}")
        self.encoder = encoder
        self.dim = int(encoder.dim)
        ints = {"window": window, "refresh": refresh, "flash_frames": flash_frames, "gradual_window": gradual_window,
                "max_gradual": max_gradual, "min_gap": min_gap, "max_shots": max_shots,
                "signature_dim": signature_dim, "thumb_size": thumb_size, "batch_size": batch_size}
        for name, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{name} must be a positive int, got {v!r}")
        if window < 2 or gradual_window < 2 or thumb_size < 4:
            raise InputError(f"window and gradual_window must be >= 2 frames and thumb_size >= 4 pixels, got "
                             f"{window}, {gradual_window}, {thumb_size}")
        if top_dims is not None and (isinstance(top_dims, bool) or not isinstance(top_dims, (int, np.integer))
                                     or top_dims < 1):
            raise InputError(f"top_dims must be a positive int or None, got {top_dims!r}")
        for name, v, lo, hi in (("cut_threshold", cut_threshold, 0.0, 2.0), ("cut_ratio", cut_ratio, 1.0, 1e9),
                                ("gradual_threshold", gradual_threshold, 0.0, 2.0),
                                ("straightness", straightness, 0.0, 1.0), ("blend_residual", blend_residual, 0.0, 10.0),
                                ("blend_spread", blend_spread, 0.0, 10.0), ("smooth_ratio", smooth_ratio, 0.0, 1.0),
                                ("dark_threshold", dark_threshold, 0.0, 255.0),
                                ("anchor_threshold", anchor_threshold, -1.0, 1.0),
                                ("recur_threshold", recur_threshold, -1.0, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not lo <= float(v) <= hi:
                raise InputError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
        self.window = int(window)
        self.top_dims = None if top_dims is None or top_dims >= self.dim else int(top_dims)
        self.refresh = int(refresh)
        self.cut_threshold = float(cut_threshold)
        self.cut_ratio = float(cut_ratio)
        self.flash_frames = int(flash_frames)
        self.gradual_window = int(gradual_window)
        self.gradual_threshold = float(gradual_threshold)
        self.straightness = float(straightness)
        self.blend_residual = float(blend_residual)
        self.blend_spread = float(blend_spread)
        self.smooth_ratio = float(smooth_ratio)
        self.max_gradual = int(max_gradual)
        self.dark_threshold = float(dark_threshold)
        self.anchor_threshold = float(anchor_threshold)
        self.min_gap = int(min_gap)
        self.recur_threshold = float(recur_threshold)
        self.max_shots = int(max_shots)
        self.thumb_size = int(thumb_size)
        self.batch_size = int(batch_size)
        self.on_score = on_score
        self._edges = _pool_edges(self.dim, int(signature_dim))
        self.signature_dim = self.dim if self._edges is None else len(self._edges)
        # frame k is tested for a cut once flash_frames + 1 frames follow it, and decided for good once
        # gradual_window more frames have been tested
        self.lookahead = self.flash_frames + 2 + self.gradual_window
        # the longest stretch a transition reaches back from the frame being decided (a fade: out, black, in)
        self.reach = 3 * self.max_gradual + 2 * self.gradual_window + 8
        self.capacity = max(self.window, self.reach + self.lookahead + self.batch_size + 2)
        self._prep = getattr(encoder, "preprocess", None)
        self._fast = self._prep is not None and hasattr(encoder, "encode_preprocessed")
        ts = self.thumb_size
        self._emb = _Ring(self.capacity, (self.dim,), np.float32)
        self._sig = _Ring(self.capacity, (self.signature_dim,), np.float32)
        self._thumb = _Ring(self.capacity, (ts, ts, 3), np.float32)
        self._c = _Ring(self.capacity, (), np.float32)
        self._luma = _Ring(self.capacity, (), np.float32)
        self._time = _Ring(self.capacity, (), np.float64, np.nan)
        self._outlier = _Ring(self.capacity, (), np.bool_, False)
        self._rings = (self._emb, self._sig, self._thumb, self._c, self._luma, self._time, self._outlier)
        self._shot_sigs = np.zeros((self.max_shots, self.signature_dim), np.float32)
        self._shot_ids = np.full(self.max_shots, -1, np.int64)
        self._pending: list = []  # prepared frames waiting for their batch (at most batch_size)
        self._pending_meta: list = []
        self._trace = None
        self.reset()

    # -- public API ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the stream (buffers, anchor, shots): the next frame is frame 0 of a new stream."""
        for r in self._rings:
            r.reset()
        self._shot_ids[:] = -1
        self._shot_count = 0
        self._pending.clear()
        self._pending_meta.clear()
        self._frames_in = 0
        self._cursor1 = 0  # next frame to test for a cut / flash
        self._cursor = 0  # next frame to decide for good
        self._cuts: deque = deque()  # frames the cut test marked, not yet decided for good
        self._barriers: deque = deque(maxlen=self.capacity)  # recent cut frames: windows never reach across one
        self._dims = None  # the selected dimensions (None: all)
        self._anchor = None
        self._shot_start = 0
        self._shot_start_time = None
        self._shot_sum = np.zeros(self.signature_dim, np.float64)  # signatures of the shot's frames evicted so far
        self._shot_n = 0
        self._sig_total = np.zeros(self.signature_dim, np.float64)  # every decided frame: the stream's mean
        self._sig_frames = 0
        self._last = None  # the last transition emitted
        self._region = None  # where the window means differ: {"lo", "peak"}
        self._fade = None  # fade in progress: {"state", "start", "dark_first", "dark_last", "end", "rises"}
        if self._trace is not None:
            self._trace = []
        self.stats = {"frames": 0, "prepare_seconds": 0.0, "embed_seconds": 0.0, "compare_seconds": 0.0}

    @property
    def latency(self) -> int:
        """Frames an event may wait after its frame arrived through ``process_frame``: the batch plus the
        lookahead (``run`` with several workers adds a batch per worker)."""
        return self.batch_size + self.lookahead

    def buffer_sizes(self) -> dict:
        """What each internal buffer holds now and its cap: ``{name: (held, cap)}`` (the memory bound)."""
        return {
            "frames_held": (min(self._emb.end, self.capacity), self.capacity),
            "pending_frames": (len(self._pending), self.batch_size),
            "undecided_frames": (self._emb.end - self._cursor, self.capacity),
            "shot_signatures": (int((self._shot_ids >= 0).sum()), self.max_shots),
            "cut_marks": (len(self._cuts), self.capacity),
            "barriers": (len(self._barriers), self.capacity),
        }

    def process_frame(self, frame: np.ndarray, t: float | None = None) -> list[Event]:
        """Add one uint8 RGB (H, W, 3) frame (``t``: its timestamp in seconds, optional); return new events."""
        t0 = time.perf_counter()
        item = self.prepare(frame)
        self.stats["prepare_seconds"] += time.perf_counter() - t0
        return self.process_prepared(item, t)

    def prepare(self, frame: np.ndarray) -> tuple:
        """Validate and preprocess one frame (no state touched: ``run`` calls it on its decode thread)."""
        import cv2

        a = np.asarray(frame)
        if a.dtype != np.uint8:
            raise InputError(f"frames must be uint8 RGB, got dtype {a.dtype} with shape {a.shape}")
        if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
            raise InputError(f"a frame must have shape (H, W, 3) (uint8 RGB), got {a.shape}")
        small = a if self._prep is None else self._prep.resize_crop(a)  # the network's view, uint8
        ts = self.thumb_size
        thumb = cv2.resize(small, (ts, ts), interpolation=cv2.INTER_AREA).astype(np.float32)
        luma = float(thumb.mean())
        net = self._prep.normalise(small[None])[0] if self._fast else small
        return (net, luma, thumb)

    def process_prepared(self, item: tuple, t: float | None = None) -> list[Event]:
        """Add a frame that went through ``prepare``."""
        self._queue(item, t)
        if len(self._pending) >= self.batch_size:
            return self._embed_pending()
        return []

    def flush(self) -> list[Event]:
        """The end of the stream: embed what is buffered, decide the last frames, close the last shot; reset."""
        events = self._embed_pending()
        t0 = time.perf_counter()
        events += self._advance(final=True)
        if self._emb.end > 0:
            events.append(self._close_shot(self._emb.end - 1))
        self.stats["compare_seconds"] += time.perf_counter() - t0
        stats = dict(self.stats)
        self.reset()
        self.stats = stats
        return events

    def run(self, source, *, max_frames: int | None = None, fps: float | None = None, prefetch: int = 32,
            workers: int = 1) -> Iterator[Event]:
        """Events over a whole source: a video file path, a camera index, or an iterable of uint8 RGB frames.

        Frames are decoded and preprocessed on a helper thread while the network runs; with ``workers`` > 1,
        that many batches go through the network at once on a thread pool (give the encoder one
        onnxruntime thread each: ``Encoder(path, threads=1)``; on 2 cores 2 workers beat one 2-thread
        session). ``max_frames`` stops early; ``fps`` sets the timestamps' rate (a file's own rate is used
        otherwise). Ends with ``flush()``; ``stats`` then hold the frames and the seconds spent per stage. A
        run left before its end (the caller stops iterating, or an error) resets the comparator, so the next
        stream starts at frame 0.
        """
        if isinstance(workers, bool) or int(workers) != workers or workers < 1:
            raise InputError(f"workers must be a positive int, got {workers!r}")
        frames, rate = _frames_of(source, max_frames)
        rate = fps or rate
        q: queue.Queue = queue.Queue(maxsize=max(2, int(prefetch)))
        stop = threading.Event()
        done = object()
        prep_time = [0.0]

        def produce():
            try:
                for i, f in enumerate(frames):
                    if stop.is_set():
                        return
                    t0 = time.perf_counter()
                    item = self.prepare(f)
                    prep_time[0] += time.perf_counter() - t0
                    q.put((item, i / rate if rate else None))
                q.put(done)
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, which raises it)
                q.put(e)

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lookalike-embed") if workers > 1 else None
        inflight: deque = deque()  # (future of embeddings, their frames' metadata), in frame order

        def collect(keep: int) -> list[Event]:
            events: list[Event] = []
            while len(inflight) > keep:
                fut, meta = inflight.popleft()
                x, seconds = fut.result()
                self.stats["embed_seconds"] += seconds
                events += self._accept(x, meta)
            return events

        worker = threading.Thread(target=produce, name="lookalike-decode", daemon=True)
        t_start = time.perf_counter()
        finished = False
        worker.start()
        try:
            while True:
                got = q.get()
                if got is done:
                    break
                if isinstance(got, BaseException):
                    raise got
                item, t = got
                if pool is None:
                    yield from self.process_prepared(item, t)
                    continue
                self._queue(item, t)
                if len(self._pending) >= self.batch_size:
                    batch, meta = self._take_pending()
                    inflight.append((pool.submit(self._encode, batch), meta))
                    yield from collect(workers)
            if pool is not None and self._pending:
                batch, meta = self._take_pending()
                inflight.append((pool.submit(self._encode, batch), meta))
            yield from collect(0)
            n = self._frames_in
            yield from self.flush()
            self.stats["frames"] = n
            self.stats["prepare_seconds"] = prep_time[0]
            self.stats["seconds"] = time.perf_counter() - t_start
            finished = True
        finally:
            if not finished:  # abandoned (the caller stopped iterating) or failed: the next stream starts clean
                self.reset()
            stop.set()
            while worker.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(0.05)
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            close = getattr(frames, "close", None)
            if close is not None:
                close()

    # -- embedding -----------------------------------------------------------------------------------------
    def _queue(self, item: tuple, t: float | None) -> None:
        """Buffer a prepared frame; checks ``item`` and ``t`` first, so a refused frame changes nothing."""
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], np.ndarray)):
            got = f"a {len(item)}-tuple" if isinstance(item, tuple) else type(item).__name__
            raise InputError(f"process_prepared takes what prepare(frame) returned (a 3-tuple), got {got}")
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not np.isfinite(t):
                raise InputError(f"a frame's timestamp t must be a finite number of seconds or None, got {t!r}")
            t = float(t)
        self._pending.append(item[0])
        self._pending_meta.append((item[1], item[2], t))
        self._frames_in += 1

    def _take_pending(self) -> tuple[list, list]:
        batch, meta = list(self._pending), list(self._pending_meta)
        self._pending.clear()
        self._pending_meta.clear()
        return batch, meta

    def _encode(self, batch: list) -> tuple[np.ndarray, float]:
        """Embed prepared frames (thread-safe: no comparator state touched); returns (embeddings, seconds)."""
        t0 = time.perf_counter()
        x = self.encoder.encode_preprocessed(np.stack(batch)) if self._fast else self.encoder.encode(batch)
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (len(batch), self.dim):
            raise InputError(f"the encoder returned shape {x.shape}, expected ({len(batch)}, {self.dim})")
        return x, time.perf_counter() - t0

    def _embed_pending(self) -> list[Event]:
        if not self._pending:
            return []
        batch, meta = self._take_pending()
        x, seconds = self._encode(batch)
        self.stats["embed_seconds"] += seconds
        return self._accept(x, meta)

    def _accept(self, x: np.ndarray, meta: list) -> list[Event]:
        """Take a batch's embeddings in, in frame order, and make every decision they allow."""
        t1 = time.perf_counter()
        sigs = _pool(x, self._edges)
        for row, sig, (luma, thumb, t) in zip(x, sigs, meta):
            self._ingest(row, sig, luma, thumb, t)
        events = self._advance(final=False)
        self.stats["compare_seconds"] += time.perf_counter() - t1
        self.stats["frames"] = self._frames_in
        return events

    def _ingest(self, x: np.ndarray, sig: np.ndarray, luma: float, thumb: np.ndarray, t) -> None:
        gone = self._emb.end - self.capacity  # the frame overwritten now: it can only belong to the current shot
        if gone >= 0 and gone >= self._shot_start and not self._outlier[gone]:
            self._shot_sum += self._sig[gone]
            self._shot_n += 1
        i = self._emb.append(x)
        if i == self._shot_start:
            self._shot_start_time = t
        self._sig.append(sig)
        self._thumb.append(thumb)
        self._luma.append(luma)
        self._time.append(np.nan if t is None else t)
        self._outlier.append(False)
        if self.top_dims is not None and (i + 1 == self.window // 2 or self._dims is not None and i % self.refresh == 0):
            self._choose_dims()
        self._c.append(0.0 if i == 0 else 1.0 - self._sim(i - 1, i))
        if self._anchor is None:
            self._anchor = x.copy()

    def _choose_dims(self) -> None:
        """The published demo's selection: the dimensions that varied most over the last ``window`` frames."""
        lo = max(self._emb.start, self._emb.end - self.window)
        var = self._emb.take(np.arange(lo, self._emb.end)).var(axis=0)
        self._dims = np.sort(np.argpartition(-var, self.top_dims)[: self.top_dims])

    def _sel(self, x: np.ndarray) -> np.ndarray:
        return x if self._dims is None else x[..., self._dims]

    def _sim(self, i: int, j: int) -> float:
        return _cos(self._sel(self._emb[i]), self._sel(self._emb[j]))

    # -- decisions -----------------------------------------------------------------------------------------
    def _advance(self, *, final: bool) -> list[Event]:
        n = self._emb.end
        while self._cursor1 < n and (final or self._cursor1 + self.flash_frames + 1 < n):
            self._cut_test(self._cursor1, n)
            self._cursor1 += 1
        events: list[Event] = []
        while self._cursor < self._cursor1 and (final or self._cursor + self.gradual_window < self._cursor1):
            events += self._decide(self._cursor, final)
            self._cursor += 1
        return events

    def _valid_before(self, k: int) -> int | None:
        """The last frame before ``k`` that is not an outlier (None at the start of the stream)."""
        j = k - 1
        while j >= self._emb.start and self._outlier[j]:
            j -= 1
        return j if j >= self._emb.start else None

    def _cut_test(self, k: int, n: int) -> None:
        """Stage 1 (``gradual_window`` frames ahead of the decisions): mark cuts and flash frames."""
        if self._outlier[k]:
            return
        p = self._valid_before(k)
        if p is None:
            return  # the first frame emits nothing
        c_k = 1.0 - self._sim(p, k)
        if c_k < self.cut_threshold:
            return
        before = [float(self._c[j]) for j in range(max(self._emb.start + 1, k - 3), k) if not self._outlier[j]]
        after = [float(self._c[j]) for j in range(k + 1, min(n, k + 4))]
        local = max(float(np.median(before)) if before else 0.0, float(np.median(after)) if after else 0.0)
        if c_k < self.cut_ratio * local:
            return  # the neighbours change about as much: motion, not a cut
        for j in range(1, self.flash_frames + 1):  # the content before comes back: a flash or an occlusion
            if k + j >= n:
                break
            d = 1.0 - self._sim(p, k + j)
            # as close as the shot itself moves over the same gap just before (or closer than a cut)
            ref = 1.0 - self._sim(p - j - 1, p) if p - j - 1 >= self._emb.start else 0.0
            if d <= 0.5 * c_k and d < max(self.cut_threshold, 1.5 * ref):
                for m in range(k, k + j):
                    self._outlier[m] = True
                return
        # a hard cut changes the picture in one step; inside a dissolve one step is a small part of the change
        before = [j for j in range(max(self._emb.start, k - 3), k) if not self._outlier[j]]
        after = [j for j in range(k + 1, min(n, k + 4)) if not self._outlier[j]]
        if before and after:
            across = float(np.linalg.norm(self._thumb.take(after).mean(axis=0) - self._thumb.take(before).mean(axis=0)))
            step = float(np.linalg.norm(self._thumb[k] - self._thumb[p]))
            near = [float(np.linalg.norm(self._thumb[j] - self._thumb[j - 1]))
                    for j in before[1:] + after[1:] if j - 1 >= self._emb.start and not self._outlier[j - 1]]
            if step < 0.5 * across or (near and step < 2.0 * float(np.median(near))):
                return
        self._cuts.append((k, c_k))
        self._barriers.append(k)

    def _decide(self, k: int, final: bool) -> list[Event]:
        """Stage 2, in frame order: fades, cuts, dissolves, the anchor, the frame's scores."""
        events: list[Event] = []
        while self._barriers and self._barriers[0] < k - self.reach:
            self._barriers.popleft()  # too old to stop any window
        p = self._valid_before(k)
        c_k = 0.0 if p is None else 1.0 - self._sim(p, k)
        is_cut = bool(self._cuts) and self._cuts[0][0] == k
        if is_cut:
            self._cuts.popleft()
        outlier = bool(self._outlier[k])
        if not outlier:
            fade_events, taken = self._fade_step(k, c_k)
            events += fade_events
            if is_cut and not taken:
                events += self._emit(self._transition("cut", k, k, c_k))
        g = 0.0 if is_cut else self._gradual_signal(k)
        if not outlier:
            events += self._dissolve_step(k, g, final and k == self._emb.end - 1)
        if final and k == self._emb.end - 1 and self._fade is not None:
            events += self._finish_fade()
        # the published demo's anchor: the frame that starts the shot, renewed when the similarity falls low
        a = _cos(self._sel(self._anchor), self._sel(self._emb[k]))
        if not outlier:
            if a < self.anchor_threshold:
                self._anchor = self._emb[k].copy()
            self._sig_total += self._sig[k]
            self._sig_frames += 1
        if self.on_score is not None:
            t = float(self._time[k])
            self.on_score(FrameScore(index=k, time=None if math.isnan(t) else t, similarity=1.0 - c_k,
                                     anchor_similarity=a, gradual=g, outlier=outlier))
        return events

    # fades: the brightness falls steadily into black and / or rises steadily out of it
    def _fade_step(self, k: int, c_k: float) -> tuple[list[Event], bool]:
        """Advance the fade state over frame k: (events, whether the fade takes a cut marked at frame k).

        The brightness alone decides a fade; the embedding of a darkening frame may jump (a cut mark) on the
        way, and such marks inside a fade are taken by it.
        """
        luma = float(self._luma[k])
        dark = luma <= self.dark_threshold
        f = self._fade
        if f is None:
            if not dark:
                return [], False
            s, steps = k, []  # walk back over the frames that darken step by step
            while (s - 1 > max(self._emb.start, self._shot_start) and k - s < self.max_gradual
                   and not self._outlier[s - 1]):
                step = float(self._luma[s - 1]) - float(self._luma[s])
                if not _steady(step, steps):
                    break
                steps.append(step)
                s -= 1
            if k - s < 2:
                s = k  # one darker step is a cut into black, not a fade out
            self._fade = {"state": "dark", "start": s, "dark_first": k, "dark_last": k, "end": k, "rises": [],
                          "long": False}
            return [], s < k
        if f["state"] == "dark":
            if dark:
                f["dark_last"] = f["end"] = k
                if not f["long"] and k - f["dark_first"] >= self.max_gradual:
                    # a long black stretch is a shot of its own: the fade out (if any) ends where it starts,
                    # and a fade in, if one comes, starts a transition of its own
                    f["long"] = True
                    if f["dark_first"] - f["start"] >= 2:
                        return self._fade_transition(f["start"], f["dark_first"] - 1), True
                return [], True
            if c_k >= self.cut_threshold and luma > 2.0 * self.dark_threshold:
                # a cut out of the black: the fade (if it faded out) ends on the frame before
                if f["long"]:
                    self._fade = None
                    return [], False
                took = f["dark_first"] - f["start"] >= 2
                return self._finish_fade(), took
            f["state"], f["end"] = "in", k
            f["rises"].append(luma - float(self._luma[k - 1]))
            return [], True
        rise = luma - float(self._luma[k - 1])  # fading in while the brightness rises steadily
        if _steady(rise, f["rises"]) and k - f["dark_last"] <= self.max_gradual:
            f["rises"].append(rise)
            f["end"] = k
            return [], True
        return self._finish_fade(), False

    def _finish_fade(self) -> list[Event]:
        f, self._fade = self._fade, None
        s, e = (f["dark_last"] + 1, f["end"]) if f["long"] else (f["start"], f["end"])
        faded = e - f["dark_last"] >= 2 if f["long"] else (f["dark_first"] - s >= 2 or e - f["dark_last"] >= 2)
        if not faded or s <= self._shot_start or s - 1 < self._emb.start:
            return []  # black from the start, or plain cuts into and out of black (the cut test has those)
        return self._fade_transition(s, e)

    def _fade_transition(self, s: int, e: int) -> list[Event]:
        before = self._window_mean(max(self._emb.start, self._shot_start, s - 3), s)
        after = self._window_mean(e + 1, min(self._emb.end, e + 4)) if e + 1 < self._emb.end else self._emb[e]
        score = 1.0 - _cos(self._sel(before), self._sel(after))
        return self._emit(self._transition("gradual", s, e, score, fade=True))

    # dissolves
    def _window_mean(self, lo: int, hi: int, ring: _Ring | None = None) -> np.ndarray:
        ring = self._emb if ring is None else ring
        idx = [j for j in range(lo, hi) if not self._outlier[j]] or list(range(lo, hi))
        return ring.take(idx).mean(axis=0)

    def _gradual_signal(self, k: int) -> float:
        """Dissimilarity of the mean embeddings of the windows before and after frame k (they stop at cuts)."""
        w = self.gradual_window
        lo, hi = max(self._emb.start, self._shot_start, k - w), min(self._emb.end, k + w)
        for c in self._barriers:
            if lo < c <= k:
                lo = c
            elif k < c < hi:
                hi = c
        before = [j for j in range(lo, k) if not self._outlier[j]]
        after = [j for j in range(k, hi) if not self._outlier[j]]
        if len(before) < 2 or len(after) < 2:
            return 0.0
        mb = self._sel(self._emb.take(before)).mean(axis=0)
        ma = self._sel(self._emb.take(after)).mean(axis=0)
        return 1.0 - _cos(mb, ma)

    def _dissolve_step(self, k: int, g: float, last_frame: bool) -> list[Event]:
        r = self._region
        if r is None:
            if g >= 0.4 * self.gradual_threshold:
                self._region = {"lo": k, "peak": g}
            return []
        r["peak"] = max(r["peak"], g)
        too_long = k - r["lo"] > self.max_gradual + 2 * self.gradual_window
        if g >= 0.5 * r["peak"] and not too_long and not last_frame:
            return []
        self._region = None
        if too_long:
            return self._note(r["lo"], k - 1, "too long")
        return self._judge_dissolve(r["lo"], k - 1)

    def _judge_dissolve(self, lo: int, hi: int) -> list[Event]:
        """Look for dissolves where the window means differ, [lo, hi] (and gradual_window frames around)."""
        if self._fade is not None:
            return self._note(lo, hi, "inside a fade")
        w = self.gradual_window
        first = max(self._emb.start, self._shot_start, lo - w)
        last = min(self._emb.end - 1, hi + w)
        for c in self._barriers:  # stay inside one shot: no cut within
            if first < c <= lo:
                first = c
            elif hi < c <= last:
                last = c - 1
        idx = [j for j in range(first, last + 1) if not self._outlier[j]]
        if len(idx) < 8:
            return self._note(lo, hi, "too short")
        found = []
        for span in self._straight_spans(idx):
            verdict, detail = self._dissolve_verdict(span, idx)
            self._note(lo, hi, verdict, **detail)
            if verdict == "dissolve":
                found.append(detail)
        events: list[Event] = []
        for d in sorted(found, key=lambda d: d["first"]):
            events += self._emit(self._transition("gradual", d["first"], d["last"], d["change"]))
        return events

    def _note(self, lo: int, hi: int, verdict: str, **detail) -> list:
        if self._trace is not None:
            self._trace.append({"region": (lo, hi), "verdict": verdict, **detail})
        return []

    def _straight_spans(self, idx: list, most: int = 3) -> list[tuple]:
        """Up to ``most`` disjoint spans along which the thumbnails move furthest in the straightest line.

        A dissolve is a straight line in pixel space: frame ``(1 - a) * P + a * Q``. The thumbnails of ``idx``
        are smoothed (3-frame running mean, against noise); a span from smoothed point i to j scores
        ``chord^2 / path`` (the distance covered times its straightness ``chord / path``), the best span of
        each start is kept, and a kept span grows at either end while each added step is itself at least
        ``straightness`` straight (a dissolve starts and ends slowly). Returns (first, last, straightness).
        """
        X = self._thumb.take(idx).reshape(len(idx), -1).astype(np.float64)
        M = (X[:-2] + X[1:-1] + X[2:]) / 3.0  # row r is centred on frame idx[r + 1]
        frames = np.asarray(idx[1:-1])
        m = len(M)
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(M, axis=0), axis=1))])
        sq = (M * M).sum(axis=1)
        chord = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * _matmul(M, M.T), 0.0))  # (m, m)
        path = np.maximum(cum[None, :] - cum[:, None], 1e-12)  # path[i, j]: from point i to point j
        gap = np.arange(m)[None, :] - np.arange(m)[:, None]
        score = np.where((gap >= 2) & (gap <= self.max_gradual + 2), chord * chord / path, -1.0)
        spans: list[tuple] = []
        for _ in range(most):
            i, j = np.unravel_index(int(np.argmax(score)), score.shape)
            if score[i, j] <= 0:
                break
            grown = True
            while grown:  # grow while each added step is itself straight enough
                grown = False
                for i2, j2 in ((i - 1, j), (i, j + 1)):
                    if i2 < 0 or j2 >= m or score[i2, j2] < 0 or not chord[i2, j2] > chord[i, j]:
                        continue
                    if chord[i2, j2] - chord[i, j] >= self.straightness * (path[i2, j2] - path[i, j]):
                        i, j, grown = i2, j2, True
            spans.append((int(frames[i]) + 1, int(frames[j]) - 1, float(chord[i, j] / path[i, j])))
            score[max(0, i - 1) : j + 1, :] = -1.0  # later spans stay clear of this one
            score[:, max(0, i - 1) : j + 1] = -1.0
            score[: max(0, i - 1), j + 1 :] = -1.0
        return spans

    def _dissolve_verdict(self, span: tuple, idx: list) -> tuple[str, dict]:
        """Test one span (first, last, straightness): does the content change, and as a blend of P and Q?"""
        a, b, eff = span
        first, last = idx[0], idx[-1]
        detail = {"first": a, "last": b, "straightness": round(eff, 4)}
        if b - a + 1 < 2:
            return "too short", detail
        if a <= first or b >= last:
            return "no context", detail
        around = self._luma.take(np.arange(max(self._emb.start, a - 2), min(self._emb.end, b + self.gradual_window)))
        if float(around.min()) <= self.dark_threshold:
            return "through black", detail  # the fade test decides
        lo, hi = max(first, a - 3), min(last + 1, b + 4)
        change = 1.0 - _cos(self._sel(self._window_mean(lo, a)), self._sel(self._window_mean(b + 1, hi)))
        detail["change"] = round(change, 6)
        if change < self.gradual_threshold:
            return "small change", detail  # the content after is much like the content before
        if eff < self.straightness:
            return "winding", detail
        P = self._window_mean(lo, a, self._thumb)
        Q = self._window_mean(b + 1, hi, self._thumb)
        D = Q - P
        dd = float((D * D).sum())
        if dd <= 0.0:
            return "no change", detail
        span_idx = [j for j in range(max(first, a - 1), min(last, b + 1) + 1) if not self._outlier[j]]
        X = self._thumb.take(span_idx) - P  # (m, s, s, 3)
        lam = _matmul(X.reshape(len(X), -1), D.ravel()) / dd  # how far each frame went from P to Q
        resid = np.linalg.norm(X.reshape(len(X), -1) - np.outer(lam, D.ravel()), axis=1) / math.sqrt(dd)
        inner = [r for j, r in zip(span_idx, resid) if a <= j <= b]
        detail["residual"] = round(float(np.median(inner)), 4)
        detail["step"] = round(float(np.abs(np.diff(lam)).max()), 4)
        mids = [x for x, l, j in zip(X, lam, span_idx) if a <= j <= b and 0.25 <= l <= 0.75]
        detail["spread"] = round(float(np.mean([_block_spread(x, D, 4) for x in mids])), 4) if mids else None
        if detail["step"] > self.smooth_ratio:
            return "abrupt", detail  # one frame carries much of the change: fast motion
        if detail["residual"] > self.blend_residual:
            return "not a blend", detail  # the frames leave the line from P to Q: motion, a pan
        if detail["spread"] is not None and detail["spread"] > self.blend_spread:
            return "uneven blend", detail  # parts of the picture change at different times: motion
        return "dissolve", detail

    # events
    def _transition(self, kind: str, first: int, last: int, score: float, *, fade: bool = False) -> Transition:
        t0, t1 = float(self._time[first]), float(self._time[last])
        return Transition(type=kind, first=int(first), last=int(last), score=round(float(score), 6),
                          start_time=None if math.isnan(t0) else t0, end_time=None if math.isnan(t1) else t1,
                          fade=fade)

    def _emit(self, tr: Transition) -> list[Event]:
        if self._last is not None and tr.first <= self._last.last + self.min_gap:
            return []  # too close to the previous transition
        if tr.first <= self._shot_start:
            return []
        shot = self._close_shot(tr.first - 1)
        self._last = tr
        self._open_shot(tr.first if tr.type == "cut" else tr.last + 1)
        return [shot, tr]

    def _open_shot(self, start: int) -> None:
        self._shot_start = start
        self._shot_start_time = None
        if start < self._emb.end:
            t = float(self._time[start])
            self._shot_start_time = None if math.isnan(t) else t
        self._shot_sum = np.zeros(self.signature_dim, np.float64)
        self._shot_n = 0
        if start < self._emb.end:
            self._anchor = self._emb[start].copy()

    def _close_shot(self, end: int) -> Shot:
        """The current shot ends at frame ``end``: its signature, whether it recurs, its event."""
        start = self._shot_start
        total, count = self._shot_sum.copy(), self._shot_n
        idx = [j for j in range(max(start, self._sig.start), end + 1) if not self._outlier[j]]
        if idx:
            total += self._sig.take(idx).sum(axis=0)
            count += len(idx)
        sig = (total / max(count, 1)).astype(np.float32)
        best, best_id = -2.0, None
        held = self._shot_ids >= 0
        if held.any() and count:
            # compared once the mean of every frame so far is removed: what all shots share does not count
            mu = (self._sig_total / max(self._sig_frames, 1)).astype(np.float32)
            sigs = self._shot_sigs[held] - mu
            mine = sig - mu
            cos = _matmul(sigs, mine) / np.maximum(np.linalg.norm(sigs, axis=1) * float(np.linalg.norm(mine)), 1e-12)
            j = int(np.argmax(cos))
            best, best_id = float(cos[j]), int(self._shot_ids[held][j])
        index = self._shot_count
        slot = index % self.max_shots  # the oldest signature gives way
        self._shot_sigs[slot] = sig
        self._shot_ids[slot] = index
        self._shot_count += 1
        t0 = math.nan if self._shot_start_time is None else float(self._shot_start_time)
        t1 = float(self._time[end])
        recur = best_id if best >= self.recur_threshold else None
        return Shot(index=index, start=int(start), end=int(end), recurs_with=recur,
                    recurrence_score=None if recur is None else round(best, 6),
                    start_time=None if math.isnan(t0) else t0, end_time=None if math.isnan(t1) else t1)


# ---------------------------------------------------------------------------------------------------------------
# sources


def _frames_of(source, max_frames: int | None):
    """(iterator of uint8 RGB frames, frames per second or None) for a path, a camera index or an iterable."""
    if max_frames is not None and (isinstance(max_frames, bool) or int(max_frames) != max_frames or max_frames < 0):
        raise InputError(f"max_frames must be a non-negative int or None, got {max_frames!r}")
    if isinstance(source, (str, os.PathLike, int, np.integer)) and not isinstance(source, bool):
        reader = VideoReader(source)
        return reader.frames(max_frames), reader.fps
    if isinstance(source, np.ndarray) and source.ndim == 4:
        it = iter(source)
    else:
        try:
            it = iter(source)
        except TypeError:
            raise InputError(f"source must be a video path, a camera index or an iterable of frames, "
                             f"got {type(source).__name__}") from None
    if max_frames is not None:
        import itertools

        it = itertools.islice(it, int(max_frames))
    return it, None


class VideoReader:
    """Frames of a video file or camera as uint8 RGB, read with OpenCV."""

    def __init__(self, source):
        import cv2

        self.is_camera = isinstance(source, (int, np.integer)) or (isinstance(source, str) and source.strip().isdigit())
        self.source = int(source) if self.is_camera else str(source)
        if not self.is_camera and not Path(self.source).is_file():
            why = "it is a folder" if Path(self.source).is_dir() else "no such file"
            raise VideoOpenError(f"video file not found: {self.source} ({why})")
        self.cap = None
        if not self.is_camera:
            # One decoding thread: the comparator decodes on its own thread beside the network, and FFmpeg's
            # frame threads cost more CPU per frame than they save (bench_stream.py: 0.17 vs 0.27 CPU ms on
            # mixed.mp4, 0.40 vs 0.54 on bikes.mp4).
            self.cap = cv2.VideoCapture(self.source, cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
            if not self.cap.isOpened():
                self.cap.release()
                self.cap = None
        if self.cap is None:
            self.cap = cv2.VideoCapture(self.source)
        if not self.cap.isOpened():
            self.cap.release()
            what = f"camera {self.source}" if self.is_camera else f"video file {self.source}"
            raise VideoOpenError(f"OpenCV could not open {what}"
                                 + ("" if self.is_camera else " (not a video, or a codec OpenCV lacks)"))
        fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if math.isfinite(fps) and fps > 0 else None
        self.size = (int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        n = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = None if self.is_camera or n <= 0 else n
        self.frames_read = 0  # frames the last pass delivered
        self.ended_early = False  # the decoder ended before the frame count the container lists

    def frames(self, max_frames: int | None = None) -> Iterator[np.ndarray]:
        """One pass of uint8 RGB frames. When the decoder ends before the frame count the container lists (a
        truncated or damaged file), ``ended_early`` is set and a ``RuntimeWarning`` names the file and both
        counts."""
        import cv2

        self.frames_read = 0
        try:
            while max_frames is None or self.frames_read < max_frames:
                ok, f = self.cap.read()
                if not ok or f is None:
                    if self.frame_count is not None and self.frames_read < self.frame_count:
                        self.ended_early = True
                        warnings.warn(f"video file {self.source}: the decoder ended after {self.frames_read} of "
                                      f"the {self.frame_count} frames its container lists (a truncated or damaged "
                                      f"file?)", RuntimeWarning, stacklevel=2)
                    return
                self.frames_read += 1
                yield cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
        finally:
            self.cap.release()


def detect(source, encoder, *, max_frames: int | None = None, workers: int = 1, **options) -> list[Event]:
    """Every event of a video file, camera index or iterable of frames, in one call (``StreamComparator.run``;
    ``options`` go to ``StreamComparator``)."""
    return list(StreamComparator(encoder, **options).run(source, max_frames=max_frames, workers=workers))


# ---------------------------------------------------------------------------------------------------------------
# command line

EPILOG = """\
what it writes in OUT:
  report.json     frames, frames per second processed (decode + embed + compare, end to end), seconds per
                  stage, the options, every transition {type: cut|gradual, first, last, score, times} and every
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
    d = StreamComparator.__init__.__kwdefaults__
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
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"frames embedded together (default: {d['batch_size']})")
    p.add_argument("--workers", type=int, default=2,
                   help="batches embedded at once, each on its own thread (default: 2, one per core)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads per worker (default: 1 with several workers, else onnxruntime's own)")
    p.add_argument("--cut-threshold", type=float, default=d["cut_threshold"],
                   help=f"least dissimilarity (1 - cosine) with the frame before for a cut (default: {d['cut_threshold']})")
    p.add_argument("--gradual-threshold", type=float, default=d["gradual_threshold"],
                   help=f"least dissimilarity across a dissolve (default: {d['gradual_threshold']})")
    p.add_argument("--min-gap", type=int, default=d["min_gap"],
                   help=f"frames at least between two transitions (default: {d['min_gap']})")
    p.add_argument("--top-dims", type=int, default=d["top_dims"],
                   help="compare on this many highest-variance dimensions (default: all)")
    p.add_argument("--recur-threshold", type=float, default=d["recur_threshold"],
                   help=f"least signature cosine for a recurring shot (default: {d['recur_threshold']})")
    return p


class _Overlay:
    """Draws each frame with its scores once the comparator has decided it (annotated video, window)."""

    def __init__(self, out_path: Path | None, show: bool, fps: float | None):
        self.frames: deque = deque()  # (index, frame) decoded but not yet decided
        self.out_path = out_path
        self.tmp_path = None if out_path is None else out_path.with_name(".annotated.tmp.mp4")
        self.show = show
        self.fps = fps or 25.0
        self.writer = None
        self.stopped = False
        self.events: list[str] = []
        self.banner = ""
        self.banner_until = -1

    def feed(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for i, f in enumerate(frames):
            self.frames.append((i, f))
            yield f
            if self.stopped:
                return

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, Transition):
            self.banner = f"{ev.type.upper()} {ev.first}-{ev.last}" if ev.type == "gradual" else f"CUT at {ev.first}"
            self.banner_until = ev.last + 12

    def on_score(self, s: FrameScore) -> None:
        import cv2

        while self.frames and self.frames[0][0] < s.index:
            self.frames.popleft()
        if not self.frames or self.frames[0][0] != s.index:
            return
        _, frame = self.frames.popleft()
        img = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        h, w = img.shape[:2]
        scale = max(0.6, w / 800)
        bar_w = int(w * 0.3)
        for row, (label, value, color) in enumerate((("frame", s.similarity, (80, 220, 80)),
                                                     ("anchor", s.anchor_similarity, (220, 180, 60)))):
            y = int(22 * scale * (row + 1))
            cv2.putText(img, f"{label} {value:+.3f}", (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, color,
                        max(1, int(scale)), cv2.LINE_AA)
            x0 = int(150 * scale)
            cv2.rectangle(img, (x0, y - int(10 * scale)), (x0 + bar_w, y), (60, 60, 60), 1)
            cv2.rectangle(img, (x0, y - int(10 * scale)), (x0 + int(bar_w * max(0.0, min(1.0, value))), y), color, -1)
        if s.index <= self.banner_until and self.banner:
            cv2.putText(img, self.banner, (8, h - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (40, 40, 255),
                        max(1, int(2 * scale)), cv2.LINE_AA)
        if s.outlier:
            cv2.putText(img, "flash (ignored)", (8, int(70 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                        (0, 200, 255), max(1, int(scale)), cv2.LINE_AA)
        if self.tmp_path is not None:
            if self.writer is None:
                self.writer = cv2.VideoWriter(str(self.tmp_path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
                if not self.writer.isOpened():
                    raise OSError(f"OpenCV could not write {self.tmp_path} with the mp4v codec")
            self.writer.write(img)
        if self.show:
            cv2.imshow("lookalike stream", img)
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                self.stopped = True

    def close(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        if self.tmp_path is not None and self.tmp_path.exists():
            if ok:
                os.replace(self.tmp_path, self.out_path)
            else:
                self.tmp_path.unlink()
        if self.show:
            import cv2

            cv2.destroyAllWindows()


def check_display() -> None:
    """Raise a clear error when no window can be opened (no display, or an OpenCV without a GUI backend)."""
    import cv2

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise LookalikeError("--show needs a display, but neither DISPLAY nor WAYLAND_DISPLAY is set "
                             "(run without --show, or with --annotate to get annotated.mp4)")
    try:
        cv2.namedWindow("lookalike stream", cv2.WINDOW_NORMAL)
    except cv2.error as e:
        raise LookalikeError(f"--show: OpenCV cannot open a window here ({str(e).strip().splitlines()[-1]}); "
                             f"run without --show, or with --annotate to get annotated.mp4") from None


def timeline_png(scores: dict, transitions: list[Transition], shots: list[Shot], title: str) -> bytes:
    """The similarity timeline as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.asarray(scores["index"])
    fig, ax = plt.subplots(figsize=(12, 4))
    for tr in transitions:
        if tr.type == "cut":
            ax.axvline(tr.first, color="red", lw=1.2, alpha=0.8)
        else:
            ax.axvspan(tr.first - 0.5, tr.last + 0.5, color="orange", alpha=0.35, lw=0)
    ax.plot(idx, scores["similarity"], lw=1, color="tab:green", label="similarity with the frame before")
    ax.plot(idx, scores["anchor"], lw=1, color="tab:blue", label="similarity with the anchor (published demo)")
    flashes = idx[np.asarray(scores["outlier"], bool)] if len(idx) else idx
    if len(flashes):
        ax.plot(flashes, np.ones(len(flashes)), "x", color="purple", ms=4, label="flash frames (ignored)")
    for sh in shots:
        if sh.recurs_with is not None:
            ax.annotate(f"= shot {sh.recurs_with}", ((sh.start + sh.end) / 2, 1.02), ha="center", fontsize=7,
                        xycoords=("data", "axes fraction"))
    ax.plot([], [], color="red", label="cut")
    ax.fill_between([], [], [], color="orange", alpha=0.35, label="gradual (dissolve / fade)")
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
        reader = VideoReader(args.source)
        frames, rate = reader.frames(args.max_frames), reader.fps
        out.mkdir(parents=True, exist_ok=True)
    except (LookalikeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overlay = _Overlay(out / "annotated.mp4" if args.annotate else None, args.show, rate) \
        if args.annotate or args.show else None
    scores = {"index": [], "similarity": [], "anchor": [], "outlier": []}

    def on_score(s: FrameScore) -> None:
        scores["index"].append(s.index)
        scores["similarity"].append(round(s.similarity, 6))
        scores["anchor"].append(round(s.anchor_similarity, 6))
        scores["outlier"].append(s.outlier)
        if overlay is not None:
            overlay.on_score(s)

    try:
        comp = StreamComparator(encoder, batch_size=args.batch_size, cut_threshold=args.cut_threshold,
                                gradual_threshold=args.gradual_threshold, min_gap=args.min_gap,
                                top_dims=args.top_dims, recur_threshold=args.recur_threshold, on_score=on_score)
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
                    overlay.on_event(ev)
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
            overlay.close(ok)
    seconds = time.perf_counter() - t0
    stats = comp.stats
    n = int(stats.get("frames", len(scores["index"])))
    report = {
        "source": str(args.source),
        "model": {"path": str(args.model), "name": encoder.name, "dim": encoder.dim, "sha256": encoder.sha256,
                  "providers": encoder.providers},
        "frames": n,
        "frames_expected": reader.frame_count,  # what the container lists (None: a camera, or it does not say)
        "decode_ended_early": reader.ended_early,  # the decoder ended before that count: a damaged file
        "seconds": round(seconds, 3),
        "fps": round(n / seconds, 2) if seconds > 0 else None,
        "stage_seconds": {k: round(float(v), 3) for k, v in stats.items() if k.endswith("_seconds")},
        "video_fps": rate,
        "latency_frames": comp.latency + (args.workers - 1) * comp.batch_size,
        "workers": args.workers,
        "onnxruntime_threads": threads,
        "options": {k: getattr(comp, k) for k in OPTION_NAMES},
        "transitions": [t.to_dict() for t in transitions],
        "shots": [s.to_dict() for s in shots],
    }
    atomic_write(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    title = (f"{Path(str(args.source)).name}: {len(transitions)} transitions, {len(shots)} shots, "
             f"{n} frames at {report['fps']} frames/s ({encoder.name})")
    atomic_write(out / "timeline.png", timeline_png(scores, transitions, shots, title))
    cuts = sum(t.type == "cut" for t in transitions)
    print(f"{n} frames in {seconds:.1f} s ({report['fps']} frames/s): {cuts} cuts, {len(transitions) - cuts} gradual, "
          f"{len(shots)} shots, {sum(s.recurs_with is not None for s in shots)} recurring; {out}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
