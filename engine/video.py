"""The project's one video reader: frames of a video file or a camera as uint8 RGB (H, W, 3), read with OpenCV.

``VideoReader(source)`` takes a file path or a camera index (an int, or a string of digits such as ``"0"``).
A file that is missing or that OpenCV cannot open, and a camera that cannot be opened, raise ``VideoOpenError``
naming the source. ``engine.stream`` reads its videos with it, and ``train.data.VideoSource`` is one with
training's defaults.

    with VideoReader("video.mp4") as video:
        print(video.size, video.fps, video.frame_count)
        for frame in video.frames(max_frames=100):
            ...

Each ``frames()`` call over a file starts at frame 0 with a capture of its own (``loop=True`` rewinds at the end
and goes on); a camera's capture is shared by every call until ``close()``. What ends a pass early is warned
about (``RuntimeWarning``), never silent: a camera that stops delivering, a file that delivers no frame on a
looped pass, and a file whose decoder ends before the frame count its container lists (truncated or damaged;
``ended_early`` is then True).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engine.errors import InputError, VideoOpenError
from engine.validate import is_int


def camera_index(source) -> int | None:
    """The camera ``source`` names (an int, or a string of digits such as ``" 0"``), else None (a file path)."""
    if is_int(source):
        return int(source)
    if isinstance(source, str) and source.strip().isdigit():
        return int(source.strip())
    return None


class VideoReader:
    """Frames of a video file or a camera, read with OpenCV, as uint8 RGB (H, W, 3) (see the module notes).

    ``threads``: FFmpeg decoding threads for a file (None: OpenCV's choice). ``size`` is (width, height);
    ``fps`` and ``frame_count`` are None where the container does not say (``frame_count`` always for a camera).
    """

    def __init__(self, source, *, threads: int | None = None):
        import cv2

        cam = camera_index(source)
        self.is_camera = cam is not None
        self.source: str | int = cam if self.is_camera else str(source)
        self.threads = threads
        self._cap = self._open()
        self.size: tuple[int, int] = (int(round(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))),
                                      int(round(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))))
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps: float | None = fps if math.isfinite(fps) and fps > 0 else None
        n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count: int | None = None if self.is_camera or n <= 0 else n
        self.ended_early = False  # a pass ended before frame_count: the decoder found no more (a damaged file)

    def _open(self):
        import cv2

        if not self.is_camera and not Path(self.source).is_file():
            why = "it is a folder" if Path(self.source).is_dir() else "no such file"
            raise VideoOpenError(f"video file not found: {self.source} ({why})")
        cap = None
        if not self.is_camera and self.threads is not None:
            cap = cv2.VideoCapture(self.source, cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, int(self.threads)])
            if not cap.isOpened():  # a backend without that property: open it plainly
                cap.release()
                cap = None
        if cap is None:
            cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            cap.release()
            what = f"camera {self.source}" if self.is_camera else f"video file {self.source}"
            raise VideoOpenError(f"OpenCV could not open {what}"
                                 + ("" if self.is_camera else " (not a video, or a codec OpenCV lacks)"))
        return cap

    def frames(self, max_frames: int | None = None, *, loop: bool = False) -> Iterator[np.ndarray]:
        """Yield uint8 RGB frames: one pass, or round and round a file with ``loop``; at most ``max_frames``."""
        import cv2

        if max_frames is not None and (isinstance(max_frames, bool) or int(max_frames) != max_frames
                                       or max_frames < 0):
            raise InputError(f"max_frames must be a non-negative int or None, got {max_frames!r}")
        done = in_pass = 0
        cap = self._take()
        try:
            while max_frames is None or done < max_frames:
                ok, frame = cap.read()
                if ok and frame is not None:
                    done += 1
                    in_pass += 1
                    yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    continue
                if self.is_camera:
                    warnings.warn(f"camera {self.source} stopped delivering frames after {done} frames; "
                                  f"ending the stream", RuntimeWarning, stacklevel=2)
                    return
                if self.frame_count is not None and in_pass < self.frame_count and not self.ended_early:
                    self.ended_early = True
                    warnings.warn(f"video file {self.source}: the decoder ended after {in_pass} of the "
                                  f"{self.frame_count} frames its container lists (a truncated or damaged file?)",
                                  RuntimeWarning, stacklevel=2)
                if not loop:
                    return
                if in_pass == 0:
                    warnings.warn(f"video file {self.source} delivered no frame on this pass; ending the stream",
                                  RuntimeWarning, stacklevel=2)
                    return
                cap.release()
                cap = self._open()  # reopening rewinds reliably, unlike seeking in some codecs
                in_pass = 0
        finally:
            if self.is_camera:
                self._cap = cap  # a camera is shared by every call until close()
            else:
                cap.release()  # each call over a file owns its capture and starts at frame 0

    def _take(self):
        """The capture opened by the constructor (first call, or always for a camera), else a fresh one."""
        cap = self._cap
        if cap is None:
            return self._open()
        if not self.is_camera:
            self._cap = None
        return cap

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.frames(loop=False)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, size={self.size}, fps={self.fps}, "
                f"frame_count={self.frame_count})")
