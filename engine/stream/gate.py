"""The gate: which frames go through the network, and embeddings for the frames that do not.

The network is most of a frame's cost, and on most frames of a video nothing happens. The gate embeds every
``gate_stride``-th frame (a *key frame*) and, between two key frames, every frame only where something may
happen; the other frames get their embedding interpolated (normalised linear blend) between the embedded frames
around them. Every frame the transition tests may read around a place where something happens is embedded, so
their decisions come out as they do with every frame embedded (``every_frame``: the gate is off). Something may
happen around frame k (each test cheap, on what ``StreamComparator.prepare`` computes for every frame anyway):

- the embeddings of the key frames before and after k differ: 1 - cosine at least ``gate_change`` (content
  changes: cuts, dissolves, fades, fast motion);
- the thumbnail moves in one step more than ``gate_step_ratio`` times the steps of its neighbours (the cut
  test's own thumbnail check, looser: a cut, a flash, something shown for fewer frames than ``gate_stride``);
- the brightness crosses ``dark_threshold`` (fades into and out of black), or 255 minus it (white);

and then every frame from ``before`` frames ahead of it to ``after`` frames past it is embedded (the frames the
cut, flash and dissolve tests read around a frame). Decisions wait for what could still mark a frame: the
thumbnails of the next ``before + 3`` frames and the key frame after them, so a frame leaves the gate at most
``delay`` frames after it came (the look-back buffer holds the prepared, not yet embedded frames).

The gate only keeps the books; ``StreamComparator`` and ``pipeline`` run the network on the batches it asks
for (``take``), hand the embeddings back (``put``) and ingest what it releases (``release``), in frame order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.stream.frames import PreparedFrame
from engine.stream.options import StreamOptions

UNDECIDED, EMBED, SKIP = 0, 1, 2

# The least thumbnail step (root mean square over its pixels, in grey levels) the gate treats as a possible cut.
# A cut or a flash changes the picture far more (40..140 on the benchmark videos' 26 cuts and 4 flashes); the
# steps of noise and motion in a still shot that the other tests pass are 1..13. The step trigger only matters
# where the key frames' embeddings agree: content that leaves and comes back within gate_stride frames.
STEP_FLOOR = 8.0


@dataclass(slots=True)
class Slot:
    """A frame in the gate: the prepared frame, its index, what was decided, its embedding once known."""

    index: int
    frame: PreparedFrame
    state: int = UNDECIDED
    key: bool = False  # a key frame (or the last frame of the stream): embedded whatever happens
    asked: bool = False  # handed out in a batch (``take``)
    emb: np.ndarray | None = None


class Gate:
    """Decides which frames to embed and interpolates the others (see the module notes)."""

    def __init__(self, options: StreamOptions):
        o = options
        self.every_frame = o.every_frame
        self.stride = o.gate_stride
        self.change = o.gate_change
        self.step_ratio = o.gate_step_ratio
        # a cut's step is at least half the change across it (the cut test's check); the gate's is looser
        self.across = 0.45
        # ... and changes the thumbnail by at least STEP_FLOOR grey levels (root mean square)
        self.floor = STEP_FLOOR * float(np.sqrt(3 * o.thumb_size * o.thumb_size))
        self.dark = o.dark_threshold
        # The cut test reads frames k-6..k+4 around a cut at k (flash_frames 4); the dissolve signal the
        # gradual_window frames on either side.
        self.before = max(o.gradual_window, o.flash_frames + 2)
        self.after = max(o.gradual_window, o.flash_frames)
        # frames a frame may wait in the gate (see ``cap``): the thumbnails of before + 3 frames, the key frame
        # after them, the key frame after the next one for a skipped frame, a batch
        self.delay = 0 if self.every_frame else self.before + 3 + 2 * self.stride + o.batch_size
        self.reset()

    @property
    def cap(self) -> int:
        """The most frames held at once (``process_prepared`` one frame at a time)."""
        return self.delay + 1

    def reset(self) -> None:
        self.held: deque[Slot] = deque()  # frames not yet released, in order
        self.n = 0  # frames pushed
        self.ended = False
        self._queue: list[Slot] = []  # to embed, not yet handed out
        self._mark_until = -1  # frames up to this one must be embedded (triggers so far)
        self._keys: dict[int, np.ndarray] = {}  # key frame -> embedding, while its pair is not yet tested
        self._pair_a = -self.stride  # the last key frame whose pair (a, next key) was tested
        self._steps: deque = deque(maxlen=8)  # (index, thumbnail step from the frame before), recent frames
        self._thumbs: deque = deque(maxlen=8)  # (index, thumbnail), recent frames
        self._prev_dark = None
        self._tested = 0  # thumbnail triggers tested for frames before this one
        self._last_real: Slot | None = None  # the last embedded frame released (interpolation's left end)
        self.embedded = 0

    # -- in ------------------------------------------------------------------------------------------------
    def push(self, frame: PreparedFrame) -> None:
        """A new frame (the next index)."""
        i = self.n
        self.n += 1
        slot = Slot(i, frame, key=self.every_frame or i % self.stride == 0)
        self.held.append(slot)
        if self.every_frame:
            self._embed(slot)
            return
        thumb = frame.thumb
        if self._thumbs:
            self._steps.append((i, float(np.linalg.norm(thumb - self._thumbs[-1][1]))))
        self._thumbs.append((i, thumb))
        dark = -1 if frame.luma <= self.dark else 1 if frame.luma >= 255.0 - self.dark else 0
        if self._prev_dark is not None and dark != self._prev_dark:
            self._mark(i - self.before, i + self.after)  # the brightness crosses into or out of black (white)
        self._prev_dark = dark
        if slot.key or i <= self._mark_until:
            self._embed(slot)
        self._test_steps(final=False)
        self._decide()

    def end(self) -> None:
        """The stream ended: the last frame is embedded (it closes the last pair), every trigger is tested."""
        if self.ended:
            return
        self.ended = True
        if self.every_frame or not self.held:
            return
        last = self.held[-1]
        if not last.key:
            last.key = True
            if last.emb is not None:
                self._keys[last.index] = last.emb
            self._embed(last)
        self._test_steps(final=True)
        self._test_pairs()
        self._decide()

    def take(self, batch_size: int) -> list[list[Slot]]:
        """Batches to embed now: every full batch, and the rest when it holds a key frame (the decisions wait
        for those) or the stream has ended."""
        out = []
        q = self._queue
        while len(q) >= batch_size or (q and (self.ended or any(s.key for s in q))):
            batch, self._queue = q[:batch_size], q[batch_size:]
            q = self._queue
            for s in batch:
                s.asked = True
            out.append(batch)
        return out

    def put(self, batch: list[Slot], x: np.ndarray) -> None:
        """The embeddings of a batch ``take`` handed out (any order of batches)."""
        for s, row in zip(batch, x):
            s.emb = row
            if s.key and not self.every_frame:
                self._keys[s.index] = row
        self.embedded += len(batch)
        if not self.every_frame:
            self._test_pairs()
            self._decide()

    # -- out -----------------------------------------------------------------------------------------------
    def release(self) -> list[tuple[PreparedFrame, np.ndarray, bool]]:
        """The frames ready to be ingested, in order: (frame, embedding, whether it was embedded)."""
        out = []
        held = self.held
        while held:
            s = held[0]
            if s.state == UNDECIDED:
                break
            if s.state == EMBED:
                if s.emb is None:
                    break
                out.append((s.frame, s.emb, True))
                self._last_real = s
                held.popleft()
                continue
            right = next((r for r in held if r.state != SKIP), None)  # the next embedded frame
            if right is None or right.state == UNDECIDED or right.emb is None:
                break
            left = self._last_real
            while held[0] is not right:
                s = held.popleft()
                w = (s.index - left.index) / (right.index - left.index)
                e = (1.0 - w) * left.emb + w * right.emb
                e = (e / max(float(np.linalg.norm(e)), 1e-12)).astype(np.float32)
                out.append((s.frame, e, False))
        return out

    # -- decisions -----------------------------------------------------------------------------------------
    def _embed(self, s: Slot) -> None:
        if s.state == EMBED:
            return
        if s.state == SKIP:  # the commit rule (``_decide``) guarantees this cannot happen
            raise RuntimeError(f"gate: frame {s.index} was already skipped when a trigger reached it")
        s.state = EMBED
        self._queue.append(s)

    def _mark(self, lo: int, hi: int) -> None:
        """Something may happen: embed frames lo..hi (those still to come once they arrive)."""
        for s in self.held:
            if lo <= s.index <= hi:
                self._embed(s)
        self._mark_until = max(self._mark_until, hi)

    def _test_steps(self, *, final: bool) -> None:
        """The thumbnail trigger of every frame whose neighbours have all arrived (all at the end): the cut
        test's own check of a cut's picture change, looser. A cut at k changes the thumbnail in one step: the
        step into k is at least half the change across k (mean of the 3 frames after against the 3 before) and
        twice the steps of its neighbours (into k-2, k-1, k+2, k+3); the gate asks for ``gate_step_ratio``
        times and 0.4 of the change across."""
        thumbs, steps = dict(self._thumbs), dict(self._steps)
        while self._tested < self.n and (final or self._tested + 3 < self.n):
            k = self._tested
            self._tested += 1
            if k not in steps:
                continue
            before = [thumbs[j] for j in range(k - 3, k) if j in thumbs]
            after = [thumbs[j] for j in range(k + 1, k + 4) if j in thumbs]
            near = [steps[j] for j in (k - 2, k - 1, k + 2, k + 3) if j in steps]
            if before and after:
                across = float(np.linalg.norm(np.mean(after, axis=0) - np.mean(before, axis=0)))
                if steps[k] < self.across * across:
                    continue
            if steps[k] >= self.floor and (not near or steps[k] >= self.step_ratio * float(np.median(near))):
                self._mark(k - self.before, k + self.after)

    def _test_pairs(self) -> None:
        """Compare each pair of consecutive key frames once both embeddings are known, in order."""
        while True:
            a = self._pair_a + self.stride
            b = a + self.stride
            if self.ended and b >= self.n:
                b = self.n - 1
            if b <= a or a not in self._keys or b not in self._keys:
                return
            ea, eb = self._keys.pop(a), self._keys[b]
            if 1.0 - float(np.dot(ea, eb)) >= self.change:
                self._mark(a - self.before, b + self.after)
            self._pair_a = a

    def _decide(self) -> None:
        """Settle every frame no trigger can reach any more: embedded if one did, else skipped."""
        # a trigger at frame k marks from k - before: the thumbnail triggers are tested up to n - 4 (their
        # neighbours' steps), the pairs of key frames up to the one starting at _pair_a
        thumbs = self.n - 1 if self.ended else self.n - 4 - self.before
        done = self.ended and self._pair_a + self.stride >= self.n - 1  # every pair tested
        pairs = self.n - 1 if done else self._pair_a + self.stride - self.before - 1
        limit = min(thumbs, pairs)
        for s in self.held:
            if s.index > limit:
                break
            if s.state == UNDECIDED:
                s.state = SKIP
