"""The dissolve detector: a blend, frame = (1 - a) * P + a * Q, from the content before to the content after.

It looks where the mean embeddings of the ``gradual_window`` frames before and after a point differ, then checks
that stretch on the small colour thumbnails: the straightest long stretch of thumbnails is taken, the content
before and after it must differ by ``gradual_threshold`` (embeddings), its frames must lie near the blends of P
and Q (``blend_residual``), blend the whole picture alike (``blend_spread``) and move from P to Q a little at a
time (``smooth_ratio``). Camera pans and moving objects fail those tests. Where a region holds no dissolve, the
wipe / push test (``wipes.MoveTest``) looks at the same frames; where that finds none either, a dissolve between
two moving shots, which leaves the line from P to Q further, is accepted with a looser blend test
(``moving_residual``, ``moving_spread``) when the colours before and after it differ (``palette_change``: the
hue-saturation histograms of the 8 frames on either side, as another scene's would; motion inside one shot keeps
its palette).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.stream.events import Transition
from engine.stream.frames import FrameHistory, hue_saturation
from engine.stream.options import StreamOptions
from engine.stream.vectors import cos, matmul
from engine.stream.wipes import MoveTest


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


@dataclass(slots=True)
class Region:
    """Where the window means differ, so far."""

    lo: int  # its first frame
    peak: float  # the largest difference in it


class DissolveDetector:
    """Dissolves, decided frame by frame in order (see the module notes). Set ``trace`` to a list to record
    each region's verdict (for tuning); ``reset`` empties it."""

    def __init__(self, history: FrameHistory, options: StreamOptions):
        self._h = history
        self._o = options
        self.region: Region | None = None
        self.trace: list | None = None
        self._moves = MoveTest(history, options)

    def reset(self) -> None:
        self.region = None
        if self.trace is not None:
            self.trace = []

    def signal(self, k: int, shot_start: int, barriers) -> float:
        """Dissimilarity of the mean embeddings of the ``gradual_window`` frames before and after frame ``k``;
        the windows stop at the start of the shot and at cuts (``barriers``)."""
        h, w = self._h, self._o.gradual_window
        lo, hi = max(h.start, shot_start, k - w), min(h.end, k + w)
        for c in barriers:
            if lo < c <= k:
                lo = c
            elif k < c < hi:
                hi = c
        before = [j for j in range(lo, k) if not h.outlier[j]]
        after = [j for j in range(k, hi) if not h.outlier[j]]
        if len(before) < 2 or len(after) < 2:
            return 0.0
        mb = h.sel(h.emb.take(before)).mean(axis=0)
        ma = h.sel(h.emb.take(after)).mean(axis=0)
        return 1.0 - cos(mb, ma)

    def step(self, k: int, g: float, *, last_frame: bool, shot_start: int, barriers, in_fade: bool) -> list[Transition]:
        """Advance over frame ``k`` (not an outlier; ``g``: its ``signal``): the dissolves found where a region
        of differing window means ended, in frame order (``in_fade``: a fade is in progress, which decides)."""
        o, r = self._o, self.region
        if r is None:
            if g >= 0.4 * o.gradual_threshold:
                self.region = Region(lo=k, peak=g)
            return []
        r.peak = max(r.peak, g)
        too_long = k - r.lo > o.max_gradual + 2 * o.gradual_window
        if g >= 0.5 * r.peak and not too_long and not last_frame:
            return []
        self.region = None
        if too_long:
            return self._note(r.lo, k - 1, "too long")
        if in_fade:
            return self._note(r.lo, k - 1, "inside a fade")
        return self._judge(r.lo, k - 1, shot_start, barriers)

    def _judge(self, lo: int, hi: int, shot_start: int, barriers) -> list[Transition]:
        """Look for dissolves where the window means differ, [lo, hi] (and gradual_window frames around)."""
        h, w = self._h, self._o.gradual_window
        first = max(h.start, shot_start, lo - w)
        last = min(h.end - 1, hi + w)
        for c in barriers:  # stay inside one shot: no cut within
            if first < c <= lo:
                first = c
            elif hi < c <= last:
                last = c - 1
        idx = [j for j in range(first, last + 1) if not h.outlier[j]]
        if len(idx) < 8:
            return self._note(lo, hi, "too short")
        found, moving = [], []
        for span in self._straight_spans(idx):
            verdict, detail = self._verdict(span, idx)
            self._note(lo, hi, verdict, **detail)
            if verdict == "dissolve":
                found.append(detail)
            elif verdict == "moving dissolve":
                moving.append(detail)
        if not found and self._o.move_residual > 0:  # no blend: a wipe or a push? (it may start a little before
            # the window means differ: the frames before are read twice as far back; those after stay as they are,
            # the ones that have surely arrived)
            first = max(h.start, shot_start, lo - 2 * w)
            for c in barriers:
                if first < c <= lo:
                    first = c
            verdict, detail = self._moves.find([j for j in range(first, last + 1) if not h.outlier[j]])
            self._note(lo, hi, verdict, **detail)
            if verdict in ("wipe", "push", "slide"):
                found.append({**detail, "move": verdict})
        if not found:  # no clean blend, no wipe or push: a dissolve between moving shots, if the palette changed
            found = moving
        return [h.transition("gradual", d["first"], d["last"], d["change"], move=d.get("move"))
                for d in sorted(found, key=lambda d: d["first"])]

    def _note(self, lo: int, hi: int, verdict: str, **detail) -> list:
        if self.trace is not None:
            self.trace.append({"region": (lo, hi), "verdict": verdict, **detail})
        return []

    def _straight_spans(self, idx: list, most: int = 5) -> list[tuple]:
        """Up to ``most`` disjoint spans along which the thumbnails move furthest in the straightest line.

        A dissolve is a straight line in pixel space: frame ``(1 - a) * P + a * Q``. The thumbnails of ``idx``
        are smoothed (3-frame running mean, against noise); a span from smoothed point i to j scores
        ``chord^2 / path`` (the distance covered times its straightness ``chord / path``), the best span of
        each start is kept, and a kept span grows at either end while each added step is itself at least
        ``straightness`` straight (a dissolve starts and ends slowly). Returns (first, last, straightness).
        """
        h, o = self._h, self._o
        X = h.thumb.take(idx).reshape(len(idx), -1).astype(np.float64)
        M = (X[:-2] + X[1:-1] + X[2:]) / 3.0  # row r is centred on frame idx[r + 1]
        frames = np.asarray(idx[1:-1])
        m = len(M)
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(M, axis=0), axis=1))])
        sq = (M * M).sum(axis=1)
        chord = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * matmul(M, M.T), 0.0))  # (m, m)
        path = np.maximum(cum[None, :] - cum[:, None], 1e-12)  # path[i, j]: from point i to point j
        gap = np.arange(m)[None, :] - np.arange(m)[:, None]
        score = np.where((gap >= 2) & (gap <= o.max_gradual + 2), chord * chord / path, -1.0)
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
                    if chord[i2, j2] - chord[i, j] >= o.straightness * (path[i2, j2] - path[i, j]):
                        i, j, grown = i2, j2, True
            spans.append((int(frames[i]) + 1, int(frames[j]) - 1, float(chord[i, j] / path[i, j])))
            score[max(0, i - 1) : j + 1, :] = -1.0  # later spans stay clear of this one
            score[:, max(0, i - 1) : j + 1] = -1.0
            score[: max(0, i - 1), j + 1 :] = -1.0
        return spans

    def _verdict(self, span: tuple, idx: list) -> tuple[str, dict]:
        """Test one span (first, last, straightness): does the content change, and as a blend of P and Q?"""
        h, o = self._h, self._o
        a, b, eff = span
        first, last = idx[0], idx[-1]
        detail = {"first": a, "last": b, "straightness": round(eff, 4)}
        if b - a + 1 < 2:
            return "too short", detail
        if a <= first or b >= last:
            return "no context", detail
        around = h.luma.take(np.arange(max(h.start, a - 2), min(h.end, b + o.gradual_window)))
        if float(around.min()) <= o.dark_threshold or float(around.max()) >= 255.0 - o.dark_threshold:
            return "through black", detail  # (or white) the fade test decides
        lo, hi = max(first, a - 3), min(last + 1, b + 4)
        pb = hue_saturation(h.whole.take([j for j in range(max(first, a - 8), a) if not h.outlier[j]] or [a - 1]))
        pa = hue_saturation(h.whole.take([j for j in range(b + 1, min(last + 1, b + 9)) if not h.outlier[j]] or [b + 1]))
        detail["palette"] = round(float(np.sqrt(pb / pb.sum() * pa / pa.sum()).sum()), 4)
        change = 1.0 - cos(h.sel(h.window_mean(lo, a)), h.sel(h.window_mean(b + 1, hi)))
        detail["change"] = round(change, 6)
        if change < o.gradual_threshold:
            return "small change", detail  # the content after is much like the content before
        if eff < o.straightness:
            return "winding", detail
        P = h.window_mean(lo, a, h.thumb)
        Q = h.window_mean(b + 1, hi, h.thumb)
        D = Q - P
        dd = float((D * D).sum())
        if dd <= 0.0:
            return "no change", detail
        span_idx = [j for j in range(max(first, a - 1), min(last, b + 1) + 1) if not h.outlier[j]]
        X = h.thumb.take(span_idx) - P  # (m, s, s, 3)
        lam = matmul(X.reshape(len(X), -1), D.ravel()) / dd  # how far each frame went from P to Q
        resid = np.linalg.norm(X.reshape(len(X), -1) - np.outer(lam, D.ravel()), axis=1) / math.sqrt(dd)
        inner = [r for j, r in zip(span_idx, resid) if a <= j <= b]
        detail["residual"] = round(float(np.median(inner)), 4)
        detail["step"] = round(float(np.abs(np.diff(lam)).max()), 4)
        mids = [x for x, l, j in zip(X, lam, span_idx) if a <= j <= b and 0.25 <= l <= 0.75]
        detail["spread"] = round(float(np.mean([_block_spread(x, D, 4) for x in mids])), 4) if mids else None
        if detail["step"] > o.smooth_ratio:
            return "abrupt", detail  # one frame carries much of the change: fast motion
        spread = 0.0 if detail["spread"] is None else detail["spread"]
        if detail["residual"] <= o.blend_residual and spread <= o.blend_spread:
            return "dissolve", detail
        # Two moving shots blended leave the line from P to Q too. Where the palette changes (the colours before
        # and after differ as another scene's do), a looser blend suffices; motion inside one shot keeps its
        # palette.
        if (detail["palette"] <= o.palette_change and detail["residual"] <= o.moving_residual
                and spread <= o.moving_spread):
            return "moving dissolve", detail  # taken where no clean dissolve, wipe or push is found
        if detail["residual"] > o.blend_residual:
            return "not a blend", detail  # the frames leave the line from P to Q: motion, a pan
        return "uneven blend", detail  # parts of the picture change at different times: motion

