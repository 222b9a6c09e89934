"""Wipes and pushes: the new shot takes the picture over behind a straight edge that crosses it steadily.

While a wipe, push or slide runs, every frame is a composite of two pictures, the last frame before it (P) and the
first after it (Q), split by an edge across the picture (a column, after turning the picture so that the edge
moves left to right): left of the edge Q, right of it P. A wipe keeps both in place; a push moves both with the
edge (Q enters, P leaves); a slide moves Q in over P. On 16 x 16 colour thumbnails of the whole frames (the
network's centre crop would hide the edge's first and last frames, and the parts a push brings in), for every
stretch of frames between a P and a Q the test fits, frame by frame, the edge position of each kind and direction
(three probe frames first, which rule out most stretches cheaply) and asks that

- the composites explain the frames (``move_residual``: the fit's squared error over |Q - P|^2),
- far better than any blend of P and Q does (``BLEND_RATIO``: a wipe's half-way frame is 0 off its composite and
  1/4 of |Q - P|^2 off the best blend; motion, which neither explains, fits both about alike),
- the edge moves one way, from near one side of the picture to near the other, never half of it in one frame,
- the picture is torn along the edge (``TEAR``, on strips of the whole frame 128 px fine along the edge's way: two
  unrelated pictures meet there along its whole length; a pan across one wide picture, which a push of its two
  halves copies exactly, is continuous there),
- the content after differs from the content before as much as across a dissolve (``gradual_threshold``).

On the benchmark videos (issue 15) the 14 true wipes, pushes and slides fit with residual <= 0.18, <= 0.6 of the
blend's error, tear >= 18; the moving shots around the other transitions fit 0.13-0.24, 0.69-1.06 of the blend, and
the exact one-width pans of mixed.mp4 and tests/test_stream.py (pushes to the pixel at 16 px) tear 3.8-13.2: the
test's pan has a strong upright edge in the middle of its wide picture, where a push's edge would be, so that
margin is narrow (13.2 against 18.6). The longest stretch that passes is taken. The benchmark's wipes have hard
edges; a feathered edge tears less.

It runs where the dissolve test (``DissolveDetector``) found a region of changing content and no dissolve in it.
"""

from __future__ import annotations

import numpy as np

from engine.stream.frames import FrameHistory
from engine.stream.options import StreamOptions
from engine.stream.vectors import cos, matmul

DIRECTIONS = ("lr", "rl", "tb", "bt")
# the least tear: the jump across the edge (the largest within a coarse column of where the fit puts it, on the
# whole frame 128 px fine along the edge's way), over each row's median jump between neighbouring columns, median
# over the rows and then over the frames: an edge across the whole picture between two pictures, not the edge of
# something in one
TEAR = 16.0
# the most a composite's error may be of the best blend's (a wipe's half-way frame: 0 against 1/4 of |Q - P|^2)
BLEND_RATIO = 0.65
KINDS = ("wipe", "push", "slide")


def turn(T: np.ndarray, d: str) -> np.ndarray:
    """Frames (n, h, w, 3) turned so that an edge moving in direction ``d`` moves left to right."""
    if d == "lr":
        return T
    if d == "rl":
        return T[:, :, ::-1]
    if d == "tb":
        return T.transpose(0, 2, 1, 3)
    if d == "bt":
        return T[:, ::-1].transpose(0, 2, 1, 3)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {d!r}")


def _tables(E: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The composites' errors, by kind: (A, B), both (n, n, C + 1), such that the squared error of frame j as the
    composite of P = frame p and Q = frame q with the edge after s columns is ``A[j, q, s] + B[j, p, s]``.

    ``E[j, c, r, c']`` is the squared distance between column c of frame j and column c' of frame r. Left of the
    edge (c < s) the composite shows Q's column c (a wipe: Q in place) or Q's column c + C - s (push, slide: Q
    moved in with the edge), a diagonal of E; right of it P's column c (wipe, slide) or c - s (push: P moved out
    ahead of the edge).
    """
    n, C = E.shape[0], E.shape[1]
    same = np.diagonal(E, axis1=1, axis2=3)  # (n, n, C): E[j, c, r, c]
    cum = np.concatenate([np.zeros((n, n, 1), E.dtype), np.cumsum(same, axis=2)], axis=2)  # sum over c < s
    rest = cum[:, :, -1:] - cum  # sum over c >= s
    moved_in = np.zeros((n, n, C + 1), E.dtype)  # Q's last s columns in the first s
    moved_out = np.zeros((n, n, C + 1), E.dtype)  # P's first C - s columns in the last C - s
    for k in range(1, C + 1):
        moved_in[:, :, k] = np.diagonal(E, offset=C - k, axis1=1, axis2=3).sum(axis=2)
    for k in range(C):
        moved_out[:, :, k] = np.diagonal(E, offset=-k, axis1=1, axis2=3).sum(axis=2)
    return {"wipe": (cum, rest), "push": (moved_in, moved_out), "slide": (moved_in, rest)}


class MoveTest:
    """Finds a wipe / push / slide among frames of one shot boundary region (see the module notes)."""

    def __init__(self, history: FrameHistory, options: StreamOptions):
        self._h = history
        self._o = options

    def find(self, idx: list[int]) -> tuple[str, dict]:
        """The wipe / push / slide among the frames ``idx`` (of one shot boundary region): (its kind, or why
        none, and a detail dict with first, last, direction, residual, tear, change)."""
        h, o = self._h, self._o
        idx = [j for j in idx if not h.outlier[j]]
        n = len(idx)
        if n < 5:
            return "too short", {}
        # the content at the window's ends must differ as across a transition (the cheap check first)
        if 1.0 - cos(h.sel(h.window_mean(idx[0], idx[0] + 3)), h.sel(h.window_mean(idx[-1] - 2, idx[-1] + 1))) \
                < o.gradual_threshold:
            return "small change", {}
        fine = h.whole.take(idx).astype(np.float32)  # (n, 32, 32, 3): the whole frames, uncropped
        w2 = fine.shape[1] // 2
        T = fine[:, : 2 * w2, : 2 * w2].reshape(n, w2, 2, w2, 2, 3).mean(axis=(2, 4))  # (n, 16, 16, 3): the fit's
        C = T.shape[2]
        flat = T.reshape(n, -1)
        fsq = (flat * flat).sum(axis=1)
        dist = np.maximum(fsq[:, None] + fsq[None, :] - 2.0 * matmul(flat, flat.T), 0.0)  # (n, n) squared distances
        frames = np.asarray(idx)
        # the candidate stretches: P at position p, Q at q, the frames strictly between them consecutive
        pp, qq = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        ok = (qq - pp >= 3) & (qq - pp <= o.max_gradual + 1) & (frames[qq] - frames[pp] == qq - pp)
        ok &= dist > 0.0
        pp, qq = pp[ok], qq[ok]
        # three probes per stretch (a quarter, half and three quarters of the way): most stretches fail on them
        probes = [pp + np.maximum(1, (qq - pp) * f // 4) for f in (1, 2, 3)]
        D = flat[qq] - flat[pp]  # (K, F)
        dd = dist[pp, qq]
        Xm = flat[probes[1]] - flat[pp]
        blend_mid = np.maximum((Xm * Xm).sum(axis=1) - (Xm * D).sum(axis=1) ** 2 / dd, 1e-6)
        found = []  # (frames, -residual, verdict, detail)
        for d in DIRECTIONS:
            X = turn(T, d)  # (n, C, C, 3): rows, columns (the edge moves along the columns)
            cols = X.transpose(0, 2, 1, 3).reshape(n * C, -1)  # every column of every frame
            sq = (cols * cols).sum(axis=1)
            E = np.maximum(sq[:, None] + sq[None, :] - 2.0 * matmul(cols, cols.T), 0.0).reshape(n, C, n, C)
            strip = turn(h.cols.take(idx) if d in ("lr", "rl") else h.rows.take(idx), d)  # (n, 16, 128, 3)
            jump = ((strip[:, :, 1:] - strip[:, :, :-1]) ** 2).sum(axis=3)  # (n, 16, 127): across each fine edge
            jump = np.median(jump / np.maximum(np.median(jump, axis=2, keepdims=True), 1e-6), axis=1)  # (n, 127)
            for kind, (A, B) in _tables(E).items():
                # the middle probe first, then the others on the stretches it kept
                sel = np.arange(len(pp))
                edges = {}
                for i in (1, 0, 2):
                    err = A[probes[i][sel], qq[sel]] + B[probes[i][sel], pp[sel]]  # (K, C + 1)
                    e = err.min(axis=1)
                    ok = e <= o.move_residual * dd[sel]
                    if i == 1:  # no closer to any blend of P and Q (the full test asks BLEND_RATIO of the median)
                        ok &= e <= blend_mid[sel]
                    sel = sel[ok]
                    edges = {k: v[ok] for k, v in edges.items()}
                    edges[i] = err.argmin(axis=1)[ok]
                    if not len(sel):
                        break
                if not len(sel):
                    continue
                keep = sel[(edges[0] <= edges[1]) & (edges[1] <= edges[2]) & (edges[2] > edges[0])]
                for k in keep[np.argsort(pp[keep] - qq[keep], kind="stable")]:  # the longest first
                    if found and qq[k] - pp[k] - 1 < max(f[0] for f in found):
                        break  # shorter than one that passed: it cannot be taken
                    got = self._fit(A, B, jump, flat, float(dd[k]), int(pp[k]), int(qq[k]), C)
                    if got is not None:
                        a, b = idx[pp[k] + 1], idx[qq[k] - 1]
                        found.append((b - a + 1, -got["residual"], kind,
                                      {"first": a, "last": b, "direction": d, **got}))
        if not found:
            return "no edge", {}
        _, _, kind, detail = max(found, key=lambda f: (f[0], f[1]))  # the longest stretch, then the best fit
        a, b = detail["first"], detail["last"]
        lo, hi = max(idx[0], a - 3), min(idx[-1] + 1, b + 4)
        detail["change"] = round(1.0 - cos(h.sel(h.window_mean(lo, a)), h.sel(h.window_mean(b + 1, hi))), 6)
        if detail["change"] < o.gradual_threshold:
            return "small change", detail
        return kind, detail

    def _fit(self, A, B, jump, flat, dd: float, p: int, q: int, C: int) -> dict | None:
        """The frames strictly between positions p and q as composites of frame p and frame q (one kind, one
        direction): their fit when every check passes, else None."""
        o = self._o
        js = np.arange(p + 1, q)
        m = len(js)
        err = A[js, q] + B[js, p]  # (m, C + 1)
        s = err.argmin(axis=1)
        best = err[np.arange(m), s]
        resid = float(np.median(best)) / dd
        if resid > o.move_residual:
            return None
        # every frame shows both pictures, and the edge crosses the picture one way, steadily
        if s.min() <= 0 or s.max() >= C or s[0] > 0.4 * C or s[-1] < 0.6 * C:
            return None
        steps = np.diff(s)
        if np.any(steps < -1) or (len(steps) and steps.max() > 0.5 * C):
            return None
        # far better than any blend of P and Q (a dissolve; motion, which neither explains, fits both alike):
        # the error of the best blend, |X|^2 - <X, D>^2 / |D|^2 with X the frame minus P, D = Q - P
        X = flat[js] - flat[p]
        D = flat[q] - flat[p]
        blend = np.maximum((X * X).sum(axis=1) - matmul(X, D) ** 2 / dd, 1e-6)
        if float(np.median(best / blend)) > BLEND_RATIO:
            return None
        # torn along the edge: the jump across the edge's column is well above the frame's typical one
        f = jump.shape[1] + 1  # fine positions
        tear = float(np.median([jump[j, max(0, (s[i] - 1) * f // C - 1) : min(f - 1, (s[i] + 1) * f // C)].max()
                                for i, j in enumerate(js)]))
        if tear < TEAR:
            return None
        return {"residual": round(resid, 4), "tear": round(tear, 2),
                "vs_blend": round(float(np.median(best / blend)), 3)}
