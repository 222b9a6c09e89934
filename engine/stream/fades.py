"""The fade detector: the brightness falls steadily into black and / or rises steadily out of it; or, through
white, rises steadily into white and / or falls steadily out of it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.stream.events import Transition
from engine.stream.frames import FrameHistory
from engine.stream.options import StreamOptions
from engine.stream.vectors import cos


def _steady(step: float, steps: list) -> bool:
    """A brightness step that continues a fade: positive, and not much smaller than the fade's steps so far."""
    return step > 0.25 and (not steps or step >= 0.3 * float(np.median(steps)))


@dataclass(slots=True)
class Fade:
    """A fade in progress, from the first black frame on."""

    state: str  # "dark": in the black (or white); "in": coming out of it
    start: int  # where the brightness began to fall (== dark_first when it fell in one step: a cut into black)
    dark_first: int  # first black frame
    dark_last: int  # last black frame so far
    end: int  # last frame of the fade so far
    rises: list = field(default_factory=list)  # brightness steps of the fade in so far
    long: bool = False  # black for max_gradual frames or more: a shot of its own, between a fade out and a fade in
    white: bool = False  # through white: every brightness below is read as 255 minus it


class FadeDetector:
    """Fades, decided frame by frame in order. The brightness alone decides a fade (frames at or below
    ``dark_threshold`` are black, at or above 255 minus it white; a fade through white is read as one through
    black on 255 minus the brightness); the embedding of a darkening frame may jump (a cut mark) on the way, and
    such marks inside a fade are taken by it. The frames that darken and brighten and the black between them
    belong to the transition."""

    def __init__(self, history: FrameHistory, options: StreamOptions):
        self._h = history
        self._o = options
        self.fade: Fade | None = None

    def reset(self) -> None:
        self.fade = None

    def step(self, k: int, c_k: float, shot_start: int) -> tuple[Transition | None, bool]:
        """Advance over frame ``k`` (``c_k``: its dissimilarity with the frame before; the current shot starts at
        ``shot_start``): (a fade transition that ended, or None; whether the fade takes a cut marked at ``k``)."""
        h, o = self._h, self._o
        f = self.fade
        white = f.white if f is not None else float(h.luma[k]) >= 255.0 - o.dark_threshold
        level = self._white_level if white else self._black_level
        luma = level(k)  # how far from black (from white, through white)
        dark = luma <= o.dark_threshold
        if f is None:
            if not dark:
                return None, False
            s, steps = k, []  # walk back over the frames that darken step by step
            while s - 1 > max(h.start, shot_start) and k - s < o.max_gradual and not h.outlier[s - 1]:
                step = level(s - 1) - level(s)
                if not _steady(step, steps):
                    break
                steps.append(step)
                s -= 1
            if k - s < 2:
                s = k  # one darker step is a cut into black, not a fade out
            self.fade = Fade(state="dark", start=s, dark_first=k, dark_last=k, end=k, white=white)
            return None, s < k
        if f.state == "dark":
            if dark:
                f.dark_last = f.end = k
                if not f.long and k - f.dark_first >= o.max_gradual:
                    # a long black stretch is a shot of its own: the fade out (if any) ends where it starts,
                    # and a fade in, if one comes, starts a transition of its own
                    f.long = True
                    if f.dark_first - f.start >= 2:
                        return self._transition(f.start, f.dark_first - 1, shot_start), True
                return None, True
            if c_k >= o.cut_threshold and luma > 2.0 * o.dark_threshold:
                # a cut out of the black: the fade (if it faded out) ends on the frame before
                if f.long:
                    self.fade = None
                    return None, False
                took = f.dark_first - f.start >= 2
                return self.finish(shot_start), took
            f.state, f.end = "in", k
            f.rises.append(luma - level(k - 1))
            return None, True
        rise = luma - level(k - 1)  # fading in while the brightness rises steadily (falls, from white)
        if _steady(rise, f.rises) and k - f.dark_last <= o.max_gradual:
            f.rises.append(rise)
            f.end = k
            return None, True
        return self.finish(shot_start), False

    def _black_level(self, j: int) -> float:
        return float(self._h.luma[j])

    def _white_level(self, j: int) -> float:
        return 255.0 - float(self._h.luma[j])

    def finish(self, shot_start: int) -> Transition | None:
        """End the fade in progress: its transition, or None where it was no fade (black from the start of the
        shot, or plain cuts into and out of black, which the cut test has)."""
        h, f, self.fade = self._h, self.fade, None
        s, e = (f.dark_last + 1, f.end) if f.long else (f.start, f.end)
        faded = e - f.dark_last >= 2 if f.long else (f.dark_first - s >= 2 or e - f.dark_last >= 2)
        if not faded or s <= shot_start or s - 1 < h.start:
            return None
        return self._transition(s, e, shot_start)

    def _transition(self, s: int, e: int, shot_start: int) -> Transition:
        h = self._h
        before = h.window_mean(max(h.start, shot_start, s - 3), s)
        after = h.window_mean(e + 1, min(h.end, e + 4)) if e + 1 < h.end else h.emb[e]
        return h.transition("gradual", s, e, 1.0 - cos(h.sel(before), h.sel(after)), fade=True)
