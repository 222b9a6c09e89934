"""The network's input batch: prepared frames' uint8 crops normalised straight into a reused float32 buffer.

``StreamComparator.prepare`` keeps the network's view of a frame as uint8 (a quarter of the float32 input's
size, and only the frames the gate embeds are ever normalised). ``InputBuffer.fill`` writes a batch of them into
one preallocated ``(batch_size, 3, h, w)`` float32 array per thread (``run``'s workers fill theirs at once):
no ``np.stack``, no allocation per batch. The values are ``Preprocess.normalise``'s, bit for bit (the same
float32 product and sum, in numpy: nothing to compile when a stream starts).
"""

from __future__ import annotations

import threading

import numpy as np

from engine.preprocess import Preprocess


class InputBuffer:
    """Normalises uint8 RGB crops (h, w, 3) at the network's input size into a per-thread float32 batch."""

    def __init__(self, preprocess: Preprocess, batch_size: int):
        std = np.asarray(preprocess.std, np.float32)
        self.scale = (np.float32(1.0 / 255.0) / std)[:, None, None]  # as Preprocess.normalise
        self.shift = (-np.asarray(preprocess.mean, np.float32) / std)[:, None, None]
        self.bgr = preprocess.color == "BGR"
        if self.bgr:  # output channel c is source channel 2 - c, with that channel's mean and std
            self.scale, self.shift = self.scale[::-1].copy(), self.shift[::-1].copy()
        self.shape = (3, *preprocess.size)
        self.batch_size = int(batch_size)
        self._local = threading.local()

    def fill(self, crops: list[np.ndarray]) -> np.ndarray:
        """``(len(crops), 3, h, w)`` float32: a view of this thread's buffer, valid until its next ``fill``."""
        n = len(crops)
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = np.empty((max(n, self.batch_size), *self.shape), np.float32)
        out = buf[:n]
        for dst, crop in zip(out, crops):
            src = crop.transpose(2, 0, 1)  # (3, h, w) view of the (h, w, 3) crop
            if self.bgr:
                src = src[::-1]
            np.multiply(src, self.scale, out=dst, dtype=np.float32)
            dst += self.shift
        return out
