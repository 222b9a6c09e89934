"""A frame on its way to the comparator (``PreparedFrame``) and what the comparator keeps of the recent frames
(``FrameHistory``: ring buffers of fixed size, addressed by absolute frame index, and the similarity on the
selected embedding dimensions that every decision uses)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.stream.events import Transition
from engine.stream.vectors import cos


WHOLE = 32  # side of the thumbnail of the whole frame
STRIP = (16, 128)  # the whole frame coarse across and fine along the way an edge moves (rows x columns)


HS_BINS = (16, 8)  # hues x saturations of a shot's colour histogram (recurrence)


def hue_saturation(whole: np.ndarray) -> np.ndarray:
    """The summed hue-saturation histogram (16 x 8 bins, flattened) of whole-frame thumbnails (n, 32, 32, 3)
    float32 RGB 0..255: a shot's palette, whatever the camera's framing."""
    import cv2

    u8 = np.clip(whole, 0, 255).astype(np.uint8).reshape(-1, whole.shape[-2], 3)
    hsv = cv2.cvtColor(u8, cv2.COLOR_RGB2HSV)
    return cv2.calcHist([hsv], [0, 1], None, list(HS_BINS), [0, 180, 0, 256]).ravel().astype(np.float64)


@dataclass(slots=True)
class PreparedFrame:
    """One frame as ``StreamComparator.prepare`` leaves it: the network's input and what the transition tests keep."""

    net: np.ndarray  # the network's view, uint8 RGB: resized and cropped to its input where the encoder takes
    # preprocessed input (normalised only if the gate embeds it: batch.InputBuffer), else the frame itself
    luma: float  # mean brightness of the thumbnail, 0..255 (fades)
    thumb: np.ndarray  # (thumb_size, thumb_size, 3) float32 colour thumbnail (cuts, dissolves vs motion)
    time: float | None = None  # timestamp in seconds, set when the frame is queued
    whole: np.ndarray | None = None  # (32, 32, 3) float32 colour thumbnail of the whole frame, uncropped (wipes)
    cols: np.ndarray | None = None  # (16, 128, 3) float32: the whole frame, fine along its width (a push's edge)
    rows: np.ndarray | None = None  # (128, 16, 3) float32: the whole frame, fine along its height


class Ring:
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


class FrameHistory:
    """The last ``capacity`` frames: embedding, shot signature, thumbnail, brightness, timestamp, dissimilarity
    with the frame before (``c``), whether the cut test set it aside as a flash (``outlier``) and whether the
    network embedded it (``embedded``; the gate interpolated the others).

    Similarities are measured on the ``top_dims`` dimensions that varied most over the last ``window`` frames
    (the published demo's selection; None: all), chosen again every ``refresh`` frames.
    """

    def __init__(self, capacity: int, dim: int, signature_dim: int, thumb_size: int, *, window: int,
                 top_dims: int | None, refresh: int):
        self.capacity = capacity
        self.window, self.top_dims, self.refresh = window, top_dims, refresh
        self.emb = Ring(capacity, (dim,), np.float32)
        self.sig = Ring(capacity, (signature_dim,), np.float32)
        self.thumb = Ring(capacity, (thumb_size, thumb_size, 3), np.float32)
        self.whole = Ring(capacity, (WHOLE, WHOLE, 3), np.float32)  # of the uncropped frame (wipes, pushes)
        self.cols = Ring(capacity, (*STRIP, 3), np.float32)
        self.rows = Ring(capacity, (*STRIP[::-1], 3), np.float32)
        self.c = Ring(capacity, (), np.float32)
        self.luma = Ring(capacity, (), np.float32)
        self.time = Ring(capacity, (), np.float64, np.nan)
        self.outlier = Ring(capacity, (), np.bool_, False)
        self.embedded = Ring(capacity, (), np.bool_, True)  # False: the gate interpolated its embedding
        self.rings = (self.emb, self.sig, self.thumb, self.whole, self.cols, self.rows, self.c, self.luma, self.time, self.outlier, self.embedded)
        self.dims = None  # the selected dimensions (None: all)

    def reset(self) -> None:
        for r in self.rings:
            r.reset()
        self.dims = None

    @property
    def start(self) -> int:
        """The oldest frame still held."""
        return self.emb.start

    @property
    def end(self) -> int:
        """The index the next frame will have."""
        return self.emb.end

    def append(self, x: np.ndarray, sig: np.ndarray, frame: PreparedFrame, embedded: bool = True) -> int:
        """Add a frame (its embedding, signature and prepared parts; ``embedded``: False where the gate
        interpolated the embedding); returns its index."""
        i = self.emb.append(x)
        self.sig.append(sig)
        self.thumb.append(frame.thumb)
        self.whole.append(0.0 if frame.whole is None else frame.whole)
        self.cols.append(0.0 if frame.cols is None else frame.cols)
        self.rows.append(0.0 if frame.rows is None else frame.rows)
        self.luma.append(frame.luma)
        self.time.append(np.nan if frame.time is None else frame.time)
        self.outlier.append(False)
        self.embedded.append(embedded)
        if self.top_dims is not None and (i + 1 == self.window // 2 or self.dims is not None and i % self.refresh == 0):
            lo = max(self.emb.start, self.emb.end - self.window)
            var = self.emb.take(np.arange(lo, self.emb.end)).var(axis=0)
            self.dims = np.sort(np.argpartition(-var, self.top_dims)[: self.top_dims])
        self.c.append(0.0 if i == 0 else 1.0 - self.sim(i - 1, i))
        return i

    def sel(self, x: np.ndarray) -> np.ndarray:
        """``x`` (an embedding, or rows of them) on the selected dimensions."""
        return x if self.dims is None else x[..., self.dims]

    def sim(self, i: int, j: int) -> float:
        """Cosine of frames i and j on the selected dimensions."""
        return cos(self.sel(self.emb[i]), self.sel(self.emb[j]))

    def valid_before(self, k: int) -> int | None:
        """The last frame before ``k`` that is not an outlier (None at the start of the stream)."""
        j = k - 1
        while j >= self.emb.start and self.outlier[j]:
            j -= 1
        return j if j >= self.emb.start else None

    def window_mean(self, lo: int, hi: int, ring: Ring | None = None) -> np.ndarray:
        """Mean of ``ring`` (default: the embeddings) over frames lo..hi-1, outliers left out unless all are."""
        ring = self.emb if ring is None else ring
        idx = [j for j in range(lo, hi) if not self.outlier[j]] or list(range(lo, hi))
        return ring.take(idx).mean(axis=0)

    def time_at(self, i: int) -> float | None:
        t = float(self.time[i])
        return None if math.isnan(t) else t

    def transition(self, kind: str, first: int, last: int, score: float, *, fade: bool = False,
                   move: str | None = None) -> Transition:
        """A ``Transition`` over frames first..last, with their timestamps."""
        return Transition(type=kind, first=int(first), last=int(last), score=round(float(score), 6),
                          start_time=self.time_at(first), end_time=self.time_at(last), fade=fade, move=move)
