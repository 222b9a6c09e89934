"""The cut test: hard cuts, and the flashes / occlusions that would pass for two cuts."""

from __future__ import annotations

from collections import deque

import numpy as np

from engine.stream.frames import FrameHistory
from engine.stream.options import StreamOptions


# A relit frame's brightness or contrast differs from the frame before's by at least this factor (a lamp switched
# on: 1.6, less where the picture clips at white); below it, two frames that correlate are left to the other tests
LIGHT_STEP = 1.2


def relit(a: np.ndarray, b: np.ndarray, least: float) -> bool:
    """Whether thumbnail ``b`` shows ``a``'s picture under other lighting: its brightness (mean) or contrast
    (standard deviation) changed by ``LIGHT_STEP`` times or more, and the two, each brightness and contrast
    normalised (Pearson correlation over pixels and channels), correlate by ``least`` or more.

    On the benchmark videos the 28 true cuts correlate by 0.29 at most, four lighting steps (x1.6, x1/1.6) by
    0.88..1.00, and neighbouring frames of a shot by 0.35 or more (fast motion)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    ma, mb, sa, sb = a.mean(), b.mean(), a.std(), b.std()
    if min(ma, mb, sa, sb) <= 1e-6:
        return False  # a plain frame (black): fades and cuts into black are not relighting
    if max(ma / mb, mb / ma, sa / sb, sb / sa) < LIGHT_STEP:
        return False
    return float(((a - ma) * (b - mb)).mean() / (sa * sb)) >= least


class CutTest:
    """Stage 1 of the decisions, run on frame k once ``flash_frames + 1`` frames follow it.

    A cut is a frame much less similar to the frame before than its neighbours are to theirs (at least
    ``cut_threshold``, and ``cut_ratio`` times the neighbours' dissimilarity) that also changes the picture in one
    step (thumbnails). When the content before comes back within ``flash_frames`` frames it was a flash or an
    occlusion: those frames are marked outliers in the history, and every later test ignores them.
    """

    def __init__(self, history: FrameHistory, options: StreamOptions, capacity: int):
        self._h = history
        self._o = options
        self.marks: deque = deque()  # frames marked as cuts, not yet decided for good
        self.barriers: deque = deque(maxlen=capacity)  # recent cut frames: windows never reach across one

    def reset(self) -> None:
        self.marks.clear()
        self.barriers.clear()

    def take(self, k: int) -> bool:
        """Whether frame ``k`` (the next one decided, in order) was marked a cut; the mark is used up."""
        if self.marks and self.marks[0] == k:
            self.marks.popleft()
            return True
        return False

    def forget_before(self, k: int) -> None:
        """Barriers before frame ``k`` are too old to stop any window."""
        while self.barriers and self.barriers[0] < k:
            self.barriers.popleft()

    def test(self, k: int, n: int) -> None:
        """Test frame ``k`` (frames up to ``n - 1`` have arrived): mark it a cut, or its flash frames outliers."""
        h, o = self._h, self._o
        if h.outlier[k]:
            return
        p = h.valid_before(k)
        if p is None:
            return  # the first frame emits nothing
        c_k = 1.0 - h.sim(p, k)
        if c_k < o.cut_threshold:
            return
        before = [float(h.c[j]) for j in range(max(h.start + 1, k - 3), k) if not h.outlier[j]]
        after = [float(h.c[j]) for j in range(k + 1, min(n, k + 4))]
        local = max(float(np.median(before)) if before else 0.0, float(np.median(after)) if after else 0.0)
        if c_k < o.cut_ratio * local:
            return  # the neighbours change about as much: motion, not a cut
        for j in range(1, o.flash_frames + 1):  # the content before comes back: a flash or an occlusion
            if k + j >= n:
                break
            d = 1.0 - h.sim(p, k + j)
            # as close as the shot itself moves over the same gap just before (or closer than a cut)
            ref = 1.0 - h.sim(p - j - 1, p) if p - j - 1 >= h.start else 0.0
            if d <= 0.5 * c_k and d < max(o.cut_threshold, 1.5 * ref):
                for m in range(k, k + j):
                    h.outlier[m] = True
                return
        # a hard cut changes the picture in one step; inside a dissolve one step is a small part of the change
        before = [j for j in range(max(h.start, k - 3), k) if not h.outlier[j]]
        after = [j for j in range(k + 1, min(n, k + 4)) if not h.outlier[j]]
        if before and after:
            across = float(np.linalg.norm(h.thumb.take(after).mean(axis=0) - h.thumb.take(before).mean(axis=0)))
            step = float(np.linalg.norm(h.thumb[k] - h.thumb[p]))
            near = [float(np.linalg.norm(h.thumb[j] - h.thumb[j - 1]))
                    for j in before[1:] + after[1:] if j - 1 >= h.start and not h.outlier[j - 1]]
            if step < 0.5 * across or (near and step < 2.0 * float(np.median(near))):
                return
        if relit(h.thumb[p], h.thumb[k], o.light_corr):
            return  # the same picture, brighter or darker: the lighting changed within the shot
        self.marks.append(k)
        self.barriers.append(k)
