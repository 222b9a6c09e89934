"""A memory bank of unit vectors (one per training sample), as used by Local Aggregation.

``MemoryBank(n, dim, *, mixing_rate=0.5, seed=0)`` holds ``n`` float32 unit vectors of length ``dim``, drawn
uniformly on the sphere (normalised Gaussians from ``np.random.default_rng(seed)``). The shape is fixed at
construction. Rules (the numba kernels in ``engine.kernels.bank`` / ``kmeans`` do the work):

- ``update(indices, vectors)``: ``v[i] <- normalise(r * new + (1 - r) * v[i])`` with ``r = mixing_rate``.
  An index repeated within a batch is updated once per occurrence, in batch order -- exactly the loop
  ``for j: v[idx[j]] = normalise(r * new[j] + (1 - r) * v[idx[j]])``. ``new`` need not be unit length. When
  the mix cancels (``|x| <= 1e-5 * (r |new| + (1 - r) |old|)``, e.g. ``new = -(1 - r) / r * old``) the old row
  is kept, so rows stay unit vectors.
- ``set(indices, vectors)`` / ``fill(vectors)``: overwrite rows with the normalised vectors (repeats: the last
  one wins). A zero vector cannot be normalised and is refused.
- ``neighbours(queries, k)``: the top-k bank rows by cosine for any (m, dim) queries (a zero query has cosine 0
  with every row); ``neighbours_of(rows, k, exclude_self=True)`` for bank rows. Both return ``(scores,
  indices)``: (m, k) float32 best first and (m, k) int64; ties keep the lower bank index first; slots beyond
  the available rows hold -inf / -1. A ``k`` beyond both the bank's rows and 1024 is answered as if it were
  the larger of the two (``engine.result_size.answer_columns``), so memory follows the bank, not ``k``.
- ``cluster(n_clusters, repeats=..)``: spherical k-means (see ``engine.kernels.kmeans``), one label array per
  repeat; the centroids and objectives of the last call stay in ``centroids`` / ``clusterings``.

Every public method validates its input (shape, dtype, index range, NaN/inf) and raises ``InputError`` naming
what was expected and what came. Files written by ``save`` are atomic, versioned and checksummed; ``load``
refuses a damaged file with ``IndexFileError`` naming the path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import IndexFileError, InputError
from engine.fileio import read_framed, write_framed
from engine.kernels import bank as K
from engine.kernels.kmeans import KMeansResult, spherical_kmeans
from engine.result_size import ResultTooLarge, answer_columns
from engine.validate import is_int, is_real, listed_rows

MAGIC = b"LOOKALIKE-MEMORYBANK "
FILE_VERSION = 2  # 2: the header (n, dim, mixing rate) is checksummed too
STATE_FORMAT = "lookalike-memory-bank"
STATE_VERSION = 1
_UNIT_TOL = 1e-3  # a stored row whose norm is off by more than this is not a memory-bank row
_INT64 = np.dtype(np.int64)  # dtype objects of native int64 / float32 arrays are these singletons
_FLOAT32 = np.dtype(np.float32)


def _int_arg(value, name, low, high=None):
    if not is_int(value):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < low or (high is not None and value > high):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{name} must be {expected}, got {value}")
    return value


def _mixing_rate(value):
    if not is_real(value) or not (0.0 < float(value) <= 1.0):
        raise InputError(f"mixing_rate must be a number in (0, 1], got {value!r}")
    return float(value)


def _rows_named(mask, what):
    shown, count = listed_rows(mask)
    return f"{what} rows {shown} ({count} of {mask.size})"


class MemoryBank:
    """n unit vectors of length dim; see the module docstring for the rules."""

    def __init__(self, n, dim, *, mixing_rate=0.5, seed=0):
        n = _int_arg(n, "n (number of bank rows)", 1)
        dim = _int_arg(dim, "dim", 1)
        self._r = _mixing_rate(mixing_rate)
        g = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)  # (n, dim)
        g[~np.any(g != 0, axis=1), 0] = 1.0  # a (measure-zero) all-zero draw becomes e_0
        self._v = np.empty((n, dim), dtype=np.float32)
        K.normalise_rows(g, self._v)
        self._clusterings: list[KMeansResult] = []

    # ------------------------------------------------------------------ properties
    @property
    def vectors(self) -> np.ndarray:
        """Read-only (n, dim) float32 view of the bank."""
        view = self._v.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return self._v.shape[0]

    @property
    def dim(self) -> int:
        return self._v.shape[1]

    @property
    def mixing_rate(self) -> float:
        return self._r

    @property
    def clusterings(self) -> list[KMeansResult]:
        """The k-means results of the last ``cluster`` call, one per repeat (empty before the first call)."""
        return list(self._clusterings)

    @property
    def centroids(self) -> list[np.ndarray]:
        """(n_clusters, dim) float32 unit centroids of the last ``cluster`` call, one per repeat."""
        return [c.centroids for c in self._clusterings]

    def __repr__(self) -> str:
        return f"MemoryBank(n={len(self)}, dim={self.dim}, mixing_rate={self._r})"

    # ------------------------------------------------------------------ validation
    def _indices(self, indices, name="indices") -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1:
            raise InputError(f"{name} must be a 1-D array of row numbers, got shape {idx.shape}")
        if idx.dtype.kind not in "iu":
            if idx.size == 0 and idx.dtype.kind == "f":
                idx = idx.astype(np.int64)
            else:
                raise InputError(f"{name} must hold integers, got dtype {idx.dtype}")
        n = len(self)
        bad = np.flatnonzero((idx < 0) | (idx >= n))
        if bad.size:
            j = int(bad[0])
            raise InputError(
                f"{name} must lie in [0, {n}) (the bank has {n} rows), got {name}[{j}] = {int(idx[j])}"
                + (f" and {bad.size - 1} more out of range" if bad.size > 1 else "")
            )
        return np.ascontiguousarray(idx, dtype=np.int64)

    def _rows(self, vectors, count, name) -> np.ndarray:
        arr = np.asarray(vectors)
        if arr.dtype.kind not in "fiu":
            raise InputError(f"{name} must be real numbers (float32 preferred), got dtype {arr.dtype}")
        expected = f"({count}, {self.dim})" if count is not None else f"(m, {self.dim})"
        if arr.ndim != 2 or arr.shape[1] != self.dim or (count is not None and arr.shape[0] != count):
            raise InputError(f"{name} must have shape {expected}, got {arr.shape}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            raise InputError(f"{name} must be finite: {_rows_named(~finite, name)} hold NaN or inf")
        return arr

    def _nonzero(self, arr, name):
        zero = ~np.any(arr != 0, axis=1)
        if zero.any():
            raise InputError(
                f"{name} must be non-zero (a zero vector has no direction to store): {_rows_named(zero, name)}"
                " are zero"
            )

    # ------------------------------------------------------------------ writing rows
    def set(self, indices, vectors) -> None:
        """Overwrite rows ``indices`` with ``vectors`` (len(indices), dim) normalised; repeats: the last wins."""
        idx = self._indices(indices)
        new = self._rows(vectors, idx.shape[0], "vectors")
        self._nonzero(new, "vectors")
        K.set_rows(self._v, idx, new)

    def fill(self, vectors) -> None:
        """Overwrite the whole bank with ``vectors`` (n, dim), normalised."""
        new = self._rows(vectors, len(self), "vectors")
        self._nonzero(new, "vectors")
        K.normalise_rows(new, self._v)

    def update(self, indices, vectors) -> None:
        """Mixing update ``v[i] <- normalise(r * new + (1 - r) * v[i])``, repeats in batch order (module doc)."""
        idx, new = indices, vectors
        dim = self._v.shape[1]
        if not (
            type(idx) is np.ndarray
            and type(new) is np.ndarray
            and idx.dtype is _INT64
            and new.dtype is _FLOAT32
            and idx.ndim == 1
            and new.shape == (idx.shape[0], dim)
            and idx.flags.c_contiguous
            and new.flags.c_contiguous
        ):  # slow path: full validation and coercion
            idx = self._indices(idx)
            new = self._rows(new, idx.shape[0], "vectors")
        elif idx.shape[0] <= K.log_rows(dim) and K.update_kernel(dim)(self._v, idx, new, self._r) == K.OK:
            return  # fast path (the trainer's batch): one kernel call, no Python-side checks
        if K.update(self._v, idx, new, self._r) != K.OK:  # nothing was changed; say why
            self._indices(idx)
            self._rows(new, idx.shape[0], "vectors")
            raise AssertionError("update kernel refused a batch that validates")  # pragma: no cover

    # ------------------------------------------------------------------ search
    def neighbours(self, queries, k):
        """Top-k bank rows by cosine for ``queries`` (m, dim): scores (m, k) float32, indices (m, k) int64."""
        k = _int_arg(k, "k", 1)
        q = self._rows(queries, None, "queries")
        unit = np.empty_like(q)
        K.normalise_rows(q, unit)
        return self._knn(unit, k, np.full(q.shape[0], -1, dtype=np.int64))

    def neighbours_of(self, rows, k, *, exclude_self=True):
        """Top-k bank rows by cosine for bank rows ``rows``; a row is not its own neighbour unless
        ``exclude_self=False``."""
        k = _int_arg(k, "k", 1)
        idx = self._indices(rows, "rows")
        exclude = idx if exclude_self else np.full(idx.shape[0], -1, dtype=np.int64)
        return self._knn(np.ascontiguousarray(self._v[idx]), k, exclude)

    def _knn(self, unit, k, exclude):
        try:
            return K.knn(self._v, unit, answer_columns(k, len(self)), exclude)
        except ResultTooLarge as e:
            raise InputError(f"k = {k} is too large: {e} (the bank holds {len(self)} rows)") from None

    # ------------------------------------------------------------------ clustering
    def cluster(self, n_clusters, *, repeats=1, iterations=20, restarts=1, seed=0) -> list[np.ndarray]:
        """Run spherical k-means ``repeats`` times (repeat j seeded by (seed, j)); return the (n,) int64 label
        arrays, one per repeat. Each repeat keeps the best of ``restarts`` k-means++ restarts."""
        n_clusters = _int_arg(n_clusters, "n_clusters", 1, len(self))
        repeats = _int_arg(repeats, "repeats", 1)
        iterations = _int_arg(iterations, "iterations", 1)
        restarts = _int_arg(restarts, "restarts", 1)
        seed = _int_arg(seed, "seed", 0)
        self._clusterings = [
            spherical_kmeans(self._v, n_clusters, iterations=iterations, restarts=restarts, seed=[seed, j])
            for j in range(repeats)
        ]
        return [c.labels for c in self._clusterings]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Plain dict (numpy array + numbers) for a trainer's checkpoint; ``from_state_dict`` reverses it."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "vectors": self._v.copy(), "mixing_rate": self._r}

    @classmethod
    def from_state_dict(cls, state) -> MemoryBank:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise InputError(f"expected a dict from MemoryBank.state_dict() (format {STATE_FORMAT!r}), got {got!r}")
        if state.get("version") != STATE_VERSION:
            raise InputError(f"memory-bank state version {state.get('version')!r}; this reads {STATE_VERSION}")
        return cls._from_vectors(np.asarray(state.get("vectors")), state.get("mixing_rate"), "state['vectors']")

    @classmethod
    def _from_vectors(cls, v, mixing_rate, name) -> MemoryBank:
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1 or v.dtype.kind != "f":
            raise InputError(f"{name} must be a float (n, dim) array with n, dim >= 1, got {v.dtype} {v.shape}")
        bank = cls.__new__(cls)
        bank._r = _mixing_rate(mixing_rate)
        bank._v = np.array(v, dtype=np.float32, order="C", copy=True)
        bank._clusterings = []
        bad = ~np.isfinite(bank._v).all(axis=1)
        bad |= np.abs(np.linalg.norm(bank._v.astype(np.float64), axis=1) - 1.0) > _UNIT_TOL
        if bad.any():
            raise InputError(f"{name} must hold finite unit rows: {_rows_named(bad, name)} do not")
        return bank

    def save(self, path) -> str:
        """Write the bank to ``path`` atomically; returns the payload's sha256 (hex).

        Layout: ``LOOKALIKE-MEMORYBANK {json header}\\n`` then n * dim little-endian float32, row-major. The
        header holds version, n, dim, mixing_rate, dtype, nbytes and sha256 of the payload.
        """
        body = self._v.astype("<f4", copy=False).tobytes(order="C")
        header = {"version": FILE_VERSION, "n": len(self), "dim": self.dim, "mixing_rate": self._r, "dtype": "<f4"}
        return write_framed(path, MAGIC, header, body)

    @classmethod
    def load(cls, path) -> MemoryBank:
        """Read a file written by ``save``; a missing, damaged or other-version file raises IndexFileError."""
        path = Path(path)
        if not path.exists():
            raise IndexFileError(f"no memory-bank file at {path}")
        header, body = read_framed(path, MAGIC, FILE_VERSION, what="memory-bank", error=IndexFileError,
                                   header_digest=True)
        n, dim = header.get("n"), header.get("dim")
        shape_ok = isinstance(n, int) and isinstance(dim, int) and n >= 1 and dim >= 1 and n * dim * 4 == len(body)
        if header.get("dtype") != "<f4" or not shape_ok:
            raise IndexFileError(f"{path}: header shape/dtype {n!r} x {dim!r} {header.get('dtype')!r} does not fit")
        try:
            return cls._from_vectors(
                np.frombuffer(body, dtype="<f4").reshape(n, dim), header.get("mixing_rate"), str(path)
            )
        except InputError as e:
            raise IndexFileError(f"{path}: {e}") from None
