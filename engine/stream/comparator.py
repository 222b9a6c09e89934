"""``StreamComparator``: frames in, one at a time; shot transitions and shots out, as they are found.

It embeds frames in small batches, keeps what the decisions need of the recent ones (``FrameHistory``), runs
the cut test a few frames ahead (``CutTest``), then decides each frame in order: fades (``FadeDetector``), cuts,
dissolves (``DissolveDetector``; where it finds no blend, wipes and pushes: ``wipes.MoveTest``), the anchor; transitions end one shot and open the next, whose signature is
compared with the earlier shots' when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from engine.errors import InputError
from engine.stream.batch import InputBuffer
from engine.stream.cuts import CutTest
from engine.stream.dissolves import DissolveDetector
from engine.stream.events import Event, FrameScore, Shot, Transition
from engine.stream.fades import FadeDetector
from engine.stream.frames import HS_BINS, STRIP, WHOLE, FrameHistory, PreparedFrame, hue_saturation
from engine.stream.gate import Gate, Slot
from engine.stream.options import OPTION_NAMES, StreamOptions
from engine.stream.pipeline import events_of
from engine.stream.vectors import cos, matmul, pool, pool_edges


class StreamComparator:
    """Compare the frames of a stream with an image encoder; emit shot transitions and shots as they are found.

    ``encoder``: anything with ``encode(frames) -> (n, dim)`` unit rows and ``dim`` (normally ``engine.Encoder``
    on an exported MPNN; with ``preprocess`` and ``encode_preprocessed`` too, frames are preprocessed on the
    decoding thread). The options are ``StreamOptions``' (see there), given as keywords
    (``StreamComparator(encoder, cut_threshold=0.3)``) or whole (``options=StreamOptions(...)``; keywords then
    override its values); they read as attributes too (``comparator.window``), with ``top_dims`` and
    ``signature_dim`` as they apply to this encoder (None, and ``dim``, where the embedding has fewer).
    ``on_score`` is called with a ``FrameScore`` for every frame once it is decided (timelines, overlays).
    """

    def __init__(self, encoder, *, options: StreamOptions | None = None,
                 on_score: Callable[[FrameScore], None] | None = None, **option_values):
        if not hasattr(encoder, "encode") or not hasattr(encoder, "dim"):
            raise InputError(f"encoder must have encode(frames) and dim (an engine.Encoder), got {type(encoder).__name__}")
        if options is not None and not isinstance(options, StreamOptions):
            raise InputError(f"options must be a StreamOptions, got {type(options).__name__}")
        o = replace(options if options is not None else StreamOptions(), **option_values)
        self.encoder = encoder
        self.dim = int(encoder.dim)
        self._edges = pool_edges(self.dim, o.signature_dim)
        o = replace(o, top_dims=None if o.top_dims is None or o.top_dims >= self.dim else o.top_dims,
                    signature_dim=self.dim if self._edges is None else len(self._edges))
        self.options = o
        self.on_score = on_score
        # frame k is tested for a cut once flash_frames + 1 frames follow it, and decided for good once
        # gradual_window more frames have been tested
        self.lookahead = o.flash_frames + 2 + o.gradual_window
        # the longest stretch a transition reaches back from the frame being decided (a fade: out, black, in)
        self.reach = 3 * o.max_gradual + 2 * o.gradual_window + 8
        self.capacity = max(o.window, self.reach + self.lookahead + o.batch_size + 2)
        self._prep = getattr(encoder, "preprocess", None)
        self._fast = self._prep is not None and hasattr(encoder, "encode_preprocessed")
        self._inputs = InputBuffer(self._prep, o.batch_size) if self._fast else None
        self._history = FrameHistory(self.capacity, self.dim, o.signature_dim, o.thumb_size, window=o.window,
                                     top_dims=o.top_dims, refresh=o.refresh)
        self._cuts = CutTest(self._history, o, self.capacity)
        self._fades = FadeDetector(self._history, o)
        self._dissolves = DissolveDetector(self._history, o)
        self._shot_sigs = np.zeros((o.max_shots, o.signature_dim), np.float32)
        self._shot_hists = np.zeros((o.max_shots, HS_BINS[0] * HS_BINS[1]), np.float32)
        self._shot_ids = np.full(o.max_shots, -1, np.int64)
        self._gate = Gate(o)  # which frames go through the network; holds the prepared frames until ingested
        self.reset()

    def __getattr__(self, name: str):
        # the options read as attributes (comparator.window is comparator.options.window)
        if name in OPTION_NAMES and "options" in self.__dict__:
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- public API ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the stream (buffers, anchor, shots): the next frame is frame 0 of a new stream."""
        self._history.reset()
        self._cuts.reset()
        self._fades.reset()
        self._dissolves.reset()
        self._shot_ids[:] = -1
        self._shot_count = 0
        self._gate.reset()
        self._frames_in = 0
        self._cursor1 = 0  # next frame to test for a cut / flash
        self._cursor = 0  # next frame to decide for good
        self._anchor = None
        self._shot_start = 0
        self._shot_start_time = None
        self._shot_sum = np.zeros(self.options.signature_dim, np.float64)  # the shot's frames evicted so far
        self._shot_hist = np.zeros(HS_BINS[0] * HS_BINS[1], np.float64)  # ... their hue-saturation histogram
        self._shot_n = 0
        self._sig_total = np.zeros(self.options.signature_dim, np.float64)  # every decided frame: the stream's mean
        self._sig_frames = 0
        self._last = None  # the last transition emitted
        # frames in, frames through the network, and the seconds spent per stage (summed over threads: the
        # stages overlap in ``run``, where decode and preprocess run on their own thread and the network on
        # the workers)
        self.stats = {"frames": 0, "frames_embedded": 0, "decode_seconds": 0.0, "preprocess_seconds": 0.0,
                      "gate_seconds": 0.0, "network_seconds": 0.0, "compare_seconds": 0.0}

    @property
    def latency(self) -> int:
        """Frames an event may wait after its frame arrived through ``process_frame``: the batch, the gate's
        look-back (0 with ``every_frame``) and the lookahead (``run`` with several workers adds a batch per
        worker)."""
        return self.options.batch_size + self._gate.delay + self.lookahead

    def buffer_sizes(self) -> dict:
        """What each internal buffer holds now and its cap: ``{name: (held, cap)}`` (the memory bound)."""
        h = self._history
        return {
            "frames_held": (min(h.end, self.capacity), self.capacity),
            "pending_frames": (len(self._gate.held), self._gate.cap),  # prepared, not yet ingested (the gate)
            "undecided_frames": (h.end - self._cursor, self.capacity),
            "shot_signatures": (int((self._shot_ids >= 0).sum()), self.options.max_shots),
            "cut_marks": (len(self._cuts.marks), self.capacity),
            "barriers": (len(self._cuts.barriers), self.capacity),
        }

    def process_frame(self, frame: np.ndarray, t: float | None = None) -> list[Event]:
        """Add one uint8 RGB (H, W, 3) frame (``t``: its timestamp in seconds, optional); return new events."""
        t0 = time.perf_counter()
        item = self.prepare(frame)
        self.stats["preprocess_seconds"] += time.perf_counter() - t0
        return self.process_prepared(item, t)

    def prepare(self, frame: np.ndarray) -> PreparedFrame:
        """Validate and preprocess one frame (no state touched: ``run`` calls it on its decode thread)."""
        import cv2

        a = np.asarray(frame)
        if a.dtype != np.uint8:
            raise InputError(f"frames must be uint8 RGB, got dtype {a.dtype} with shape {a.shape}")
        if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
            raise InputError(f"a frame must have shape (H, W, 3) (uint8 RGB), got {a.shape}")
        small = a if self._prep is None else self._prep.resize_crop(a)  # the network's view, uint8
        ts = self.options.thumb_size
        thumb = cv2.resize(small, (ts, ts), interpolation=cv2.INTER_AREA).astype(np.float32)
        # the whole frame too, uncropped: a wipe or push shows its edge entering from the side the crop leaves out
        # (128 x 128: a linear resize to 256 x 256 first, then area: about a quarter of an area resize's time at
        # 480 x 270; then block means of it: 32 x 32, 16 rows x 128 columns, 128 x 16)
        f2 = 2 * STRIP[1]
        fine = cv2.resize(cv2.resize(a, (f2, f2), interpolation=cv2.INTER_LINEAR), (STRIP[1], STRIP[1]),
                          interpolation=cv2.INTER_AREA).astype(np.float32)
        whole = cv2.resize(fine, (WHOLE, WHOLE), interpolation=cv2.INTER_AREA)
        cols = cv2.resize(fine, STRIP[::-1], interpolation=cv2.INTER_AREA)  # (16, 128, 3)
        rows = cv2.resize(fine, STRIP, interpolation=cv2.INTER_AREA)  # (128, 16, 3)
        # normalised when embedded (batch.InputBuffer)
        return PreparedFrame(small, float(thumb.mean()), thumb, whole=whole, cols=cols, rows=rows)

    def process_prepared(self, item: PreparedFrame, t: float | None = None) -> list[Event]:
        """Add a frame that went through ``prepare``."""
        self._admit(item, t)
        self._pump()
        return self._drain()

    def flush(self) -> list[Event]:
        """The end of the stream: embed what is buffered, decide the last frames, close the last shot; reset."""
        t0 = time.perf_counter()
        self._gate.end()
        self.stats["gate_seconds"] += time.perf_counter() - t0
        self._pump()
        events = self._drain()
        t0 = time.perf_counter()
        events += self._advance(final=True)
        if self._history.end > 0:
            events.append(self._close_shot(self._history.end - 1))
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
        stream starts at frame 0. A video file whose decoder ends before the frame count its container lists
        is warned about (``RuntimeWarning``).
        """
        return events_of(self, source, max_frames=max_frames, fps=fps, prefetch=prefetch, workers=workers)

    # -- embedding (``pipeline.events_of`` drives these too) -----------------------------------------------
    def _admit(self, item: PreparedFrame, t: float | None) -> None:
        """Hand a prepared frame with its timestamp to the gate. Checks ``item`` and ``t`` first, so a refused
        frame changes nothing."""
        if not isinstance(item, PreparedFrame):
            got = f"a {len(item)}-tuple" if isinstance(item, tuple) else type(item).__name__
            raise InputError(f"process_prepared takes what prepare(frame) returned (a PreparedFrame), got {got}")
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not np.isfinite(t):
                raise InputError(f"a frame's timestamp t must be a finite number of seconds or None, got {t!r}")
            t = float(t)
        t0 = time.perf_counter()
        self._gate.push(PreparedFrame(item.net, item.luma, item.thumb, t, item.whole, item.cols, item.rows))
        self._frames_in += 1
        self.stats["frames"] = self._frames_in
        self.stats["gate_seconds"] += time.perf_counter() - t0

    def _take(self) -> list[list[Slot]]:
        """The batches the gate wants embedded now."""
        t0 = time.perf_counter()
        batches = self._gate.take(self.options.batch_size)
        self.stats["gate_seconds"] += time.perf_counter() - t0
        return batches

    def _encode(self, batch: list[Slot]) -> tuple[np.ndarray, float, float]:
        """Embed a batch (thread-safe: no comparator state touched); returns (embeddings, seconds normalising,
        seconds in the network)."""
        t0 = time.perf_counter()
        nets = [s.frame.net for s in batch]
        if self._fast:
            x = self._inputs.fill(nets)
            t1 = time.perf_counter()
            x = self.encoder.encode_preprocessed(x)
        else:
            t1 = t0
            x = self.encoder.encode(nets)
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (len(batch), self.dim):
            raise InputError(f"the encoder returned shape {x.shape}, expected ({len(batch)}, {self.dim})")
        return x, t1 - t0, time.perf_counter() - t1

    def _put(self, batch: list[Slot], x: np.ndarray, prep_seconds: float, net_seconds: float) -> None:
        """A batch's embeddings back to the gate."""
        self.stats["preprocess_seconds"] += prep_seconds
        self.stats["network_seconds"] += net_seconds
        self.stats["frames_embedded"] += len(batch)
        t0 = time.perf_counter()
        self._gate.put(batch, x)
        self.stats["gate_seconds"] += time.perf_counter() - t0

    def _pump(self) -> None:
        """Embed, on this thread, every batch the gate asks for, until it asks for none."""
        while True:
            batches = self._take()
            if not batches:
                return
            for batch in batches:
                self._put(batch, *self._encode(batch))

    def _drain(self) -> list[Event]:
        """Ingest what the gate releases, in frame order, and make every decision it allows."""
        t0 = time.perf_counter()
        ready = self._gate.release()
        t1 = time.perf_counter()
        self.stats["gate_seconds"] += t1 - t0
        if not ready:
            return []
        x = np.stack([e for _, e, _ in ready])
        for (frame, _, real), row, sig in zip(ready, x, pool(x, self._edges)):
            self._ingest(row, sig, frame, real)
        events = self._advance(final=False)
        self.stats["compare_seconds"] += time.perf_counter() - t1
        return events

    def _ingest(self, x: np.ndarray, sig: np.ndarray, frame: PreparedFrame, embedded: bool = True) -> None:
        h = self._history
        gone = h.end - self.capacity  # the frame overwritten now: it can only belong to the current shot
        if gone >= 0 and gone >= self._shot_start and not h.outlier[gone]:
            self._shot_sum += h.sig[gone]
            self._shot_hist += hue_saturation(h.whole.take([gone]))
            self._shot_n += 1
        i = h.append(x, sig, frame, embedded)
        if i == self._shot_start:
            self._shot_start_time = frame.time
        if self._anchor is None:
            self._anchor = x.copy()

    # -- decisions -----------------------------------------------------------------------------------------
    def _advance(self, *, final: bool) -> list[Event]:
        n = self._history.end
        while self._cursor1 < n and (final or self._cursor1 + self.options.flash_frames + 1 < n):
            self._cuts.test(self._cursor1, n)
            self._cursor1 += 1
        events: list[Event] = []
        while self._cursor < self._cursor1 and (final or self._cursor + self.options.gradual_window < self._cursor1):
            events += self._decide(self._cursor, final)
            self._cursor += 1
        return events

    def _decide(self, k: int, final: bool) -> list[Event]:
        """Stage 2, in frame order: fades, cuts, dissolves, the anchor, the frame's scores."""
        h, events = self._history, []
        self._cuts.forget_before(k - self.reach)
        p = h.valid_before(k)
        c_k = 0.0 if p is None else 1.0 - h.sim(p, k)
        is_cut = self._cuts.take(k)
        outlier = bool(h.outlier[k])
        last_frame = final and k == h.end - 1
        if not outlier:
            fade, taken = self._fades.step(k, c_k, self._shot_start)
            if fade is not None:
                events += self._emit(fade)
            if is_cut and not taken:
                events += self._emit(h.transition("cut", k, k, c_k))
        g = 0.0 if is_cut else self._dissolves.signal(k, self._shot_start, self._cuts.barriers)
        if not outlier:
            for dissolve in self._dissolves.step(k, g, last_frame=last_frame, shot_start=self._shot_start,
                                                 barriers=self._cuts.barriers, in_fade=self._fades.fade is not None):
                events += self._emit(dissolve)
        if last_frame and self._fades.fade is not None:
            fade = self._fades.finish(self._shot_start)
            if fade is not None:
                events += self._emit(fade)
        # the published demo's anchor: the frame that starts the shot, renewed when the similarity falls low
        a = cos(h.sel(self._anchor), h.sel(h.emb[k]))
        if not outlier:
            if a < self.options.anchor_threshold:
                self._anchor = h.emb[k].copy()
            self._sig_total += h.sig[k]
            self._sig_frames += 1
        if self.on_score is not None:
            self.on_score(FrameScore(index=k, time=h.time_at(k), similarity=1.0 - c_k, anchor_similarity=a,
                                     gradual=g, outlier=outlier, embedded=bool(h.embedded[k])))
        return events

    # -- shots ---------------------------------------------------------------------------------------------
    def _emit(self, tr: Transition) -> list[Event]:
        """A transition ends the current shot and opens the next: [the shot, the transition], or [] when it
        comes too close to the previous transition or to the start of the shot."""
        if self._last is not None and tr.first <= self._last.last + self.options.min_gap:
            return []  # too close to the previous transition
        if tr.first <= self._shot_start:
            return []
        shot = self._close_shot(tr.first - 1)
        self._last = tr
        self._open_shot(tr.first if tr.type == "cut" else tr.last + 1)
        return [shot, tr]

    def _open_shot(self, start: int) -> None:
        h = self._history
        self._shot_start = start
        self._shot_start_time = h.time_at(start) if start < h.end else None
        self._shot_sum = np.zeros(self.options.signature_dim, np.float64)
        self._shot_hist = np.zeros(HS_BINS[0] * HS_BINS[1], np.float64)
        self._shot_n = 0
        if start < h.end:
            self._anchor = h.emb[start].copy()

    def _close_shot(self, end: int) -> Shot:
        """The current shot ends at frame ``end``: its signature, whether it recurs, its event.

        An earlier shot is the same scene when both tests pass: the mean embeddings (signatures), once the
        stream's mean is removed, have a cosine of at least ``recur_threshold``, and the colours of their whole
        frames agree (Bhattacharyya coefficient of their hue-saturation histograms at least ``recur_colour``:
        the same scene filmed again keeps its palette wherever the camera points, while different scenes of a
        kind, two fungi or two streets, show other colours). Of the earlier shots that pass, the one whose
        colours agree best is named."""
        h, start = self._history, self._shot_start
        total, count = self._shot_sum.copy(), self._shot_n
        hist = self._shot_hist.copy()
        idx = [j for j in range(max(start, h.sig.start), end + 1) if not h.outlier[j]]
        if idx:
            total += h.sig.take(idx).sum(axis=0)
            hist += hue_saturation(h.whole.take(idx))
            count += len(idx)
        sig = (total / max(count, 1)).astype(np.float32)
        hist = (hist / max(hist.sum(), 1e-12)).astype(np.float32)
        best, best_id = -2.0, None
        held = self._shot_ids >= 0
        if held.any() and count:
            # compared once the mean of every frame so far is removed: what all shots share does not count
            mu = (self._sig_total / max(self._sig_frames, 1)).astype(np.float32)
            sigs = self._shot_sigs[held] - mu
            mine = sig - mu
            cosines = matmul(sigs, mine) / np.maximum(np.linalg.norm(sigs, axis=1) * float(np.linalg.norm(mine)),
                                                      1e-12)
            colours = np.sqrt(self._shot_hists[held] * hist).sum(axis=1)  # Bhattacharyya coefficients
            ok = (cosines >= self.options.recur_threshold) & (colours >= self.options.recur_colour)
            if ok.any():
                j = int(np.argmax(np.where(ok, colours, -1.0)))
                best, best_id = float(cosines[j]), int(self._shot_ids[held][j])
        index = self._shot_count
        slot = index % self.options.max_shots  # the oldest signature gives way
        self._shot_sigs[slot] = sig
        self._shot_hists[slot] = hist
        self._shot_ids[slot] = index
        self._shot_count += 1
        recur = best_id
        return Shot(index=index, start=int(start), end=int(end), recurs_with=recur,
                    recurrence_score=None if recur is None else round(best, 6), start_time=self._shot_start_time,
                    end_time=h.time_at(end))


def detect(source, encoder, *, max_frames: int | None = None, workers: int = 1, **options) -> list[Event]:
    """Every event of a video file, camera index or iterable of frames, in one call (``StreamComparator.run``;
    ``options`` go to ``StreamComparator``)."""
    return list(StreamComparator(encoder, **options).run(source, max_frames=max_frames, workers=workers))
