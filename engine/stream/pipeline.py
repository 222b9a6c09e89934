"""The threaded pipeline behind ``StreamComparator.run``: frames are decoded and prepared on one thread while
batches go through the network on ``workers`` threads and the comparator decides on the caller's thread."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from engine.errors import InputError
from engine.stream.events import Event
from engine.video import VideoReader


class _Inline:
    """An executor that runs each call at once on the calling thread: the one worker of ``workers=1``."""

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def _one_pass(reader: VideoReader, max_frames: int | None) -> Iterator[np.ndarray]:
    with reader:  # a camera's capture is released at the end too
        yield from reader.frames(max_frames)


def frames_of(source, max_frames: int | None) -> tuple[Iterator[np.ndarray], float | None, VideoReader | None]:
    """(iterator of uint8 RGB frames, frames per second or None, the reader or None) for a video file path, a
    camera index or an iterable of frames."""
    if max_frames is not None and (isinstance(max_frames, bool) or int(max_frames) != max_frames or max_frames < 0):
        raise InputError(f"max_frames must be a non-negative int or None, got {max_frames!r}")
    if isinstance(source, (str, os.PathLike, int, np.integer)) and not isinstance(source, bool):
        # One decoding thread: the comparator decodes on its own thread beside the network, and FFmpeg's frame
        # threads cost more CPU per frame than they save (bench_stream.py: 0.17 vs 0.27 CPU ms on mixed.mp4,
        # 0.40 vs 0.54 on bikes.mp4).
        reader = VideoReader(source, threads=1)
        return _one_pass(reader, max_frames), reader.fps, reader
    try:
        it = iter(source)
    except TypeError:
        raise InputError(f"source must be a video path, a camera index or an iterable of frames, "
                         f"got {type(source).__name__}") from None
    return (it if max_frames is None else itertools.islice(it, int(max_frames))), None, None


def events_of(comp, source, *, max_frames: int | None, fps: float | None, prefetch: int,
              workers: int) -> Iterator[Event]:
    """``StreamComparator.run`` (see there): decode and prepare on a helper thread, embed up to ``workers``
    batches at once (``workers=1``: on this thread), gate and decide here in frame order."""
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise InputError(f"workers must be a positive int, got {workers!r}")
    frames, rate, _ = frames_of(source, max_frames)
    rate = fps or rate
    q: queue.Queue = queue.Queue(maxsize=max(2, int(prefetch)))
    stop = threading.Event()
    done = object()
    spent = {"decode_seconds": 0.0, "preprocess_seconds": 0.0}  # on the decoding thread

    def produce():
        try:
            it = iter(frames)
            i = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                f = next(it, done)
                t1 = time.perf_counter()
                spent["decode_seconds"] += t1 - t0
                if f is done:
                    break
                item = comp.prepare(f)
                spent["preprocess_seconds"] += time.perf_counter() - t1
                q.put((item, i / rate if rate else None))
                i += 1
            q.put(done)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which raises it)
            q.put(e)

    # batches in flight beyond the one being taken in: one per worker keeps every worker busy
    pool, ahead = (_Inline(), 0) if workers == 1 else \
        (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lookalike-embed"), workers)
    inflight: deque = deque()  # (future of (embeddings, seconds, seconds), the batch), in order handed out

    def pump(keep: int) -> None:
        """Hand out the batches the gate asks for; take back the finished ones (waiting while more than
        ``keep`` are in flight), until nothing more comes."""
        while True:
            for batch in comp._take():
                inflight.append((pool.submit(comp._encode, batch), batch))
            if not inflight or (len(inflight) <= keep and not inflight[0][0].done()):
                return
            fut, batch = inflight.popleft()
            comp._put(batch, *fut.result())

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
            comp._admit(*got)
            pump(ahead)
            yield from comp._drain()
        t0 = time.perf_counter()
        comp._gate.end()
        comp.stats["gate_seconds"] += time.perf_counter() - t0
        pump(0)
        yield from comp.flush()
        for k, v in spent.items():
            comp.stats[k] += v
        comp.stats["seconds"] = time.perf_counter() - t_start
        finished = True
    finally:
        if not finished:  # abandoned (the caller stopped iterating) or failed: the next stream starts clean
            comp.reset()
        stop.set()
        while worker.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)
        pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(frames, "close", None)
        if close is not None:
            close()
