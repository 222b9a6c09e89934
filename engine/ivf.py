"""Approximate similarity search with an inverted-file index: ``IVFSearcher``.

    s = IVFSearcher(128, nlist=1024)              # cosine; IVFSearcher(128, metric="ip") for inner product
    ids = s.add(vectors)                          # trains itself once it holds 32 * nlist vectors
    scores, ids = s.search(queries, k=10)         # probes s.nprobe lists per query (default 16)
    scores, ids = s.search(queries, 10, nprobe=64)  # more lists: higher recall, slower
    s.save("index.lkv"); s = IVFSearcher.load("index.lkv")

Contract (that of ``engine.searcher.Searcher``, except that answers are approximate once trained)
- Coarse quantiser: ``nlist`` unit centroids from the project's spherical k-means
  (``engine.kernels.kmeans.spherical_kmeans``, ``KMEANS_ITERATIONS`` iterations, k-means++ seeded by
  ``seed``) over a sample of at most ``train_size`` vectors (default ``TRAIN_PER_LIST * nlist``), L2-normalised
  first (also under ``metric="ip"``). Every stored vector belongs to the list of its centroid of highest inner
  product (lowest list on ties); a query probes the ``nprobe`` lists whose centroids score highest against it,
  and its answer is the exact top-k of the vectors in those lists. ``nprobe`` is the recall/speed knob:
  ``search(..., nprobe=p)`` for one search, the ``nprobe`` attribute for the default; ``nprobe >= nlist``
  scans every list, which is exact search.
- Training: ``train(sample)`` (any number of vectors >= ``nlist``; a random subset of ``train_size`` of them
  is used when there are more) at any time, which also moves the vectors already stored to their new lists;
  else the index trains itself, on a sample of what it holds, at the ``add`` that brings it to
  ``TRAIN_MIN_PER_LIST * nlist`` vectors. Until trained, the vectors sit in one list that every search scans:
  answers are exact.
- Inputs, ids, ``add`` / ``remove`` / ``get``, the padding and the answer's width are as for ``Searcher``
  (cosine: rows L2-normalised in float64 and stored as float32; NaN / inf / non-float refused with
  ``InputError``; ``k'`` = ``min(k, max(len(index), 1024))`` columns, padded with id -1 and score -inf).
  ``search(queries, k)`` returns ``(scores (nq, k') float32, ids (nq, k') int64)``, best first; on equal
  scores the lower id comes first (whatever the order the vectors sit in). With fewer than k vectors in the
  probed lists the answer is padded too.
- Thread-safe: searches run concurrently with each other; ``add`` / ``remove`` / ``train`` wait for them and
  run alone (the readers-writer lock of ``Searcher``), so every answer reflects one consistent state. The
  k-means of an explicit ``train(sample)`` runs before taking the lock (searches go on meanwhile); that of
  the automatic training runs inside ``add``.

Storage: the vectors sorted by list into one contiguous (capacity, dim) float32 array, list ``l`` at rows
``starts[l] .. starts[l] + sizes[l] - 1`` with free slack after it (``SLACK`` of its size, at least
``MIN_SLACK`` rows), and their ids in an int64 array at the same rows. ``add`` appends into the slack;
when a list has no room left, every list is copied to a new array with fresh slack (the copies amortise
like a growing array's). ``remove`` moves the list's last row into the hole.

Search: the coarse scores are one BLAS product (queries x centroids); then
- up to ``GROUPED_MIN_QUERIES - 1`` queries: a numba kernel scans, per query, its probed lists in order of
  centroid score (four stored rows per pass over the query, one heap per query); work is split over
  ``threads`` worker threads by query, or for fewer queries than threads by probed list (heaps merged after);
- more queries: the (query, list) pairs are grouped by list, and each probed list is scored against all the
  queries that probe it by one BLAS product (contiguous list rows, gathered queries), merged into the
  queries' heaps by numba; the lists are split over the worker threads (BLAS at one thread each meanwhile),
  each with its own heaps, merged at the end.
Small searches (below ``SMALL_WORK`` multiply-adds) stay in the calling thread. Memory beyond the index:
the heaps, the coarse scores (nq, nlist), the probe table and a ``SCORE_BUFFER_FLOATS`` buffer per worker.

File format (``save`` / ``load``), version 2 (``save`` writes it for float32 storage, version 3 for compressed
storage, see below; ``load`` reads versions 1, 2 and 3): one header
line ``LOOKALIKE-IVF {json}`` padded with spaces to a multiple of 64 bytes including its closing ``\\n``
(``engine.searcher.header_line``), then the payload: the centroids (nlist x dim float32; absent while
untrained), the list offsets (lists + 1, int64: list ``l`` is rows ``offsets[l] .. offsets[l+1]-1``; one
list while untrained), the ids (count int64) and the vectors (count x dim float32, at a multiple of 4 bytes
in the file: np.memmap-able), all little-endian, the vectors and ids sorted by list. The header holds
``format_version``, ``dim``, ``metric``, ``count``, ``next_id``, ``nlist``, ``nprobe``, ``train_size``,
``seed``, ``trained``, ``section_sha256`` (the sha256 of each section's bytes: ``centroids``, ``offsets``,
``ids``, ``vectors``) and ``sha256``, the digest of the header's other fields (canonical JSON). Version 1
(still read) has no padding and no ``section_sha256``; its ``sha256`` is the digest of the header's other
fields followed by the payload. Written atomically (``engine.fileio.atomic_write``). ``load`` reads the
header line first and the payload only when the file's size is the one the header gives, checks the
digests, and refuses with ``IndexFileError`` naming the path, even under a correct digest, what ``add`` /
``train`` could never have written: offsets that do not rise from 0 to count, a negative or repeated id, a
``next_id`` not above every id, NaN or inf, a cosine vector neither unit nor zero, an ip vector whose squared
norm exceeds float32's range, a centroid neither unit nor zero. (Whether each vector sits in its centroid's
list is not checked: a misplaced vector costs recall, never a wrong score; ``nprobe >= nlist`` still finds it.)

Compressed storage (``IVFSearcher(dim, storage="float16" | "int8")``), as for ``engine.searcher.Searcher``: the
lists are scanned over float16 or int8 codes kept at the same rows as the float32 vectors (int8: per-dimension
scale and offset, set afresh from every stored vector when the lists are laid out by training, widened by a
later ``add`` whose vectors leave the range, which then encodes every stored row again); the int8 scores are
summed in int32 (exact; the same bits on every CPU). ``search(q, k, rerank=R)`` keeps the best ``max(R, k)``
of the probed lists by the codes (equal scores: the lower row) and scores them again exactly against the
float32 vectors; the answer is ordered by (score, id) as always. A loaded compressed index (format 3) keeps
the codes in memory (mapped with ``mmap=True``) in the file's layout and the float32 vectors mapped in the
file, read with ``pread`` for the re-ranked rows only; a plain load checks them whole at open (digests, contents,
codes that are the vectors' encoding), ``mmap=True`` leaves that to ``verify()``. File format 3 (float32
indexes are still written as version 2): the header adds ``storage``, the payload adds ``quant`` (int8 only:
dim float32 scales, then dim float32 offsets) and ``codes`` (count x dim float16 or uint8, list by list) after
the vectors, each with its sha256 (``quant`` null for float16); a wrong ``storage``, a payload of another size
(named section by section with the codes' dtype), a scale not finite and > 0, an offset not finite, or codes
that are not the vectors' encoding are refused with ``IndexFileError`` naming the path.

Memory-mapped load (``load(path, mmap=True)``), as for ``engine.searcher.Searcher``: the vectors stay in the
file, mapped read-only, laid out as the file has them (each list's rows contiguous, no slack); the header,
centroids, offsets and ids are read and checked (digests, sizes against the file's length, offsets, ids) at
open; ``verify()`` (or ``mmap="verify"``) checks the vectors. ``add``, ``remove`` and ``train`` verify the
mapped vectors and then copy them into memory (``add`` and ``train`` lay every list out afresh, with slack,
as they would anyway when a list is full); ``mapped`` is False from then on. ``save`` writes atomically, also
over the mapped file. Version 1 cannot be mapped: ``mmap=True`` reads it whole with a ``UserWarning``. The id
-> row table is built on first use, not at open.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np

from engine.errors import IndexFileError, InputError
from engine.fileio import MAX_HEADER, atomic_write, read_payload
from engine.kernels.ivf import (argmax_labels, copy_list_rows, copy_lists, group_by_list, merge_gathered, place_rows,
                                prepare_rows, scan_grouped, scan_grouped_f16, scan_grouped_int8, top_lists)
from engine.kernels.quant import (STORAGES, encode_float16, encode_int8, int8_params, int8_queries, int8_range,
                                  levels)
from engine.kernels.kmeans import spherical_kmeans
from engine.kernels.topk import heap_init, heap_sort, merge_heaps
from engine.result_size import ResultTooLarge, answer_columns
from engine.threads import blas_controllable, blas_single_thread, default_threads, worker_pool
from engine.searcher import (_CODE_DTYPES, _ENCODE_ROWS, _F16_MAX, _MAX_ID, _WIDEN, METRICS, _bytes_of, _check_digests,
                             _contents_problem, _ids_problem, _map_payload, _Mapping, _read_small_sections, _normalised,
                             _rows_named, _RWLock, _sha256, _sq_norms, checked_rows, coerce_ids, header_line,
                             rerank_candidates, shaped_rows)
from engine.validate import positive_int as _positive_int

MAGIC = b"LOOKALIKE-IVF "
FORMAT_VERSION = 2  # what ``save`` writes for float32 storage (unchanged)
COMPRESSED_FORMAT_VERSION = 3  # what ``save`` writes for float16 / int8 storage
READS_VERSIONS = (1, 2, 3)
SECTIONS = ("centroids", "offsets", "ids", "vectors")  # version 2: each has its sha256 in the header
SECTIONS_V3 = SECTIONS + ("quant", "codes")  # version 3 (compressed), in file order
TRAIN_MIN_PER_LIST = 32  # the index trains itself once it holds this many vectors per list
TRAIN_PER_LIST = 64  # default k-means sample: this many vectors per list
KMEANS_ITERATIONS = 20
SLACK = 0.125  # free rows left after each list when the layout is rebuilt, as a fraction of its size ...
MIN_SLACK = 8  # ... and at least this many
SMALL_WORK = 1 << 21  # multiply-adds below which a search stays in the calling thread
SCORE_BUFFER_FLOATS = 1 << 18  # per worker in grouped search: 1 MiB of scores, stays in cache
QUERY_TILE = 512  # queries per BLAS product in grouped search
MIN_BLOCK = 64  # fewest stored rows per BLAS product
ASSIGN_BUFFER_FLOATS = 1 << 20  # coarse scores per block when assigning vectors to lists
PARALLEL_ASSIGN_ROWS = 16384  # vectors assigned in worker threads from this many
_CENTROID_TOL = 1e-5  # a stored centroid is unit (within float32 rounding of a float64-normalised row) or zero


class IVFSearcher:
    """Approximate top-k search through an inverted-file index; see the module docstring."""

    def __init__(self, dim, *, metric="cosine", nlist=1024, nprobe=16, train_size=None, seed=0, threads=None,
                 storage="float32"):
        self._dim = _positive_int(dim, "dim")
        if not isinstance(metric, str) or metric.lower() not in METRICS:
            raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
        self._metric = metric.lower()
        if not isinstance(storage, str) or storage.lower() not in STORAGES:
            raise InputError(f"storage must be one of {STORAGES}, got {storage!r}")
        self._storage = storage.lower()
        if self._storage == "int8" and levels(self._dim) < 1:
            raise InputError(f"int8 storage takes dim up to {(2**31 - 1) // 255}, got {self._dim}")
        self._scale = self._offset = None  # int8: per-dimension scale and offset, float32 (dim,), from the first add
        self._nlist = _positive_int(nlist, "nlist")
        self._nprobe = _positive_int(nprobe, "nprobe")
        self._train_size = TRAIN_PER_LIST * self._nlist if train_size is None else _positive_int(
            train_size, "train_size")
        if self._train_size < self._nlist:
            raise InputError(f"train_size must be at least nlist ({self._nlist}), got {self._train_size}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be an int >= 0, got {seed!r}")
        self._seed = int(seed)
        self._threads = default_threads() if threads is None else _positive_int(threads, "threads")
        self._centroids = None  # (nlist, dim) float32 unit rows once trained
        self._method = "numba"  # how lists are scored: "numba" (scan_grouped) or "blas" (measured slower)
        self._lock = _RWLock()
        self._set_layout(np.zeros(1, np.int64), *_empty_storage(0, self._dim), codes=self._empty_codes(0))
        self._row_map = {}  # id -> row; None: to be built on first use (a mapped load)
        self._mapping = None  # engine.searcher._Mapping of a load(mmap=True), until the first write
        self._n = 0
        self._next_id = 0

    def _set_layout(self, sizes, vectors, ids, starts=None, codes=None):
        self._sizes = sizes  # (lists,) rows in use per list
        self._vectors = vectors  # (capacity, dim)
        self._ids = ids  # (capacity,)
        self._codes = codes  # (capacity, dim) float16 / uint8 at the same rows, or None (float32 storage)
        self._starts = np.array([0, vectors.shape[0]], np.int64) if starts is None else starts  # (lists + 1,)

    # -- properties ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def nlist(self) -> int:
        return self._nlist

    @property
    def nprobe(self) -> int:
        """Lists probed per query by default (``search(..., nprobe=p)`` overrides it for one search)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value):
        self._nprobe = _positive_int(value, "nprobe")

    @property
    def storage(self) -> str:
        """What the searches read: "float32" (the vectors), "float16" or "int8" (codes, as ``Searcher``'s)."""
        return self._storage

    @property
    def quantiser(self) -> tuple[np.ndarray, np.ndarray] | None:
        """int8 storage: (scale, offset) float32 (dim,) copies, None before the first add and for other storage."""
        return None if self._scale is None else (self._scale.copy(), self._offset.copy())

    def resident_bytes(self) -> int:
        """Bytes of vector data held in this index's own memory (codes, scales, float32 vectors not mapped,
        centroids), capacity included; what a mapping holds counts 0."""
        m = self._mapping
        total = 0
        for a in (self._vectors, self._codes, self._scale, self._offset, self._centroids):
            if a is not None and not (m is not None and (a is m.vectors or a is m.codes)):
                total += a.nbytes
        return total

    def _empty_codes(self, rows: int):
        return None if self._storage == "float32" else np.zeros((rows, self._dim), _CODE_DTYPES[self._storage])

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """Codes of float32 rows ``x`` with the current quantiser (int8) or as float16."""
        if self._storage == "float16":
            return encode_float16(x)
        return np.concatenate([encode_int8(x[r0 : r0 + _ENCODE_ROWS], self._scale, self._offset)
                               for r0 in range(0, x.shape[0], _ENCODE_ROWS)]) if x.shape[0] else \
            np.zeros((0, self._dim), np.uint8)

    def _cover(self, x: np.ndarray, *, fresh: bool = False) -> bool:
        """int8: make the quantiser's range cover the rows ``x`` (set it from them when ``fresh`` or unset;
        else widen it as ``Searcher`` does); True when it changed (every stored code must be made again)."""
        if self._storage != "int8" or x.shape[0] == 0:
            return False
        lo, hi = int8_range(x)
        if fresh or self._scale is None:
            self._scale, self._offset = int8_params(lo, hi)
            return True
        cur_lo = self._offset.astype(np.float64)
        cur_hi = cur_lo + 255.0 * self._scale.astype(np.float64)
        if not ((lo < cur_lo).any() or (hi > cur_hi).any()):
            return False
        new_lo, new_hi = np.minimum(lo, cur_lo), np.maximum(hi, cur_hi)
        margin = (new_hi - new_lo) * _WIDEN
        new_lo, new_hi = new_lo - margin, new_hi + margin
        if self._metric == "cosine":
            new_lo, new_hi = np.maximum(new_lo, -1.0), np.minimum(new_hi, 1.0)
        self._scale, self._offset = int8_params(new_lo, new_hi)
        return True

    @property
    def is_trained(self) -> bool:
        return self._centroids is not None

    @property
    def centroids(self):
        """The (nlist, dim) float32 centroids (a copy), or None while untrained."""
        c = self._centroids
        return None if c is None else c.copy()

    @property
    def list_sizes(self) -> np.ndarray:
        """Vectors per list (a copy): nlist entries once trained, one before."""
        with self._lock.read():
            return self._sizes.copy()

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, list by list (a copy)."""
        with self._lock.read():
            return self._ids[self._used_rows()].copy()

    def __len__(self) -> int:
        return self._n

    def __contains__(self, id_) -> bool:
        return id_ in self._row

    @property
    def _row(self) -> dict:
        """id -> row, built from the ids on first use after a mapped load."""
        rows = self._row_map
        if rows is None:  # concurrent readers may both build it: the same table, harmless
            used = self._used_rows()
            rows = self._row_map = dict(zip(self._ids[used].tolist(), used.tolist()))
        return rows

    @_row.setter
    def _row(self, rows: dict) -> None:
        self._row_map = rows

    @property
    def mapped(self) -> bool:
        """True while the vectors are read from the memory-mapped file (``load(path, mmap=True)``, before any
        ``add``, ``remove`` or ``train``)."""
        m = self._mapping
        return m is not None and self._vectors is m.vectors

    def verify(self) -> None:
        """Check the vectors of a memory-mapped index (read once, block by block) against the file's sha256
        and the contents checks of a plain ``load``; ``IndexFileError`` naming the path. Nothing to do for an
        index in memory (its ``load`` checked everything)."""
        with self._lock.read():
            if self.mapped:
                self._mapping.verify(self._metric)

    def _unmap(self, *, copy: bool) -> None:
        """Before the first write: verify the mapped vectors and, with ``copy``, hold them in memory (``add`` and
        ``train`` need no copy: they lay every list out afresh, a mapped index having no slack); caller holds the
        write lock."""
        if self.mapped:
            self._mapping.verify(self._metric)
            if copy:
                self._vectors = np.array(self._vectors)
                if self._codes is not None:
                    self._codes = np.array(self._codes)

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "untrained"
        storage = "" if self._storage == "float32" else f", storage={self._storage!r}"
        return (f"IVFSearcher(dim={self._dim}, metric={self._metric!r}{storage}, nlist={self._nlist}, "
                f"nprobe={self._nprobe}, count={self._n}, {state})")

    def _used_rows(self) -> np.ndarray:
        """The rows in use, list by list, in row order."""
        caps = np.diff(self._starts)
        offset = np.arange(self._starts[-1]) - np.repeat(self._starts[:-1], caps)
        return np.flatnonzero(offset < np.repeat(self._sizes, caps))

    # -- input coercion ----------------------------------------------------------------------------
    def _coerce(self, x, what: str, *, allow_1d: bool) -> np.ndarray:
        """(n, dim) C-contiguous float32, finite, normalised for cosine; 1-D of length dim -> (1, dim)."""
        x = shaped_rows(x, self._dim, what, allow_1d=allow_1d)
        if x.dtype in (np.float32, np.float64):  # one pass in numba (the numpy steps below cost ~20 us a search)
            out = np.empty(x.shape, dtype=np.float32)
            if prepare_rows(x, self._metric == "cosine", out) < 0:
                return out
        return checked_rows(x, self._metric, what)  # float16, or a row to refuse: the numpy steps name every row

    _coerce_ids = staticmethod(coerce_ids)

    # -- training --------------------------------------------------------------------------------
    def train(self, sample) -> None:
        """Fit the ``nlist`` centroids to ``sample`` (m >= nlist, dim) and move the stored vectors to their
        lists. Runs the k-means before taking the lock; nothing changes when it raises."""
        x = self._coerce(sample, "training vectors", allow_1d=False)
        if x.shape[0] < self._nlist:
            raise InputError(f"training needs at least nlist = {self._nlist} vectors, got {x.shape[0]}")
        centroids = self._kmeans(x)
        with self._lock.write():
            self._unmap(copy=False)  # the stored rows are copied out below
            stored = self._used_rows()
            vectors, ids = self._vectors[stored], self._ids[stored]
            self._centroids = centroids
            self._build(vectors, ids)

    def _kmeans(self, x: np.ndarray) -> np.ndarray:
        """Unit centroids (nlist, dim) of (a ``train_size`` subset of) the coerced vectors ``x``."""
        if x.shape[0] > self._train_size:
            rng = np.random.default_rng(self._seed)
            x = x[np.sort(rng.choice(x.shape[0], size=self._train_size, replace=False))]
        if self._metric == "ip":
            x = _normalised(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return spherical_kmeans(x, self._nlist, iterations=KMEANS_ITERATIONS, seed=self._seed).centroids

    def _assign(self, x: np.ndarray) -> np.ndarray:
        """The list of each row of ``x`` (m,) int64: its centroid of highest inner product."""
        m = x.shape[0]
        labels = np.zeros(m, dtype=np.int64)
        if self._centroids is None or m == 0:
            return labels
        ct = np.ascontiguousarray(self._centroids.T)
        block = max(MIN_BLOCK, ASSIGN_BUFFER_FLOATS // self._nlist)

        def part(lo, hi):
            buf = np.empty((min(block, hi - lo), self._nlist), dtype=np.float32)
            for r0 in range(lo, hi, block):
                r1 = min(hi, r0 + block)
                out = buf[: r1 - r0]
                np.matmul(x[r0:r1], ct, out=out)
                argmax_labels(out, r1 - r0, labels, r0)

        parts = self._threads if m >= PARALLEL_ASSIGN_ROWS and blas_controllable() else 1
        if parts == 1:
            part(0, m)
        else:
            step = math.ceil(m / parts)
            with blas_single_thread():
                futures = [worker_pool(parts).submit(part, lo, min(m, lo + step)) for lo in range(0, m, step)]
                for f in futures:
                    f.result()
        return labels

    # -- layout ----------------------------------------------------------------------------------
    def _build(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Lay out these vectors and ids afresh (assigned to the current centroids); caller holds the lock."""
        labels = self._assign(vectors)
        lists = self._nlist if self._centroids is not None else 1
        sizes = np.bincount(labels, minlength=lists).astype(np.int64)
        starts = _starts_for(sizes)
        new_vectors, new_ids = _empty_storage(int(starts[-1]), self._dim)
        self._set_layout(np.zeros(lists, np.int64), new_vectors, new_ids, starts, self._empty_codes(int(starts[-1])))
        rows = np.empty(ids.shape[0], dtype=np.int64)
        place_rows(vectors, ids, labels, self._vectors, self._ids, self._starts, self._sizes, rows)
        self._row = dict(zip(ids.tolist(), rows.tolist()))
        if self._codes is not None:
            self._cover(vectors, fresh=True)  # every row is encoded afresh: the tightest range
            self._codes[rows] = self._encode(vectors)

    def _make_room(self, extra: np.ndarray) -> None:
        """Ensure list ``l`` can take ``extra[l]`` more rows; relays every list out when one cannot."""
        needed = self._sizes + extra
        if (needed <= np.diff(self._starts)).all():
            return
        starts = _starts_for(needed)
        vectors, ids = _empty_storage(int(starts[-1]), self._dim)
        copy_lists(self._vectors, self._ids, self._starts, self._sizes, vectors, ids, starts)
        codes = self._empty_codes(int(starts[-1]))
        if codes is not None:
            raw = np.uint16 if codes.dtype == np.float16 else np.uint8  # numba has no float16: copy the bits
            copy_list_rows(self._codes.view(raw), self._starts, self._sizes, codes.view(raw), starts)
        self._set_layout(self._sizes, vectors, ids, starts, codes)
        rows = self._used_rows()
        self._row = dict(zip(self._ids[rows].tolist(), rows.tolist()))

    # -- mutation --------------------------------------------------------------------------------
    def add(self, vectors, ids=None) -> np.ndarray:
        """Store ``vectors`` (n, dim); returns their ids (int64). Nothing is stored when it raises."""
        x = self._coerce(vectors, "vectors", allow_1d=False)
        m = x.shape[0]
        if self._storage == "float16" and m:
            big = np.abs(x).max(axis=1) > _F16_MAX
            if big.any():
                raise InputError(f"float16 storage holds values up to {_F16_MAX:g} in magnitude; vectors in rows "
                                 f"{_rows_named(big)} exceed it")
        with self._lock.write():
            new_ids = self._new_ids(m, ids)
            if m == 0:
                return new_ids
            self._unmap(copy=False)  # no slack in a mapped index: the lists are laid out afresh in memory below
            if self._centroids is None and self._n + m >= TRAIN_MIN_PER_LIST * self._nlist:
                stored = self._used_rows()
                everything = np.concatenate([self._vectors[stored], x])
                all_ids = np.concatenate([self._ids[stored], new_ids])
                self._centroids = self._kmeans(everything)
                self._build(everything, all_ids)
            else:
                labels = self._assign(x)
                self._make_room(np.bincount(labels, minlength=self._sizes.shape[0]))
                rows = np.empty(m, dtype=np.int64)
                place_rows(x, new_ids, labels, self._vectors, self._ids, self._starts, self._sizes, rows)
                self._row.update(zip(new_ids.tolist(), rows.tolist()))
                if self._codes is not None:
                    if self._cover(x):  # the range widened: every stored row is encoded again
                        used = self._used_rows()
                        self._codes[used] = self._encode(self._vectors[used])
                    else:
                        self._codes[rows] = self._encode(x)
            self._n += m
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            return new_ids.copy()

    def _new_ids(self, m: int, ids) -> np.ndarray:
        """The ids of ``m`` new vectors: ``ids`` checked, or the next automatic ones; caller holds the lock."""
        if ids is None:
            if self._next_id + m - 1 > _MAX_ID:
                raise InputError(
                    f"no automatic ids left for {m} vectors: the next would be {self._next_id}, past int64's "
                    f"{_MAX_ID} (an id that high was given); give ids explicitly")
            return np.arange(self._next_id, self._next_id + m, dtype=np.int64)
        new_ids = self._coerce_ids(ids)
        if new_ids.shape[0] != m:
            raise InputError(f"got {m} vectors but {new_ids.shape[0]} ids")
        if m and new_ids.min() < 0:
            raise InputError(f"ids must be >= 0 (-1 marks a missing hit), got {int(new_ids.min())}")
        uniq, counts = np.unique(new_ids, return_counts=True)
        if (counts > 1).any():
            raise InputError(f"id {int(uniq[counts > 1][0])} is given more than once")
        present = [i for i in new_ids.tolist() if i in self._row]
        if present:
            more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
            raise InputError(f"id {present[0]} is already in the index{more}")
        return new_ids

    def remove(self, ids) -> int:
        """Remove the vectors with these ids; returns how many were removed (unknown ids are ignored)."""
        todo = self._coerce_ids(ids)
        removed = 0
        with self._lock.write():
            if self.mapped and any(id_ in self._row for id_ in todo.tolist()):
                self._unmap(copy=True)
            starts, sizes = self._starts, self._sizes
            for id_ in todo.tolist():
                row = self._row.pop(id_, None)
                if row is None:
                    continue
                lst = int(np.searchsorted(starts, row, side="right")) - 1
                last = int(starts[lst] + sizes[lst]) - 1
                if row != last:  # move the list's last row into the hole
                    moved = int(self._ids[last])
                    self._vectors[row] = self._vectors[last]
                    if self._codes is not None:
                        self._codes[row] = self._codes[last]
                    self._ids[row] = moved
                    self._row[moved] = row
                sizes[lst] -= 1
                removed += 1
            self._n -= removed
        return removed

    def get(self, ids) -> np.ndarray:
        """The stored vectors of ``ids``, (m, dim) float32 (normalised for cosine); unknown id -> KeyError."""
        want = self._coerce_ids(ids)
        with self._lock.read():
            rows = np.empty(want.shape[0], dtype=np.int64)
            for i, id_ in enumerate(want.tolist()):
                try:
                    rows[i] = self._row[id_]
                except KeyError:
                    raise KeyError(f"id {id_} is not in the index") from None
            return self._mapping.rows(rows) if self.mapped else self._vectors[rows]  # rows: pread when compressed

    # -- search ----------------------------------------------------------------------------------
    def search(self, queries, k: int, *, nprobe=None, rerank=None):
        """Top-k of each query among the vectors of its ``nprobe`` (default ``self.nprobe``) best lists:
        ``(scores (nq, k') float32, ids (nq, k') int64)``, best first; see the module docstring.

        Compressed storage: scores of the codes; ``rerank=R`` keeps the best ``max(R, k)`` of the probed lists
        by the codes and scores them again exactly against the float32 vectors (read for those rows only), as
        ``Searcher.search``; ignored for float32 storage."""
        k = _positive_int(k, "k")
        nprobe = self._nprobe if nprobe is None else _positive_int(nprobe, "nprobe")
        if rerank is not None:
            rerank = _positive_int(rerank, "rerank")
        q = self._coerce(queries, "queries", allow_1d=True)
        with self._lock.read():
            n = self._n
            cols = answer_columns(k, n)
            rerank = rerank if self._codes is not None and n else None
            width = cols if rerank is None else answer_columns(max(rerank, cols), n)
            try:
                hs, hr = heap_init(q.shape[0], width)
            except ResultTooLarge as e:
                raise InputError(f"k = {k} is too large: {e} (the index holds {n} vectors)") from None
            if n and q.shape[0]:
                self._scan(q, self._probes(q, nprobe), hs, hr, rows=rerank is not None)
            heap_sort(hs, hr)
            if rerank is None:
                return hs, hr
            # hr holds rows (-1: none): scored exactly, equal scores ordered by id as everywhere else
            tie = np.where(hr >= 0, self._ids[np.maximum(hr, 0)], -1)
            fetch = self._mapping.rows if self.mapped else self._vectors.__getitem__
            scores, order = rerank_candidates(q, hr, fetch, tie, cols)
            return scores, np.take_along_axis(tie, order, axis=1)

    def _probes(self, q: np.ndarray, nprobe: int) -> np.ndarray:
        """(nq, p) int64: each query's non-empty lists to scan, best centroid first (-1: none)."""
        if self._centroids is None:
            return np.zeros((q.shape[0], 1), dtype=np.int64)
        nprobe = min(nprobe, self._nlist)
        probes = np.empty((q.shape[0], nprobe), dtype=np.int64)
        top_lists(q @ self._centroids.T, self._sizes, nprobe, probes)
        return probes

    def _scan(self, q, probes, hs, hr, *, rows=False) -> None:
        """Merge the vectors of each query's probed lists into its heap; caller holds the read lock.

        The (query, list) pairs are grouped by list; each list is read once and scored against the queries
        that probe it. The lists are cut into runs of about equal work, one per worker thread, each worker
        with its own heaps (merged into ``hs, hr`` at the end)."""
        nq = q.shape[0]
        offsets, qidx, todo, cost = group_by_list(probes, self._sizes)
        threads = self._threads if int(cost.sum()) * self._dim >= SMALL_WORK else 1
        blas = self._method == "blas" and self._codes is None
        part = self._part_blas if blas else self._part_numba
        if self._codes is not None:  # rows: the heaps hold rows, not ids (a re-ranked short list)
            prep = int8_queries(q, self._scale, self._offset) if self._storage == "int8" else None
            part = functools.partial(self._part_codes, prep=prep, rows=rows)
        if threads == 1 or todo.shape[0] < 2 or (blas and not blas_controllable()):
            part(q, todo, qidx, offsets, hs, hr)
            return
        cuts = _balanced_cuts(cost, threads)
        parts = [todo[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        heaps = [(hs, hr)] + [heap_init(nq, hs.shape[1]) for _ in parts[1:]]
        pool = worker_pool(threads)
        with blas_single_thread() if blas else contextlib.nullcontext():
            futures = [pool.submit(part, q, lists, qidx, offsets, s, r) for lists, (s, r) in zip(parts, heaps)]
            for f in futures:
                f.result()
        for s, r in heaps[1:]:
            merge_heaps(s, r, hs, hr)

    def _part_numba(self, q, lists, qidx, offsets, hs, hr) -> None:
        scan_grouped(q, qidx, offsets, lists, self._vectors, self._ids, self._starts, self._sizes, hs, hr)

    def _part_codes(self, q, lists, qidx, offsets, hs, hr, *, prep, rows) -> None:
        """``_part_numba`` over the codes; with ``rows`` the heaps get each vector's row instead of its id."""
        if prep is not None:
            qi, qstep, const = prep
            scan_grouped_int8(qi, qstep, const, qidx, offsets, lists, self._codes, self._ids, rows, self._starts,
                              self._sizes, hs, hr)
        else:
            scan_grouped_f16(q, qidx, offsets, lists, self._codes.view(np.uint16), self._ids, rows, self._starts,
                             self._sizes, hs, hr)

    def _part_blas(self, q, lists, qidx, offsets, hs, hr) -> None:
        """As ``_part_numba``, with each list's scores from one BLAS product against its gathered queries."""
        vectors, ids, starts, sizes = self._vectors, self._ids, self._starts, self._sizes
        tile = min(QUERY_TILE, int(np.diff(offsets)[lists].max()))
        qbuf = np.empty((tile, self._dim), dtype=np.float32)
        sbuf = np.empty(max(SCORE_BUFFER_FLOATS, tile * MIN_BLOCK), dtype=np.float32)
        for lst in lists.tolist():
            lo = int(starts[lst])
            hi = lo + int(sizes[lst])
            group = qidx[offsets[lst] : offsets[lst + 1]]
            for g0 in range(0, group.shape[0], tile):
                g = group[g0 : g0 + tile]
                m = g.shape[0]
                qb = np.take(q, g, axis=0, out=qbuf[:m])
                block = max(MIN_BLOCK, sbuf.shape[0] // m)
                for r0 in range(lo, hi, block):
                    r1 = min(hi, r0 + block)
                    out = sbuf[: m * (r1 - r0)].reshape(m, r1 - r0)
                    np.matmul(qb, vectors[r0:r1].T, out=out)
                    merge_gathered(out, m, r1 - r0, g, ids[r0:r1], hs, hr)

    # -- files -----------------------------------------------------------------------------------
    def _header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "dim": self._dim,
            "metric": self._metric,
            "count": self._n,
            "next_id": self._next_id,
            "nlist": self._nlist,
            "nprobe": self._nprobe,
            "train_size": self._train_size,
            "seed": self._seed,
            "trained": self._centroids is not None,
        }

    def save(self, path) -> None:
        """Write the index to ``path`` atomically (see the module docstring for the format), also over the file a
        mapped index reads from."""
        path = Path(path)
        with self._lock.read():
            rows = self._used_rows()
            centroids = np.zeros((0, self._dim), "<f4") if self._centroids is None else self._centroids
            vectors = self._vectors if self.mapped else self._vectors[rows]  # mapped: already list by list
            arrays = (np.ascontiguousarray(centroids, dtype="<f4"),
                      np.concatenate([[0], np.cumsum(self._sizes)]).astype("<i8"),
                      np.ascontiguousarray(self._ids[rows], dtype="<i8"),
                      np.ascontiguousarray(vectors, dtype="<f4"))
            named = dict(zip(SECTIONS, arrays))
            compressed = self._codes is not None
            if compressed:
                if self._storage == "int8":  # scale 1, offset 0 before the first add (then count is 0)
                    scale = np.ones(self._dim) if self._scale is None else self._scale
                    offset = np.zeros(self._dim) if self._offset is None else self._offset
                    named["quant"] = np.concatenate([scale, offset]).astype("<f4")
                codes = self._codes if self.mapped else self._codes[rows]
                named["codes"] = np.ascontiguousarray(codes, dtype=_CODE_DTYPES[self._storage])
            arrays = tuple(named.values())
            digests = {name: _sha256((named[name],)) if name in named else None
                       for name in (SECTIONS_V3 if compressed else SECTIONS)}
            if self.mapped and (digests["vectors"] != self._mapping.sha256
                                or (compressed and digests["codes"] != self._mapping.codes_sha256)):
                raise IndexFileError(f"{self._mapping.path}: checksum mismatch in the vectors section: the mapped "
                                     f"file changed or was damaged since it was opened; not saved to {path}")
            header = {**self._header(), "section_sha256": digests}
            if compressed:
                header["format_version"] = COMPRESSED_FORMAT_VERSION
                header["storage"] = self._storage
            atomic_write(path, header_line(MAGIC, header), *(_bytes_of(a) for a in arrays))

    @classmethod
    def load(cls, path, *, threads=None, mmap=False) -> "IVFSearcher":
        """Read an index written by ``save`` (format 1 or 2); damaged files raise ``IndexFileError`` naming the
        path. ``mmap=True`` maps the vectors instead of reading them (format 2; see the module docstring);
        ``mmap="verify"`` maps them and runs ``verify()`` before returning."""
        path = Path(path)
        if not (mmap is False or mmap is True or mmap == "verify"):
            raise InputError(f"mmap must be False, True or 'verify', got {mmap!r}")
        opened = _map_file(path, whole=not mmap)
        if opened is None:
            header, digest, body = _read_file(path)
            view = memoryview(body)
            parts = {name: view[at : at + size] for name, (at, size) in _sections(header).items()}
            if header["format_version"] >= 2:
                _check_digests(path, header, digest, parts)
            mapping = None
        else:
            header, parts, mapping = opened
        dim, count, nlist, trained = header["dim"], header["count"], header["nlist"], header["trained"]
        centroids = np.frombuffer(parts["centroids"], "<f4").reshape(-1, dim)
        offsets = np.frombuffer(parts["offsets"], "<i8")
        ids = np.frombuffer(parts["ids"], "<i8")
        if mapping is None:
            vectors = np.frombuffer(parts["vectors"], "<f4").reshape(count, dim)
            if header["format_version"] < 2 and _digest(header, (centroids, offsets, ids, vectors)) != digest:
                raise IndexFileError(f"{path}: checksum mismatch, the index file was altered or damaged")
            problem = _layout_problem(offsets, count) or _contents_problem(ids, vectors, header["metric"],
                                                                           header["next_id"])
        else:
            vectors = mapping.vectors
            problem = _layout_problem(offsets, count) or _ids_problem(ids, header["next_id"])  # vectors: verify()
        if problem is None and trained:
            problem = _centroid_problem(centroids)
        if problem:
            raise IndexFileError(f"{path}: damaged index: {problem}")
        storage = header["storage"] if header["format_version"] >= 3 else "float32"
        s = cls(dim, metric=header["metric"], nlist=nlist, nprobe=header["nprobe"],
                train_size=header["train_size"], seed=header["seed"], threads=threads, storage=storage)
        if trained:
            s._centroids = centroids.astype(np.float32)
        sizes = np.diff(offsets).astype(np.int64)
        if mapping is not None:  # the file's layout: lists back to back, no slack
            codes = None
            if mapping.codes is not None:  # compressed: codes in memory unless mmap; the float32 vectors mapped
                codes = mapping.codes if mmap else np.array(mapping.codes)
                if count and mapping.scale is not None:
                    s._scale, s._offset = mapping.scale.copy(), mapping.offset.copy()
            s._set_layout(sizes, vectors, ids.astype(np.int64, copy=False), offsets.astype(np.int64), codes)
            s._mapping = mapping
            s._row = None  # built on first use
            if mapping.codes is not None and not mmap:  # read whole: everything checked now
                mapping.verify(header["metric"])
                mapping.release()
        else:
            starts = _starts_for(sizes)
            new_vectors, new_ids = _empty_storage(int(starts[-1]), dim)
            s._set_layout(sizes, new_vectors, new_ids, starts)
            rows = s._used_rows()  # the file's rows, list by list, in the new layout (with slack)
            new_vectors[rows] = vectors
            new_ids[rows] = ids
            s._row = dict(zip(ids.tolist(), rows.tolist()))
        s._n = count
        s._next_id = header["next_id"]
        if mmap == "verify":
            s.verify()
        return s


def _empty_storage(rows: int, dim: int):
    return np.empty((rows, dim), dtype=np.float32), np.full(rows, -1, dtype=np.int64)


def _starts_for(sizes: np.ndarray) -> np.ndarray:
    """Starts (lists + 1,) of a layout holding ``sizes`` rows per list plus slack."""
    caps = sizes + np.maximum(MIN_SLACK, (sizes * SLACK).astype(np.int64))
    starts = np.zeros(sizes.shape[0] + 1, dtype=np.int64)
    np.cumsum(caps, out=starts[1:])
    return starts


def _balanced_cuts(cost: np.ndarray, parts: int) -> list[int]:
    """Cut points 0 = c0 <= c1 <= ... <= c_parts = len(cost) splitting ``cost`` into contiguous runs of
    about equal sums."""
    total = np.cumsum(cost, dtype=np.float64)
    if total.shape[0] == 0 or total[-1] <= 0:
        return [0] * parts + [int(cost.shape[0])]
    marks = total[-1] * np.arange(1, parts) / parts
    return [0, *np.searchsorted(total, marks, side="left").tolist(), int(cost.shape[0])]


def _digest(header: dict, arrays) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B"))
    return h.hexdigest()


def _layout_problem(offsets: np.ndarray, count: int) -> str | None:
    """Why ``offsets`` (lists + 1,) cannot delimit lists of ``count`` rows, or None."""
    sizes = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != count or (sizes < 0).any():
        bad = np.flatnonzero(sizes < 0)
        where = f" (list {int(bad[0])} would hold {int(sizes[bad[0]])} vectors)" if bad.size else ""
        return (f"list offsets must rise from 0 to count {count}, got {int(offsets[0])} .. {int(offsets[-1])}"
                f"{where}")
    return None


def _centroid_problem(centroids: np.ndarray) -> str | None:
    sq = _sq_norms(centroids)
    off = ~np.isfinite(sq) | ((np.abs(np.sqrt(sq) - 1.0) > _CENTROID_TOL) & (sq != 0))
    if off.any():
        return f"centroids must be finite unit (or zero) vectors, but rows {_rows_named(off)} are not"
    return None


def _read_header(f, path: Path) -> dict:
    line = f.read(len(MAGIC))
    if line == MAGIC:
        line += f.readline(MAX_HEADER)
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        raise IndexFileError(
            f"{path} is not a lookalike IVF index file (no '{MAGIC.decode().strip()}' header line)")
    return _header_fields(path, line[len(MAGIC) :])


def _sections(header: dict) -> dict:
    """{section: (offset in the payload, bytes)}, in file order."""
    count, dim, nlist, trained = header["count"], header["dim"], header["nlist"], header["trained"]
    sizes = {"centroids": nlist * dim * 4 if trained else 0, "offsets": ((nlist if trained else 1) + 1) * 8,
             "ids": count * 8, "vectors": count * dim * 4}
    if header["format_version"] >= 3:
        storage = header["storage"]
        if storage == "int8":
            sizes["quant"] = 2 * dim * 4  # scale then offset, float32
        sizes["codes"] = count * dim * _CODE_DTYPES[storage].itemsize
    out, at = {}, 0
    for name, size in sizes.items():
        out[name] = (at, size)
        at += size
    return out


def _read_file(path: Path) -> tuple[dict, str, bytes]:
    """(header without its sha256, that sha256, payload), the header's fields checked, the payload read only
    when its size is the one the header gives."""
    try:
        with open(path, "rb") as f:
            header = _read_header(f, path)
            expected = sum(size for _, size in _sections(header).values())
            body = read_payload(f, expected, lambda found: IndexFileError(
                f"{path}: truncated or damaged index: payload is {found} bytes, header says {expected}"))
    except IndexFileError:
        raise
    except OSError as e:
        raise IndexFileError(f"cannot read index file {path}: {e.strerror or e}") from e
    digest = header.pop("sha256")
    return header, digest, body


def _map_file(path: Path, *, whole: bool = False):
    """(header, {section: bytes} of the centroids, offsets, ids (and quant), the vectors' (and codes')
    ``_Mapping``) of a version-2 or 3 file, all but the vectors and codes checked against their digests; None,
    with a ``UserWarning``, for version 1. ``whole`` (a plain load): maps version 3 alone (its float32 vectors
    stay in the file, its codes are copied into memory by the caller) and returns None for the others."""
    try:
        with open(path, "rb") as f:
            header = _read_header(f, path)
            version = header["format_version"]
            if whole and version < 3:
                return None
            if version < 2:
                warnings.warn(f"{path}: IVF index format version {header['format_version']} cannot be memory-mapped "
                              f"(no aligned vectors, no checksum of their own): read whole instead; save it again "
                              f"(this build writes version {FORMAT_VERSION}) to map it", UserWarning, stacklevel=3)
                return None
            sections = _sections(header)
            start, parts = _read_small_sections(f, path, header, sections, _layout_text(header))
            storage = header["storage"] if version >= 3 else "float32"
            mapping = _map_payload(f, path, header, parts, sections, start, storage)
    except IndexFileError:
        raise
    except (OSError, ValueError) as e:
        verb = "read" if whole else "map"
        raise IndexFileError(f"cannot {verb} index file {path}: {getattr(e, 'strerror', None) or e}") from e
    return header, parts, mapping


def _layout_text(header: dict) -> str:
    """For a compressed (format 3) IVF index: what the header's size is made of, naming the codes' dtype."""
    if header["format_version"] < 3:
        return ""
    storage = header["storage"]
    parts = ", ".join(f"{name} {size}" for name, (_, size) in _sections(header).items())
    return (f" ({parts} bytes; codes: count {header['count']} x dim {header['dim']} "
            f"{_CODE_DTYPES[storage].name} for storage {storage!r})")


_FIELDS = ("sha256", "dim", "metric", "count", "next_id", "nlist", "nprobe", "train_size", "seed", "trained")


def _header_fields(path: Path, text: bytes) -> dict:
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError(f"expected a JSON object, got {type(header).__name__}")
        version = header["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise IndexFileError(f"{path}: damaged index header ({e})") from e
    if version not in READS_VERSIONS or not _is_int(version):
        raise IndexFileError(f"{path}: IVF index format version {version!r}; this build reads versions "
                             f"{', '.join(map(str, READS_VERSIONS[:-1]))} and {READS_VERSIONS[-1]}")
    missing = [key for key in _FIELDS if key not in header]
    if missing:
        raise IndexFileError(f"{path}: damaged index header (no {', '.join(missing)})")

    def bad(field, expected):
        return IndexFileError(f"{path}: damaged index header ({field}={header[field]!r}, expected {expected})")

    for field in ("dim", "nlist", "nprobe", "train_size"):
        if not (_is_int(header[field]) and header[field] > 0):
            raise bad(field, "a positive int")
    for field in ("count", "seed"):
        if not (_is_int(header[field]) and header[field] >= 0):
            raise bad(field, "an int >= 0")
    if not (_is_int(header["next_id"]) and 0 <= header["next_id"] <= _MAX_ID + 1):
        raise bad("next_id", "an int in [0, 2**63]")
    if header["metric"] not in METRICS:
        raise bad("metric", f"one of {METRICS}")
    if type(header["trained"]) is not bool:
        raise bad("trained", "true or false")
    if header["train_size"] < header["nlist"]:
        raise bad("train_size", f"at least nlist = {header['nlist']}")
    if not isinstance(header["sha256"], str):
        raise bad("sha256", "a hex string")
    names = SECTIONS
    optional = ()
    if version >= 3:
        storage = header.get("storage")
        if not isinstance(storage, str) or storage not in _CODE_DTYPES:
            raise IndexFileError(f"{path}: damaged index header (storage={storage!r}, expected 'float16' or 'int8' "
                                 f"in a version-3 IVF index; a float32 one is version 2)"[:500])
        names = SECTIONS_V3
        optional = ("quant",) if storage == "float16" else ()
    if version >= 2:
        digests = header.get("section_sha256")
        if not (isinstance(digests, dict) and set(digests) == set(names)
                and all(digests[k] is None if k in optional else isinstance(digests[k], str) for k in names)):
            raise IndexFileError(f"{path}: damaged index header (section_sha256={digests!r}, expected an object "
                                 f"with a sha256 for each of {', '.join(k for k in names if k not in optional)})"
                                 [:500])
    return header


def _is_int(value) -> bool:
    return type(value) is int
