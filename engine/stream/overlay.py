"""The frames drawn with their scores as the comparator decides them: ``annotated.mp4`` and the ``--show`` window."""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from engine.errors import LookalikeError
from engine.stream.events import Event, FrameScore, Transition


class Overlay:
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
