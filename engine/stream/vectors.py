"""Small vector helpers of the comparator: cosine, a single-BLAS-thread product, signature pooling."""

from __future__ import annotations

import numpy as np

from engine.threads import blas_single_thread


def cos(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors; 1.0 for two zero vectors, 0.0 for one."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` on one BLAS thread. These products are small (thumbnails of one transition's frames); a
    multi-threaded one would leave OpenBLAS's helper thread spinning for a while after it returns, on the core
    the network's workers need (bikes.mp4 streamed at 201-210 frames/s that way, 239-250 without it). The limit
    is process-wide for the product's duration (microseconds), as in ``Searcher``'s worker mode."""
    with blas_single_thread():
        return a @ b


def pool_edges(dim: int, signature_dim: int) -> np.ndarray | None:
    """Where the blocks of dimensions averaged into a shot signature start (None: the embedding as it is)."""
    if dim <= signature_dim:
        return None
    return np.linspace(0, dim, signature_dim + 1).round().astype(np.int64)[:-1]


def pool(x: np.ndarray, edges) -> np.ndarray:
    """(n, dim) -> (n, signature_dim): each signature entry is the sum of a block of consecutive dimensions."""
    return np.asarray(x, np.float32) if edges is None else np.add.reduceat(x, edges, axis=1).astype(np.float32)
