"""Synthetic unit vectors the search benchmarks share (``bench_ivf.py``, ``bench_compressed.py``):

- ``gaussian``: i.i.d. normal coordinates, normalised (no clusters: the hard case for any index);
- ``mixture``: ``MIXTURE_CENTRES`` fixed unit centres (seed 12345) plus noise of norm ``MIXTURE_NOISE``
  (per coordinate ``MIXTURE_NOISE / sqrt(d)``), normalised: clustered, as real embeddings are.
"""

from __future__ import annotations

import numpy as np

MIXTURE_CENTRES = 10_000
MIXTURE_NOISE = 0.75  # norm of the noise around a unit centre (per coordinate 0.75 / sqrt(d))


def vectors(data: str, n: int, d: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """n unit float32 vectors of ``data`` ("gaussian" or "mixture"), generated in chunks (no float64 copy of
    the whole)."""
    if data not in ("gaussian", "mixture"):
        raise ValueError(f"data must be 'gaussian' or 'mixture', got {data!r}")
    rng = np.random.default_rng(seed)
    centres = None
    if data == "mixture":
        centres = np.random.default_rng(12345).standard_normal((MIXTURE_CENTRES, d))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for r0 in range(0, n, chunk):
        m = min(chunk, n - r0)
        x = rng.standard_normal((m, d))
        if centres is not None:
            x = centres[rng.integers(MIXTURE_CENTRES, size=m)] + MIXTURE_NOISE / np.sqrt(d) * x
        out[r0 : r0 + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
