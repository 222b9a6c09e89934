"""Exact similarity search over stored vectors: ``Searcher``.

    s = Searcher(128)                      # cosine; Searcher(128, metric="ip") for raw inner product
    ids = s.add(vectors)                   # (n, 128) floats -> int64 ids 0 .. n-1
    scores, ids = s.search(queries, k=10)  # (nq, 10) float32 and int64, best first
    s.save("index.lkx"); s = Searcher.load("index.lkx")
    s.add(vectors, meta=["a.jpg", "b.jpg"]); s.meta(ids)   # one string per vector, saved in the file

Contract
- ``metric="cosine"``: stored vectors and queries are L2-normalised (in float64, then stored as float32),
  so scores are cosine similarities; zero vectors stay zero and score 0 against everything.
  ``metric="ip"``: raw inner product; a vector whose squared norm exceeds the float32 range is refused,
  so no score can overflow.
- Inputs: any real floating dtype (float16/32/64) is cast to float32; integer, bool, complex, object and
  string arrays are refused with ``InputError`` naming the dtype, and so are NaN and inf (after the cast;
  the message lists the offending row numbers). ``add`` and ``get`` return or take (n, dim) arrays.
- ``search(queries, k)``: ``queries`` (nq, dim), or one query as a 1-D array of length dim, which is
  answered as (1, k). Returns ``(scores, ids)``, float32 and int64, (nq, k), best first; on equal scores
  the vector stored in the lower row comes first (rows follow insertion order until a ``remove`` moves the
  last row into the hole). With fewer than k vectors stored the answer is padded with id -1 and score
  -inf (an empty index answers padding only). ``k`` must be a positive int. The answer never has more
  columns than ``max(len(index), 1024)`` (``engine.result_size.answer_columns``): a ``k`` beyond both
  is answered as if it were that (every stored vector, then padding up to 1024 columns), so memory follows
  the index, not ``k``.
- ids: int64 >= 0 (-1 marks a missing hit). ``add`` without ids numbers the new vectors from one past the
  highest id ever assigned, increasing; an id already in the index, or repeated within the call, is
  refused (``InputError`` naming it) and nothing is added.
- ``remove(ids)`` removes the vectors with those ids and returns how many it removed: ids not in the
  index are ignored (so removing twice is harmless and returns 0 the second time).
- ``get(ids)`` returns the stored vectors (normalised for cosine), (m, dim) float32, in the order asked;
  an id not in the index raises ``KeyError`` naming it.
- Metadata: ``add(vectors, ids, meta=[...])`` stores one string per vector (``None`` for none; text that
  encodes as UTF-8, at most ``MAX_META_BYTES`` bytes each); ``meta(ids)`` reads them back
  (``list[str | None]``, in the order asked, ``KeyError`` for an unknown id). ``add_images`` given file paths
  records each path as its meta (``str(path)`` as given; bytes of a file name that are not UTF-8 become
  ``\\xNN`` escapes, ``meta_text``) and a ``FileStamp`` of the file (size, modification time in ns, sha256 of
  its bytes, read just before the embedding); ``stamps(ids)`` reads them back (``FileStamp | None``), so a folder can
  be indexed again incrementally (``python -m engine.search index``). ``add(..., stamps=[...])`` stores
  stamps the caller made. ``remove`` drops a vector's meta and stamp with it.
- Thread-safe: searches run concurrently with each other; ``add`` / ``remove`` / ``load`` wait for them and
  run alone (a readers-writer lock), so every answer reflects one consistent state of the index.
- Exact: ``engine.kernels.topk.topk_ip`` (BLAS matrix products, on BLAS's own threads, over blocks of
  stored rows, each block's scores merged into per-query heaps by numba); memory beyond the index is
  bounded (a 4 MiB score buffer, 16 MiB for small searches, the heaps and the answer).

File format (``save`` / ``load``), version 3 (``save`` writes it for float32 storage, version 4 for compressed
storage, see below; ``load`` reads versions 1, 2, 3 and 4): one
header line ``LOOKALIKE-INDEX {json}`` padded with spaces to a multiple of ``ALIGN`` (64) bytes including its
closing ``\\n``, then the payload, every number little-endian:

    ids        count int64                                  (at a multiple of 64 bytes in the file)
    vectors    count x dim float32, row major               (at a multiple of 8: np.memmap-able)
    stamps     (only when the header's ``stamps`` is true) count records of 48 bytes: size int64 (-1: no
               stamp, then the other fields are zero), mtime_ns int64, sha256 32 bytes
    meta       (only when the header's ``meta_bytes`` is an int, not null) ``count + 1`` uint64 byte offsets
               into the blob (the first 0, the last ``meta_bytes``, never decreasing), ``count`` uint8 flags
               (1: the vector has a meta string, bytes ``offsets[i]:offsets[i+1]``; 0: none, an empty span),
               then the blob: ``meta_bytes`` bytes, each span valid UTF-8 of at most ``MAX_META_BYTES``

The header holds ``format_version``, ``dim``, ``metric``, ``count``, ``next_id``, ``model`` (the identity of
the attached image encoder, or null), ``model_path`` (the file that encoder was loaded from, or null: a hint
for the command line, never loaded unless its identity matches), ``stamps``, ``meta_bytes``,
``section_sha256`` (an object: the sha256 of each section's bytes, ``ids``, ``vectors``, ``stamps``, ``meta``,
null for an absent section) and ``sha256``, the digest of the header's other fields (canonical JSON), which
so covers every section through its digest. Versions 1 and 2 (still read) have no padding and no
``section_sha256``; their ``sha256`` is the digest of the header's other fields followed by the whole payload.
Version 1 is version 2 without the ``model_path``, ``stamps`` and ``meta_bytes`` fields and their sections (ids
and vectors only); it loads with no meta and no stamps. The file is written atomically (temporary file in the
same folder, fsync, ``os.replace``); a truncated or altered file, or another format version, is refused with
``IndexFileError`` naming the path. ``load`` reads the header line first and the payload only when the
file's size is the one the header gives (no reading ``/dev/zero`` or a huge sparse file; the sections'
sizes follow from ``count``, ``dim``, ``stamps`` and ``meta_bytes``), unpickles nothing, and refuses, even
under a correct checksum, what ``add`` could never have stored: meta offsets that decrease, leave the blob, or
give an absent meta a span, a span longer than ``MAX_META_BYTES`` or not valid UTF-8, a flag other than 0 or 1,
a stamp with a negative size other than -1 or a -1 stamp with other fields set, a negative or repeated id, a ``next_id``
not above every id (the next automatic id would repeat one), NaN or inf, a cosine vector neither of unit
length nor zero (within float32 rounding), an ip vector whose squared norm exceeds float32's range. (Ids
need not be below ``count``: removals leave gaps.)

Memory-mapped load (``load(path, mmap=True)``, larger than memory): the vectors stay in the file, mapped
read-only (``mmap.ACCESS_READ``, no commit charge), and are paged in by the searches that touch them; the
header, the ids, the stamps and the meta are read, checked against their section digests and parsed at
open (an index without stamps or meta holds no list of Nones for them until its first write), as are the
header's promises (sizes against the file's length, a regular file, the vectors' alignment) and the ids
(>= 0, distinct, below ``next_id``), so a damaged or crafted file is refused at open with the message a plain
load gives for those parts. The vectors cannot be checked without reading them all, which
opening must not do: ``verify()`` (or ``load(path, mmap="verify")``) reads them once, checks their section
digest and the contents checks above (``IndexFileError`` naming the path). The id -> row table is built on
first use (``get``, ``meta``, ``add``, ``remove``, ``in``), not at open. A mapped index is unchanged until
written to: ``add`` and ``remove`` first verify the mapped vectors and copy them into memory (what a plain
load does; ``mapped`` is False from then on), so the file is never written through the mapping. ``save``
still writes a new file atomically, also over the very file that is mapped (the rename leaves the mapping on
the old file's data, which stays valid until the index is dropped; on Linux, not Windows); saving vectors
still mapped compares their digest with the file's and refuses (``IndexFileError``) vectors that changed on
disk since the open. Versions 1 and 2 cannot be mapped (no aligned vectors, no section digests): ``mmap=True``
reads them whole with a ``UserWarning`` saying so; saving them again writes version 3. (Truncating a mapped
file in place, not through ``save``, makes the pages past its new end unreadable: the process gets SIGBUS,
as with any memory map.) The searches read the mapped (C-contiguous float32) array block by block; nothing
copies it whole.

Compressed storage (``Searcher(dim, storage="float16" | "int8")``; ``storage="float32"``, the default, is the
exact index above, unchanged): the searches read codes instead of the float32 vectors, 2 bytes (float16) or 1
byte (int8) per component, so a scan moves a half or a quarter of the bytes (``engine.kernels.quant``).
- float16: each component rounded to float16; ``add`` refuses a component beyond float16's range (65504) with
  ``InputError`` naming the rows. int8: per dimension an offset and a scale (``quantiser``), a component x
  stored as the code ``clip(rint((x - offset) / scale), 0, 255)``; the first ``add`` sets each dimension's
  range to that of its vectors, a later ``add`` whose vectors leave it widens it (by 1/16 of its width on each
  side; within [-1, 1] under cosine) and encodes every stored row again from its float32 vector (so no stored
  component is ever clipped).
- Scores: the inner product of the float32 query with the values the codes stand for; int8 scores are
  accumulated in int32 (exact integers: the same bits on every CPU, AVX2 without VNNI included, and whatever
  the number of queries; see ``engine.kernels.quant``). ``search(q, k, rerank=R)`` re-ranks: the best
  ``max(R, k)`` by the codes are scored again exactly against the float32 vectors (reading only those rows),
  and the best ``k'`` of them are answered with float32 scores. Ids, padding and order are as above.
- Where the float32 vectors live: they are kept (``get``, re-ranking, ``save`` and re-encoding read them), but
  not resident once loaded: ``load(path)`` reads the codes (and ids, meta, stamps) into memory and maps the
  float32 vectors read-only from the file, checking them whole at open (digest, contents, and that the codes
  are their encoding) through the mapping, whose pages it then releases (``madvise(MADV_DONTNEED)``);
  ``load(path, mmap=True)`` maps the codes too and leaves those checks to ``verify()``. A re-ranking search
  reads only its short list's rows, with ``pread`` on the file kept open (a fault on the mapping would map a
  whole 2 MB page-cache folio per row). An index
  built in memory by ``add`` holds both the float32 vectors and the codes (more than float32 storage) until it
  is saved and loaded; an ``add`` or ``remove`` on a loaded index copies the float32 vectors back into memory
  (as for a mapped float32 index). ``resident_bytes()`` says what the index holds in its own memory.
- File: format version 4 (float32 indexes are still written as version 3): the header adds ``storage``
  ("float16" or "int8") and the sections become ids, vectors (float32, as in version 3), ``quant`` (int8
  only: dim float32 scales then dim float32 offsets), ``codes`` (count x dim little-endian float16, or uint8),
  stamps, meta, each with its sha256 in ``section_sha256`` (null for an absent one). ``load`` refuses, naming
  the path and what it expected: another ``storage`` tag, a payload of another size than the header's
  sections (listed with the codes' dtype), a scale that is not finite and > 0 or an offset that is not
  finite, and codes that are not the encoding of their float32 vectors.

Images: with an encoder attached (``Searcher(encoder=enc)``, ``Searcher.from_model(path)``, or
``Searcher.from_model()`` for the packaged default image model ``engine.default_models.default_model("image")``),
``add_images`` / ``search_images`` encode images first. ``load(path, encoder=enc)`` refuses an encoder
whose identity differs from the one recorded in the file (``ModelError`` naming both).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap as _mmap
import os
import stat
import threading
import warnings
from pathlib import Path
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from engine.errors import IndexFileError, InputError, ModelError
from engine.fileio import MAX_HEADER, atomic_write, read_payload
from engine.kernels.quant import (STORAGES, encode_float16, encode_int8, int8_params, int8_range, levels,
                                  topk_codes)
from engine.kernels.topk import topk_ip
from engine.threads import default_threads
from engine.result_size import ResultTooLarge, answer_columns
from engine.validate import is_int, listed_rows, positive_int

METRICS = ("cosine", "ip")
MAGIC = b"LOOKALIKE-INDEX "
FORMAT_VERSION = 3  # what ``save`` writes for float32 storage (unchanged)
COMPRESSED_FORMAT_VERSION = 4  # what ``save`` writes for float16 / int8 storage
READS_VERSIONS = (1, 2, 3, 4)
ALIGN = 64  # version 3: the header line is padded so that the payload starts at a multiple of this
SECTIONS = ("ids", "vectors", "stamps", "meta")  # version 3: each has its sha256 in the header
SECTIONS_V4 = ("ids", "vectors", "quant", "codes", "stamps", "meta")  # version 4 (compressed): file order
_CODE_DTYPES = {"float16": np.dtype("<f2"), "int8": np.dtype("u1")}  # storage -> the codes' dtype in the file
_F16_MAX = float(np.finfo(np.float16).max)
_WIDEN = 1 / 16  # int8: a range widened by a later add grows by this fraction of its width on each side
_VERIFY_ROWS = 1 << 16  # rows hashed at a time when the mapped vectors are verified
_ENCODE_ROWS = 1 << 13  # rows encoded at a time (verify, re-encoding): temporaries of a few MB
MAX_META_BYTES = 1 << 16  # one vector's meta string, UTF-8 encoded (a path, a short JSON record)
_STAMP = np.dtype([("size", "<i8"), ("mtime_ns", "<i8"), ("sha256", "V32")])  # 48 bytes per vector in the file
# A cosine row is normalised in float64 and rounded to float32: each component moves by at most 2**-24 of
# itself, so the row's norm moves by at most 2**-24 (6e-8) from 1 (subnormal components add < 1e-40). A
# stored row further than 1e-6 (16 times that) from norm 1 was not normalised by ``add``.
_UNIT_TOL = 1e-6
_F32_MAX = float(np.finfo(np.float32).max)
_MAX_ID = np.iinfo(np.int64).max
_SMALL_NORM = 1e-140  # below this a row's squared values may have underflowed float64
_NORM_CHUNK = 16384  # rows normalised at a time (bounds the float64 temporary)


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    class _Held:
        def __init__(self, acquire, release):
            self._acquire, self._release = acquire, release

        def __enter__(self):
            self._acquire()

        def __exit__(self, *exc):
            self._release()

    def read(self):
        return self._Held(self.acquire_read, self.release_read)

    def write(self):
        return self._Held(self.acquire_write, self.release_write)


class _Nones(Sequence):
    """``n`` Nones without a list of them: the meta or stamps of a mapped index that has none (10M rows would
    take 80 MB a list); ``add`` and ``remove`` turn it into a list first."""

    __slots__ = ("_n",)

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [None] * len(range(*i.indices(self._n)))
        if not -self._n <= i < self._n:
            raise IndexError(f"row {i} out of range for {self._n} rows")
        return None

    def __iter__(self):
        return itertools.repeat(None, self._n)


def _rows_named(mask: np.ndarray) -> str:
    shown, count = listed_rows(mask)
    return f"{shown} ({count} in all)"


def shaped_rows(x, dim: int, what: str, *, allow_1d: bool) -> np.ndarray:
    """``x`` as a real floating (n, dim) array (a 1-D row of length dim -> (1, dim) when ``allow_1d``);
    ``InputError`` naming the dtype or shape otherwise. Shared by ``Searcher`` and ``IVFSearcher``."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise InputError(f"{what} must be a real floating-point array (float16/32/64), got dtype {x.dtype}")
    if x.ndim == 1 and allow_1d:
        if x.shape[0] != dim:
            raise InputError(f"one query must have shape ({dim},), got {x.shape}")
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise InputError(f"{what} must have shape (n, {dim}), got {x.shape}")
    return x


def checked_rows(given: np.ndarray, metric: str, what: str) -> np.ndarray:
    """(n, dim) floating rows as C-contiguous float32: finite (NaN / inf refused, naming the rows), normalised
    for ``metric="cosine"``, squared norms within float32's range for ``"ip"``."""
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused below
        x = np.ascontiguousarray(given, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise InputError(f"{what} contain NaN or inf (after casting to float32) in rows {_rows_named(bad)}")
    if metric == "cosine":
        return _normalised(given)  # from the values given: float64 input keeps directions float32 would blur
    big = _sq_norms(x) > _F32_MAX
    if big.any():
        raise InputError(
            f"{what} have a squared norm beyond float32's range (scores would overflow) in rows "
            f"{_rows_named(big)}"
        )
    return x


class FileStamp(NamedTuple):
    """What identifies the file a vector was embedded from: its size in bytes, its modification time (ns since
    the epoch, ``os.stat``'s ``st_mtime_ns``) and the sha256 of its bytes (32 bytes)."""

    size: int
    mtime_ns: int
    sha256: bytes

    @classmethod
    def of(cls, path) -> FileStamp:
        """The stamp of the file at ``path`` now (``OSError`` when it cannot be read)."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return cls(int(st.st_size), int(st.st_mtime_ns), h.digest())


def meta_text(path) -> str:
    """``path`` (str or os.PathLike) as meta text: ``str(path)``, with each byte of the file name that is not UTF-8
    (kept by Python as a lone surrogate) written as ``\\xNN``, so the text encodes as UTF-8."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def _checked_meta(meta, m: int) -> list:
    """``meta`` as a list of ``m`` str-or-None, each encodable as UTF-8 within MAX_META_BYTES (else InputError)."""
    if isinstance(meta, (str, bytes)) or not hasattr(meta, "__len__"):
        raise InputError(f"meta must be a list of strings (one per vector), got {type(meta).__name__}")
    meta = list(meta)
    if len(meta) != m:
        raise InputError(f"got {m} vectors but {len(meta)} meta strings")
    for i, t in enumerate(meta):
        if t is None:
            continue
        if not isinstance(t, str):
            raise InputError(f"meta[{i}] must be a string or None, got {type(t).__name__}")
        try:
            size = len(t.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise InputError(f"meta[{i}] cannot be encoded as UTF-8 ({e.reason} at {e.start}: a lone surrogate, e.g. "
                             f"from a file name that is not UTF-8; engine.searcher.meta_text escapes those)") from None
        if size > MAX_META_BYTES:
            raise InputError(f"meta[{i}] is {size} bytes as UTF-8, more than the {MAX_META_BYTES} allowed")
    return meta


def _checked_stamps(stamps, m: int) -> list:
    if isinstance(stamps, (str, bytes)) or not hasattr(stamps, "__len__"):
        raise InputError(f"stamps must be a list of FileStamp (one per vector), got {type(stamps).__name__}")
    stamps = list(stamps)
    if len(stamps) != m:
        raise InputError(f"got {m} vectors but {len(stamps)} stamps")
    out = []
    for i, st in enumerate(stamps):
        if st is None:
            out.append(None)
            continue
        try:
            size, mtime, sha = st
            ok = (is_int(size) and 0 <= size <= _MAX_ID and is_int(mtime) and -_MAX_ID - 1 <= mtime <= _MAX_ID
                  and isinstance(sha, bytes) and len(sha) == 32)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"stamps[{i}] must be a FileStamp(size >= 0, mtime_ns int64, sha256 32 bytes) or None, "
                             f"got {st!r}"[:200])
        out.append(FileStamp(int(size), int(mtime), bytes(sha)))
    return out


def coerce_ids(ids, what="ids") -> np.ndarray:
    """``ids`` (an int or 1-D ints) as int64; ``InputError`` for other shapes, dtypes, or values beyond int64."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise InputError(f"{what} must be a 1-D array of ints, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise InputError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise InputError(f"{what} must fit in int64, got {int(arr.max())}")
    return arr.astype(np.int64)


class Searcher:
    """Exact top-k search by cosine similarity or inner product; see the module docstring."""

    def __init__(self, dim=None, *, metric="cosine", encoder=None, storage="float32"):
        if encoder is not None:
            enc_dim = int(encoder.dim)
            if dim is None:
                dim = enc_dim
            elif _as_dim(dim) != enc_dim:
                raise InputError(f"dim {dim} does not match the encoder's dim {enc_dim} ({encoder.name})")
        if dim is None:
            raise InputError("dim is required when no encoder is given")
        self._dim = _as_dim(dim)
        if not isinstance(metric, str) or metric.lower() not in METRICS:
            raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
        self._metric = metric.lower()
        if not isinstance(storage, str) or storage.lower() not in STORAGES:
            raise InputError(f"storage must be one of {STORAGES}, got {storage!r}")
        self._storage = storage.lower()
        if self._storage == "int8" and levels(self._dim) < 1:
            raise InputError(f"int8 storage takes dim up to {(2**31 - 1) // 255}, got {self._dim}")
        self._encoder = encoder
        self._model = dict(encoder.identity) if encoder is not None else None
        self._vectors = np.zeros((0, self._dim), dtype=np.float32)  # (capacity, dim); rows [:n] in use
        # float16 / int8 storage: the codes searched, (capacity, dim), rows [:n] in use (None for float32), and
        # for int8 the per-dimension scale and offset (float32 (dim,), None until the first add)
        self._codes = None if self._storage == "float32" else np.zeros((0, self._dim), _CODE_DTYPES[self._storage])
        self._scale = self._offset = None
        self._ids = np.zeros(0, dtype=np.int64)  # (capacity,) id of each row
        self._row_map = {}  # id -> row; None: to be built from the ids on first use (a mapped load)
        self._mapping = None  # _Mapping of a load(mmap=True) (the vectors stay in the file until written to)
        self._meta = []  # (n,) meta string or None of each row
        self._stamps = []  # (n,) FileStamp or None of each row
        self._model_path = str(Path(encoder.path).resolve()) if getattr(encoder, "path", None) else None
        self._n = 0
        self._next_id = 0  # one past the highest id ever assigned
        self._lock = _RWLock()

    # -- properties ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def encoder(self):
        return self._encoder

    @property
    def storage(self) -> str:
        """What the searches read: "float32" (the vectors), "float16" or "int8" (codes; see the module notes)."""
        return self._storage

    @property
    def quantiser(self) -> tuple[np.ndarray, np.ndarray] | None:
        """int8 storage: (scale, offset), float32 (dim,) copies (a code c of dimension j stands for
        ``offset[j] + scale[j] * c``), None before the first add and for other storage."""
        return None if self._scale is None else (self._scale.copy(), self._offset.copy())

    def resident_bytes(self) -> int:
        """Bytes of vector data this index holds in its own memory: the codes (and scales) of a compressed
        index plus any float32 vectors not in a file mapping; the mapped parts count 0 (the page cache holds
        them, and a search touches only the rows it re-ranks). Capacity beyond ``len`` counts too."""
        total = 0
        m = self._mapping
        for name in ("_vectors", "_codes", "_scale", "_offset"):
            a = getattr(self, name)
            if a is None or (m is not None and (a is m.vectors or a is m.codes)):
                continue
            total += a.nbytes
        return total

    @property
    def ids(self) -> np.ndarray:
        """The stored ids in row order (a copy)."""
        with self._lock.read():
            return self._ids[: self._n].copy()

    def __len__(self) -> int:
        return self._n

    def __contains__(self, id_) -> bool:
        return id_ in self._row

    def __repr__(self) -> str:
        mapped = ", mapped" if self.mapped else ""
        storage = "" if self._storage == "float32" else f", storage={self._storage!r}"
        return f"Searcher(dim={self._dim}, metric={self._metric!r}{storage}, count={self._n}{mapped})"

    @property
    def _row(self) -> dict:
        """id -> row, built from the ids on first use after a mapped load (10M ids take seconds and ~1 GB)."""
        rows = self._row_map
        if rows is None:  # concurrent readers may both build it: the same table, harmless
            rows = self._row_map = dict(zip(self._ids[: self._n].tolist(), range(self._n)))
        return rows

    @_row.setter
    def _row(self, rows: dict) -> None:
        self._row_map = rows

    @property
    def mapped(self) -> bool:
        """True while the vectors are read from the memory-mapped file (``load(path, mmap=True)``, before any
        ``add`` or ``remove``)."""
        m = self._mapping
        return m is not None and self._vectors is m.vectors

    def verify(self) -> None:
        """Check the vectors of a memory-mapped index (read once, block by block): their sha256 against the
        file's and the contents a plain ``load`` checks (finite; unit or zero rows under cosine; squared norms
        within float32's range under ip). Raises ``IndexFileError`` naming the path. An index in memory was
        checked whole by its ``load``: nothing to do."""
        with self._lock.read():
            if self.mapped:
                self._mapping.verify(self._metric)

    def _unmap(self) -> None:
        """Before the first write to a mapped index: verify the mapping and copy the vectors (and codes) into
        memory; caller holds the write lock."""
        if self.mapped:
            self._mapping.verify(self._metric)
            self._vectors = np.array(self._vectors[: self._n])
            if self._codes is not None:
                self._codes = np.array(self._codes[: self._n])
            self._lists()

    # -- input coercion ----------------------------------------------------------------------------
    def _coerce(self, x, what: str, *, allow_1d: bool) -> np.ndarray:
        """(n, dim) C-contiguous float32, finite, normalised for cosine; 1-D of length dim -> (1, dim)."""
        return checked_rows(shaped_rows(x, self._dim, what, allow_1d=allow_1d), self._metric, what)

    _coerce_ids = staticmethod(coerce_ids)

    # -- mutation --------------------------------------------------------------------------------
    def add(self, vectors, ids=None, meta=None, *, stamps=None) -> np.ndarray:
        """Store ``vectors`` (n, dim), with one meta string (or None) each when ``meta`` is given and one
        ``FileStamp`` (or None) each when ``stamps`` is; returns their ids (int64). Nothing is stored when it
        raises."""
        x = self._coerce(vectors, "vectors", allow_1d=False)
        m = x.shape[0]
        if self._storage == "float16" and m:
            big = np.abs(x).max(axis=1) > _F16_MAX
            if big.any():
                raise InputError(f"float16 storage holds values up to {_F16_MAX:g} in magnitude; vectors in rows "
                                 f"{_rows_named(big)} exceed it")
        meta = [None] * m if meta is None else _checked_meta(meta, m)
        stamps = [None] * m if stamps is None else _checked_stamps(stamps, m)
        with self._lock.write():
            if ids is None:
                if self._next_id + m - 1 > _MAX_ID:
                    raise InputError(
                        f"no automatic ids left for {m} vectors: the next would be {self._next_id}, past int64's "
                        f"{_MAX_ID} (an id that high was given); give ids explicitly"
                    )
                new_ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            else:
                new_ids = self._coerce_ids(ids)
                if new_ids.shape[0] != m:
                    raise InputError(f"got {m} vectors but {new_ids.shape[0]} ids")
                if m and new_ids.min() < 0:
                    raise InputError(f"ids must be >= 0 (-1 marks a missing hit), got {int(new_ids.min())}")
                uniq, counts = np.unique(new_ids, return_counts=True)
                if (counts > 1).any():
                    raise InputError(f"id {int(uniq[counts > 1][0])} is given more than once")
                present = [int(i) for i in new_ids if int(i) in self._row]
                if present:
                    more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
                    raise InputError(f"id {present[0]} is already in the index{more}")
            if m == 0:
                return new_ids
            self._unmap()  # copy on first write: checked, then copied into memory
            self._lists()
            self._reserve(self._n + m)
            n0 = self._n
            self._vectors[n0 : n0 + m] = x
            if self._codes is not None:
                self._encode(x, n0)
            self._ids[n0 : n0 + m] = new_ids
            self._row.update(zip(new_ids.tolist(), range(n0, n0 + m)))
            self._meta.extend(meta)
            self._stamps.extend(stamps)
            self._n = n0 + m
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            return new_ids.copy()

    def _lists(self) -> None:
        """Meta and stamps as lists, before a write (a mapped load without any holds ``_Nones``)."""
        if not isinstance(self._meta, list):
            self._meta = list(self._meta)
        if not isinstance(self._stamps, list):
            self._stamps = list(self._stamps)

    def _reserve(self, needed: int) -> None:
        """Grow the storage geometrically (x1.5) to hold ``needed`` rows; caller holds the write lock."""
        cap = self._vectors.shape[0]
        if needed <= cap:
            return
        new_cap = max(needed, cap + cap // 2, 16)
        vectors = np.empty((new_cap, self._dim), dtype=np.float32)
        vectors[: self._n] = self._vectors[: self._n]
        ids = np.empty(new_cap, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._vectors, self._ids = vectors, ids
        if self._codes is not None:
            codes = np.empty((new_cap, self._dim), dtype=self._codes.dtype)
            codes[: self._n] = self._codes[: self._n]
            self._codes = codes

    def _encode(self, x: np.ndarray, n0: int) -> None:
        """Codes of the new rows ``x`` (stored from row ``n0``); int8: when they leave the current range of a
        dimension, the range widens (by ``_WIDEN`` of its width on each side, within [-1, 1] under cosine) and
        every stored row is encoded again from its float32 vector. Caller holds the write lock."""
        if self._storage == "float16":
            self._codes[n0 : n0 + x.shape[0]] = encode_float16(x)
            return
        lo, hi = int8_range(x)
        if self._scale is None:
            self._scale, self._offset = int8_params(lo, hi)
        else:
            cur_lo = self._offset.astype(np.float64)
            cur_hi = cur_lo + 255.0 * self._scale.astype(np.float64)
            if (lo < cur_lo).any() or (hi > cur_hi).any():
                new_lo, new_hi = np.minimum(lo, cur_lo), np.maximum(hi, cur_hi)
                margin = (new_hi - new_lo) * _WIDEN
                new_lo, new_hi = new_lo - margin, new_hi + margin
                if self._metric == "cosine":
                    new_lo, new_hi = np.maximum(new_lo, -1.0), np.minimum(new_hi, 1.0)
                self._scale, self._offset = int8_params(new_lo, new_hi)
                for r0 in range(0, n0, _ENCODE_ROWS):
                    r1 = min(n0, r0 + _ENCODE_ROWS)
                    self._codes[r0:r1] = encode_int8(self._vectors[r0:r1], self._scale, self._offset)
        self._codes[n0 : n0 + x.shape[0]] = encode_int8(x, self._scale, self._offset)

    def remove(self, ids) -> int:
        """Remove the vectors with these ids; returns how many were removed (unknown ids are ignored)."""
        todo = self._coerce_ids(ids)
        removed = 0
        with self._lock.write():
            if self.mapped and any(id_ in self._row for id_ in todo.tolist()):  # copy on first write
                self._unmap()
            for id_ in todo.tolist():
                row = self._row.pop(id_, None)
                if row is None:
                    continue
                last = self._n - 1
                if row != last:  # move the last row into the hole
                    moved = int(self._ids[last])
                    self._vectors[row] = self._vectors[last]
                    if self._codes is not None:
                        self._codes[row] = self._codes[last]
                    self._ids[row] = moved
                    self._row[moved] = row
                    self._meta[row] = self._meta[last]
                    self._stamps[row] = self._stamps[last]
                del self._meta[last], self._stamps[last]
                self._n = last
                removed += 1
        return removed

    def _rows_of(self, ids) -> np.ndarray:
        """Rows of ``ids`` (caller holds a lock); KeyError naming an unknown id."""
        want = self._coerce_ids(ids)
        rows = np.empty(want.shape[0], dtype=np.int64)
        for i, id_ in enumerate(want.tolist()):
            try:
                rows[i] = self._row[id_]
            except KeyError:
                raise KeyError(f"id {id_} is not in the index") from None
        return rows

    def get(self, ids) -> np.ndarray:
        """The stored vectors of ``ids``, (m, dim) float32 (normalised for cosine); unknown id -> KeyError."""
        with self._lock.read():
            rows = self._rows_of(ids)
            return self._mapping.rows(rows) if self.mapped else self._vectors[rows]  # rows: pread when compressed

    def meta(self, ids=None) -> list:
        """The meta strings (or None) of ``ids``, in the order asked (all, in row order, when ``ids`` is None)."""
        with self._lock.read():
            if ids is None:
                return list(self._meta)
            return [self._meta[r] for r in self._rows_of(ids).tolist()]

    def stamps(self, ids=None) -> list:
        """The ``FileStamp`` (or None) of ``ids``, in the order asked (all, in row order, when ``ids`` is None)."""
        with self._lock.read():
            if ids is None:
                return list(self._stamps)
            return [self._stamps[r] for r in self._rows_of(ids).tolist()]

    @property
    def model(self) -> dict | None:
        """The identity of the encoder the vectors come from (recorded in the file), or None."""
        return None if self._model is None else dict(self._model)

    @property
    def model_path(self) -> str | None:
        """The model file the attached encoder was loaded from when the index was built (a hint), or None."""
        return self._model_path

    # -- search ----------------------------------------------------------------------------------
    def search(self, queries, k: int, *, rerank=None):
        """Top-k of each query: ``(scores (nq, k') float32, ids (nq, k') int64)`` with
        ``k' = min(k, max(len(self), 1024))``, best first; see the module docstring.

        Compressed storage: the scores are those of the codes (float16 or int8 values, see "Compressed
        storage"); ``rerank=R`` takes the best ``max(R, k)`` by the codes (a short list) and scores them again
        exactly against the float32 vectors, which are read only for those rows (from the file's mapping
        after a load), then returns the best ``k'`` of them with float32 scores. For float32 storage the
        answer is exact already and ``rerank`` changes nothing."""
        k = _as_k(k)
        if rerank is not None:
            rerank = positive_int(rerank, "rerank")
        q = self._coerce(queries, "queries", allow_1d=True)
        with self._lock.read():
            n = self._n
            cols = answer_columns(k, n)
            try:
                if self._codes is None:
                    scores, rows = topk_ip(q, self._vectors, n, cols)  # padded with -inf / row -1 beyond n hits
                elif rerank is None or n == 0:
                    scores, rows = self._topk_codes(q, n, cols)
                else:
                    short = answer_columns(max(rerank, cols), n)
                    scores, rows = self._rerank(q, self._topk_codes(q, n, short)[1], cols)
            except ResultTooLarge as e:
                raise InputError(f"k = {k} is too large: {e} (the index holds {n} vectors)") from None
            if cols <= n:  # every row is real
                return scores, self._ids[rows]
            hit = rows >= 0
            ids = np.full(rows.shape, -1, dtype=np.int64)
            ids[hit] = self._ids[rows[hit]]
        return scores, ids

    def _topk_codes(self, q: np.ndarray, n: int, cols: int):
        return topk_codes(q, self._codes, n, cols, scale=self._scale, offset=self._offset,
                          threads=default_threads())

    def _rerank(self, q: np.ndarray, rows: np.ndarray, cols: int):
        """(scores, rows) (nq, cols) of the candidate ``rows`` (nq, R; -1: none) scored exactly, best first
        (higher score, then lower row), padded."""
        fetch = self._mapping.rows if self.mapped else self._vectors.__getitem__
        scores, order = rerank_candidates(q, rows, fetch, rows, cols)
        return scores, np.take_along_axis(rows, order, axis=1)

    # -- images ----------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, path=None, *, metric="cosine", **encoder_kwargs) -> Searcher:
        """An empty searcher with the image encoder ``engine.encoder.Encoder(path, **encoder_kwargs)``; without
        ``path``, the packaged default image model (``engine.default_models.default_model("image")``)."""
        from engine.encoder import (
            Encoder,  # onnxruntime loads only when images are wanted
        )

        if path is None:
            from engine.default_models import default_model

            path = default_model("image")
        return cls(metric=metric, encoder=Encoder(path, **encoder_kwargs))

    def _need_encoder(self):
        if self._encoder is None:
            raise InputError("no image encoder attached: use Searcher.from_model(path) or Searcher(encoder=...)")
        return self._encoder

    def add_images(self, images, ids=None, meta=None) -> np.ndarray:
        """Encode ``images`` with the attached encoder and add the embeddings; returns their ids. Each image given
        as a path gets that path as its meta (unless ``meta`` is given) and the file's ``FileStamp``."""
        enc = self._need_encoder()
        items = [images] if isinstance(images, (str, os.PathLike)) else images
        paths = None
        if not isinstance(items, np.ndarray):
            items = list(items)
            paths = [p if isinstance(p, (str, os.PathLike)) else None for p in items]
        if paths is None or not any(p is not None for p in paths):
            return self.add(enc.encode(items), ids, meta)
        stamps = []
        for p in paths:
            try:
                stamps.append(None if p is None else FileStamp.of(p))
            except OSError:
                stamps.append(None)  # the encoder names the file that cannot be read
        vectors = enc.encode(items)
        if meta is None:
            meta = [None if p is None else meta_text(p) for p in paths]
        return self.add(vectors, ids, meta, stamps=stamps)

    def search_images(self, images, k: int, *, rerank=None):
        """Encode ``images`` with the attached encoder and search with the embeddings (``rerank`` as ``search``)."""
        return self.search(self._need_encoder().encode(images), k, rerank=rerank)

    # -- files -----------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the index to ``path`` atomically (see the module docstring for the format), also over the file a
        mapped index reads from."""
        path = Path(path)
        with self._lock.read():
            n = self._n
            ids = np.ascontiguousarray(self._ids[:n], dtype="<i8")
            vectors = np.ascontiguousarray(self._vectors[:n], dtype="<f4")  # a mapped array is not copied
            sections = {"ids": [ids], "vectors": [vectors]}
            compressed = self._codes is not None
            if compressed:
                if self._storage == "int8":  # scale 1, offset 0 before the first add (then count is 0)
                    scale = np.ones(self._dim) if self._scale is None else self._scale
                    offset = np.zeros(self._dim) if self._offset is None else self._offset
                    sections["quant"] = [np.ascontiguousarray(scale, "<f4"), np.ascontiguousarray(offset, "<f4")]
                sections["codes"] = [np.ascontiguousarray(self._codes[:n], _CODE_DTYPES[self._storage])]
            has_stamps = not isinstance(self._stamps, _Nones) and any(st is not None for st in self._stamps)
            if has_stamps:
                sections["stamps"] = [_pack_stamps(self._stamps)]
            meta_bytes = None
            if not isinstance(self._meta, _Nones) and any(t is not None for t in self._meta):
                offsets, flags, blob = _pack_meta(self._meta)
                sections["meta"] = [offsets, flags, blob]
                meta_bytes = int(blob.size)
            names = SECTIONS_V4 if compressed else SECTIONS
            digests = {name: _sha256(sections[name]) if name in sections else None for name in names}
            if self.mapped and (digests["vectors"] != self._mapping.sha256
                                or (compressed and digests["codes"] != self._mapping.codes_sha256)):
                raise IndexFileError(f"{self._mapping.path}: checksum mismatch in the vectors section: the mapped "
                                     f"file changed or was damaged since it was opened; not saved to {path}")
            header = {
                "format_version": COMPRESSED_FORMAT_VERSION if compressed else FORMAT_VERSION,
                "dim": self._dim,
                "metric": self._metric,
                "count": n,
                "next_id": self._next_id,
                "model": self._model,
                "model_path": self._model_path,
                "stamps": has_stamps,
                "meta_bytes": meta_bytes,
                "section_sha256": digests,
            }
            if compressed:
                header["storage"] = self._storage
            atomic_write(path, header_line(MAGIC, header),
                         *(_bytes_of(a) for name in names for a in sections.get(name, ())))

    @classmethod
    def load(cls, path, encoder=None, *, mmap=False) -> Searcher:
        """Read an index written by ``save`` (format 1, 2 or 3); damaged files raise ``IndexFileError`` naming the
        path. ``mmap=True`` maps the vectors instead of reading them (format 3; see "Memory-mapped load" in the
        module docstring); ``mmap="verify"`` maps them and runs ``verify()`` before returning."""
        path = Path(path)
        if not (mmap is False or mmap is True or mmap == "verify"):
            raise InputError(f"mmap must be False, True or 'verify', got {mmap!r}")
        opened = _map_index_file(path, whole=not mmap)
        if opened is None:  # read whole: mmap=False, or a version that cannot be mapped
            header, digest, body = _read_index_file(path)
            view = memoryview(body)
            parts = {name: view[at : at + size] for name, (at, size) in _sections(header).items()}
            if header["format_version"] >= 3:
                _check_digests(path, header, digest, parts)
            elif _digest(header, (body,)) != digest:
                raise IndexFileError(f"{path}: checksum mismatch, the index file was altered or damaged")
            mapping = None
        else:
            header, parts, mapping = opened
        dim, count, metric, next_id, model = (header[key] for key in ("dim", "count", "metric", "next_id", "model"))
        ids = np.frombuffer(parts["ids"], dtype="<i8", count=count)
        if mapping is None:
            vectors = np.frombuffer(parts["vectors"], dtype="<f4", count=count * dim).reshape(count, dim)
            problem = _contents_problem(ids, vectors, metric, next_id)
        else:
            vectors = mapping.vectors
            problem = _ids_problem(ids, next_id)  # the vectors: verify()
        stamps = [None] * count if mapping is None else _Nones(count)
        if "stamps" in parts:
            raw = np.frombuffer(parts["stamps"], dtype=_STAMP, count=count)
            stamps, stamp_problem = _unpack_stamps(raw)
            problem = problem or stamp_problem
        meta = [None] * count if mapping is None else _Nones(count)
        if "meta" in parts:
            section = parts["meta"]
            offsets = np.frombuffer(section, dtype="<u8", count=count + 1)
            flags = np.frombuffer(section, dtype="u1", offset=(count + 1) * 8, count=count)
            blob = bytes(section[(count + 1) * 8 + count :])
            meta, meta_problem = _unpack_meta(offsets, flags, blob, header["meta_bytes"])
            problem = problem or meta_problem
        if problem:
            raise IndexFileError(f"{path}: damaged index: {problem}")
        if encoder is not None:
            if model is not None and dict(encoder.identity) != model:
                raise ModelError(
                    f"{path} was built with model {model}, but the encoder given is {dict(encoder.identity)}"
                )
            if int(encoder.dim) != dim:
                raise ModelError(
                    f"{path} holds dim {dim} vectors, but the encoder {encoder.name} gives dim {encoder.dim}"
                )
        storage = header.get("storage", "float32") if header["format_version"] >= 4 else "float32"
        s = cls(dim, metric=metric, storage=storage)
        s._encoder = encoder
        s._model = model if model is not None else (dict(encoder.identity) if encoder is not None else None)
        s._model_path = header.get("model_path")
        if s._model_path is None and encoder is not None and getattr(encoder, "path", None):
            s._model_path = str(Path(encoder.path).resolve())
        if mapping is None:
            s._ids = ids.astype(np.int64)
            s._vectors = vectors.astype(np.float32)  # native, writable copy
            s._row = dict(zip(s._ids.tolist(), range(count)))
        else:
            s._ids = ids.astype(np.int64, copy=False)  # read into a buffer of its own: no second copy
            s._vectors = vectors  # read-only, in the file; copied into memory on the first add / remove
            s._mapping = mapping
            s._row = None  # built on first use
            if mapping.codes is not None:
                s._codes = mapping.codes if mmap else np.array(mapping.codes)  # mmap=False: codes in memory
                if count and mapping.scale is not None:
                    s._scale, s._offset = mapping.scale.copy(), mapping.offset.copy()
                if not mmap:  # read whole: everything checked now; the float32 vectors stay mapped
                    mapping.verify(metric)
                    mapping.release()
        s._meta = meta
        s._stamps = stamps
        s._n = count
        s._next_id = next_id
        if mmap == "verify":
            s.verify()
        return s


def rerank_candidates(q: np.ndarray, rows: np.ndarray, fetch, tie: np.ndarray, cols: int):
    """Exact re-ranking of a short list (``Searcher`` and ``IVFSearcher``): ``rows`` (nq, R) candidate rows
    (-1: none), ``fetch(rows_1d)`` their float32 vectors (m, dim), ``tie`` (nq, R) the key that orders equal
    scores (lower first). Returns (scores (nq, cols) float32, columns (nq, cols) into ``rows``), best first,
    a missing candidate scoring -inf after every real one."""
    nq, short = rows.shape
    dim = q.shape[1]
    exact = np.empty((nq, short), dtype=np.float32)
    step = max(1, (1 << 22) // max(1, short * dim))  # queries per gather: at most 16 MiB of rows
    for a in range(0, nq, step):
        b = min(nq, a + step)
        gathered = fetch(np.where(rows[a:b] >= 0, rows[a:b], 0).reshape(-1)).reshape(b - a, short, dim)
        np.matmul(gathered, q[a:b, :, None], out=exact[a:b, :, None])  # float32 products, BLAS
    exact[rows < 0] = -np.inf
    order = np.lexsort((np.where(rows >= 0, tie, np.iinfo(np.int64).max), -exact), axis=-1)[:, :cols]
    return np.take_along_axis(exact, order, axis=1), order


class _Mapping:
    """The vectors of a mapped load: the read-only array over the file's mapping, and what ``verify`` checks it
    against; for a compressed index (format 4) also the codes (mapped), their digest and the int8 scale and
    offset (read and checked at open). ``IVFSearcher`` uses the first three fields alone."""

    def __init__(self, path: Path, vectors: np.ndarray, sha256: str, *, codes=None, codes_sha256=None,
                 scale=None, offset=None, mm=None, fd=None, vectors_at=0):
        self.path = path
        self.vectors = vectors  # (count, dim) float32, C-contiguous, read-only (its base is the mmap)
        self.sha256 = sha256  # the file's vectors section digest
        self.codes = codes  # (count, dim) float16 / uint8 over the same mapping, or None
        self.codes_sha256 = codes_sha256
        self.scale, self.offset = scale, offset  # int8: float32 (dim,)
        self.mm = mm  # the mmap (None for an empty section)
        self.fd = fd  # compressed: the file kept open, to read the re-ranked rows with pread (see ``rows``)
        self.vectors_at = vectors_at  # the vectors' offset in the file
        self.verified = False

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The float32 vectors of ``rows`` (1-D int64 in range), read with pread, not through the mapping: a
        fault on a mapping maps a whole page-cache folio (2 MB on Linux 6.x with large folios) and read-ahead
        can map megabytes more, so a few hundred scattered rows would make the whole section resident in the
        process; pread copies 4 * dim bytes a row."""
        dim = self.vectors.shape[1]
        if self.fd is None:
            return self.vectors[rows]
        uniq, back = np.unique(rows, return_inverse=True)
        out = np.empty((uniq.shape[0], dim), dtype=np.float32)
        size = 4 * dim
        for i, r in enumerate(uniq.tolist()):
            if os.preadv(self.fd, [memoryview(out[i]).cast("B")], self.vectors_at + r * size) != size:
                raise IndexFileError(f"{self.path}: truncated while mapped: row {r} of the vectors cannot be read")
        if out.dtype.byteorder == ">":  # the file is little-endian
            out = out.byteswap()
        return out[back.reshape(-1)]

    def verify(self, metric: str) -> None:
        """IndexFileError naming the path unless the mapped vectors match their digest and pass the contents
        checks of a plain load, and the codes (if any) match theirs and are the encoding of the vectors. Once
        passed, later calls return at once (the mapping is read-only)."""
        if self.verified:
            return
        v = self.vectors
        if _rows_sha256(v) != self.sha256:
            raise IndexFileError(f"{self.path}: checksum mismatch in the vectors section, the index file was altered "
                                 f"or damaged")
        problem = _vectors_problem(v, metric)
        if problem:
            raise IndexFileError(f"{self.path}: damaged index: {problem}")
        if self.codes is not None:
            c = self.codes
            if _rows_sha256(c) != self.codes_sha256:
                raise IndexFileError(f"{self.path}: checksum mismatch in the codes section, the index file was "
                                     f"altered or damaged")
            for r0 in range(0, c.shape[0], _ENCODE_ROWS):
                block = v[r0 : r0 + _ENCODE_ROWS]
                want = encode_float16(block) if c.dtype.kind == "f" else encode_int8(block, self.scale, self.offset)
                got = c[r0 : r0 + _ENCODE_ROWS]
                off = (want.view(np.uint8) != got.view(np.uint8)).any(axis=1)
                if off.any():
                    first = int(np.flatnonzero(off)[0])
                    raise IndexFileError(
                        f"{self.path}: damaged index: the codes of rows {_rows_named(off)} (from row {r0}) are not "
                        f"the encoding of their float32 vectors (row {r0 + first}: expected "
                        f"{want[first][:4].tolist()}..., got {got[first][:4].tolist()}...)")
        self.verified = True

    def release(self) -> None:
        """Drop the pages a verify touched from this process (they stay in the page cache): a mapped index's
        resident memory is then what its searches touch."""
        if self.mm is not None and hasattr(_mmap, "MADV_DONTNEED"):
            self.mm.madvise(_mmap.MADV_DONTNEED)


def header_line(magic: bytes, header: dict) -> bytes:
    """``magic {header + sha256 of the header}`` padded with spaces (JSON whitespace) so that, with its closing
    newline, its length is a multiple of ``ALIGN``: the payload after it starts aligned. (Format 3 of the exact
    index, format 2 of the IVF index.)"""
    line = magic + json.dumps({**header, "sha256": _digest(header, ())}, sort_keys=True).encode()
    return line + b" " * (-(len(line) + 1) % ALIGN) + b"\n"


def _bytes_of(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B")


def _sha256(parts) -> str:
    h = hashlib.sha256()
    for a in parts:
        h.update(a if isinstance(a, (bytes, bytearray, memoryview)) else _bytes_of(a))
    return h.hexdigest()


def _check_digests(path: Path, header: dict, digest: str, parts: dict, skip=()) -> None:
    """IndexFileError unless the header's digest and every section's (but those in ``skip``) are right."""
    if _digest(header, ()) != digest:
        raise IndexFileError(f"{path}: checksum mismatch in the header, the index file was altered or damaged")
    wanted = header["section_sha256"]
    for name, part in parts.items():
        if name not in skip and _sha256((part,)) != wanted[name]:
            raise IndexFileError(f"{path}: checksum mismatch in the {name} section, the index file was altered or "
                                 f"damaged")


def _pack_stamps(stamps: list) -> np.ndarray:
    out = np.zeros(len(stamps), dtype=_STAMP)
    out["size"] = -1
    for i, st in enumerate(stamps):
        if st is not None:
            out[i] = (st.size, st.mtime_ns, st.sha256)
    return out


def _unpack_stamps(raw: np.ndarray) -> tuple[list, str | None]:
    """The stamps of a file's stamp section, and what is wrong with them (or None)."""
    size, mtime = raw["size"], raw["mtime_ns"]
    sha = np.ascontiguousarray(raw["sha256"]).view(np.uint8).reshape(len(raw), 32)
    bad = (size < -1) | ((size == -1) & ((mtime != 0) | sha.any(axis=1)))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        return [], (f"stamps must have a size >= 0, or -1 with every other field zero; rows {_rows_named(bad)} do "
                    f"not (row {first}: size {int(size[first])}, mtime_ns {int(mtime[first])})")
    shas = sha.tobytes()
    return [None if sz < 0 else FileStamp(sz, mt, shas[32 * i : 32 * i + 32])
            for i, (sz, mt) in enumerate(zip(size.tolist(), mtime.tolist()))], None


def _pack_meta(meta: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets (n + 1,) <u8, flags (n,) u1, blob (m,) u1) of meta strings (or None)."""
    encoded = [b"" if t is None else t.encode("utf-8") for t in meta]
    offsets = np.zeros(len(meta) + 1, dtype="<u8")
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    flags = np.array([t is not None for t in meta], dtype="u1")
    return offsets, flags, np.frombuffer(b"".join(encoded), dtype="u1")


def _unpack_meta(offsets: np.ndarray, flags: np.ndarray, blob: bytes, nbytes: int) -> tuple[list, str | None]:
    """The meta strings of a file's meta section, and what is wrong with them (or None): offsets from 0 to the
    blob's end, never decreasing; flags 0 or 1, an absent meta with an empty span; spans within
    ``MAX_META_BYTES`` and valid UTF-8."""
    if int(offsets[0]) != 0 or int(offsets[-1]) != nbytes or len(blob) != nbytes:
        return [], (f"meta offsets must run from 0 to the blob's {nbytes} bytes, got {int(offsets[0])} .. "
                    f"{int(offsets[-1])}")
    spans = offsets[1:].astype(np.int64, copy=False) - offsets[:-1].astype(np.int64, copy=False)
    if (offsets[1:] < offsets[:-1]).any():
        bad = offsets[1:] < offsets[:-1]
        return [], f"meta offsets decrease at rows {_rows_named(bad)} (a span would leave the blob or overlap another)"
    if (flags > 1).any():
        return [], f"meta flags must be 0 or 1, rows {_rows_named(flags > 1)} are not"
    empty_absent = (flags == 0) & (spans != 0)
    if empty_absent.any():
        return [], f"rows {_rows_named(empty_absent)} have no meta but a span of meta bytes"
    long = spans > MAX_META_BYTES
    if long.any():
        return [], f"meta strings longer than {MAX_META_BYTES} bytes in rows {_rows_named(long)}"
    out = []
    starts = offsets.tolist()
    for i, f in enumerate(flags.tolist()):
        if not f:
            out.append(None)
            continue
        try:
            out.append(blob[starts[i] : starts[i + 1]].decode("utf-8"))
        except UnicodeDecodeError as e:
            return [], f"the meta string of row {i} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return out, None


def _read_header(f, path: Path) -> dict:
    """The checked header of the index file open as ``f`` (read up to its newline; the payload follows)."""
    line = f.read(len(MAGIC))
    if line == MAGIC:
        line += f.readline(MAX_HEADER)
    if not line.startswith(MAGIC) or not line.endswith(b"\n"):
        raise IndexFileError(f"{path} is not a lookalike index file (no '{MAGIC.decode().strip()}' header line)")
    return _index_header(path, line[len(MAGIC) :])


def _read_index_file(path: Path) -> tuple[dict, str, bytes]:
    """(header without its sha256, that sha256, payload) of an index file, the header's fields checked.

    Reads the header line first and the payload only when the file's size is the one the header gives
    (``engine.fileio.read_payload``), so a foreign, endless or huge file is refused without reading it.
    """
    try:
        with open(path, "rb") as f:
            header = _read_header(f, path)
            expected = _payload_size(header)
            body = read_payload(f, expected, lambda found: IndexFileError(
                f"{path}: truncated or damaged index: payload is {found} bytes, header says {expected}"))
    except IndexFileError:
        raise
    except OSError as e:
        raise IndexFileError(f"cannot read index file {path}: {e.strerror or e}") from e
    digest = header.pop("sha256")
    return header, digest, body


def _map_index_file(path: Path, *, whole: bool = False) -> tuple[dict, dict, _Mapping] | None:
    """(header without its sha256, {section: bytes} of the ids, (quant,) stamps and meta, the vectors' (and
    codes') ``_Mapping``) of a version-3 or 4 index file, everything but the vectors and codes checked against
    its digest; None, with a ``UserWarning``, for a version that cannot be mapped (the caller reads it whole).
    ``whole``: a plain load, which maps format 4 alone (its float32 vectors stay in the file) and returns None
    for the others without a warning."""
    try:
        with open(path, "rb") as f:
            header = _read_header(f, path)
            version = header["format_version"]
            if whole and version < 4:
                return None
            if version < 3:
                warnings.warn(f"{path}: index format version {version} cannot be memory-mapped (its vectors are not "
                              f"aligned and have no checksum of their own): read whole instead; save it again "
                              f"(this build writes version {FORMAT_VERSION}) to map it", UserWarning, stacklevel=3)
                return None
            sections = _sections(header)
            start, parts = _read_small_sections(f, path, header, sections, _layout_text(header))
            storage = header.get("storage", "float32") if version >= 4 else "float32"
            mapping = _map_payload(f, path, header, parts, sections, start, storage)
    except IndexFileError:
        raise
    except (OSError, ValueError) as e:  # ValueError: mmap of a file that changed size meanwhile
        verb = "read" if whole else "map"
        raise IndexFileError(f"cannot {verb} index file {path}: {getattr(e, 'strerror', None) or e}") from e
    return header, parts, mapping


def _rows_sha256(a: np.ndarray) -> str:
    """sha256 of a (mapped) array's bytes, read in blocks of ``_VERIFY_ROWS`` rows (a mapped file is not pulled
    into memory at once)."""
    h = hashlib.sha256()
    for r0 in range(0, a.shape[0], _VERIFY_ROWS):
        h.update(_bytes_of(a[r0 : r0 + _VERIFY_ROWS]))
    return h.hexdigest()


def _read_small_sections(f, path, header: dict, sections: dict, layout: str) -> tuple[int, dict]:
    """For a mapped load of the index file open as ``f`` (exact or IVF), its header read: the payload's start and
    {section: bytes} of every section but the vectors and codes, after checking that the file is regular and of
    the header's size (``layout`` explains that size in the error) and the sections against the header's digests
    (the header loses its ``sha256``)."""
    start = f.tell()
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise IndexFileError(f"{path}: cannot memory-map an index that is not a regular file")
    expected = sum(size for _, size in sections.values())
    if st.st_size - start != expected:
        raise IndexFileError(f"{path}: truncated or damaged index: payload is {st.st_size - start} bytes, "
                             f"header says {expected}{layout}")
    parts = {}
    for name, (at, size) in sections.items():
        if name not in ("vectors", "codes"):
            parts[name] = pread_exact(f.fileno(), size, start + at)
            if len(parts[name]) != size:  # the file shrank meanwhile
                raise IndexFileError(f"{path}: truncated or damaged index: the {name} section is "
                                     f"{len(parts[name])} bytes, header says {size}")
    digest = header.pop("sha256")
    _check_digests(path, header, digest, parts)
    return start, parts


def _map_payload(f, path, header: dict, parts: dict, sections: dict, start: int, storage: str) -> _Mapping:
    """The ``_Mapping`` of the vectors (and codes) of the index file open as ``f`` (exact or IVF), whose header and
    small sections ``parts`` are checked already: int8 scales and offsets checked, each array's alignment checked
    and mapped read-only (the arrays keep the mapping open); a compressed index also gets its own descriptor for
    reading re-ranked rows with pread."""
    count, dim = header["count"], header["dim"]
    scale = offset = None
    if storage == "int8":
        quant = np.frombuffer(parts["quant"], dtype="<f4", count=2 * dim).astype(np.float32)
        scale, offset = quant[:dim], quant[dim:]
        problem = _quant_problem(scale, offset) if count else None
        if problem:
            raise IndexFileError(f"{path}: damaged index: {problem}")
    mm = fd = None
    vectors_at = 0
    arrays = {}
    for name, dtype in (("vectors", np.dtype("<f4")), ("codes", _CODE_DTYPES.get(storage))):
        if name not in sections:
            continue
        at, size = sections[name]
        if (start + at) % dtype.itemsize:
            raise IndexFileError(f"{path}: damaged index: the {name} start at byte {start + at}, not a "
                                 f"multiple of {dtype.itemsize} (save aligns them), so they cannot be mapped")
        if size == 0:
            arrays[name] = np.zeros((count, dim), dtype=dtype)
            continue
        if mm is None:
            mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)  # the arrays keep it open
        arrays[name] = np.frombuffer(mm, dtype=dtype, count=count * dim, offset=start + at).reshape(count, dim)
        if name == "vectors" and storage != "float32":  # re-ranked rows are read with pread: ``rows``
            fd, vectors_at = os.dup(f.fileno()), start + at
    digests = header["section_sha256"]
    return _Mapping(path, arrays["vectors"], digests["vectors"], codes=arrays.get("codes"),
                    codes_sha256=digests.get("codes"), scale=scale, offset=offset, mm=mm, fd=fd, vectors_at=vectors_at)


def _quant_problem(scale: np.ndarray, offset: np.ndarray) -> str | None:
    """Why these int8 scales and offsets cannot be ``add``'s (scales finite and > 0, offsets finite), or None."""
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        return (f"int8 scales must be finite and > 0, got {float(scale[j])!r} for dimension {j} "
                f"({int(bad.sum())} dimensions bad)")
    bad = ~np.isfinite(offset)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        return f"int8 offsets must be finite, got {float(offset[j])!r} for dimension {j}"
    return None


def _layout_text(header: dict) -> str:
    """For a compressed (format 4) index: what the header's size is made of, naming the codes' dtype."""
    if header["format_version"] < 4:
        return ""
    storage = header["storage"]
    parts = ", ".join(f"{name} {size}" for name, (_, size) in _sections(header).items())
    return (f" ({parts} bytes; codes: count {header['count']} x dim {header['dim']} "
            f"{_CODE_DTYPES[storage].name} for storage {storage!r})")


def pread_exact(fd: int, size: int, offset: int) -> bytearray:
    """``size`` bytes of the file ``fd`` from ``offset`` into a new (writable) buffer, fewer only at the file's
    end (one read returns at most ~2 GiB on Linux)."""
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return buf if got == size else buf[:got]


def _sections(header: dict) -> dict:
    """{section: (offset in the payload, bytes)} of the sections the header announces, in file order."""
    count, dim = header["count"], header["dim"]
    sizes = {"ids": count * 8, "vectors": count * dim * 4}
    storage = header.get("storage", "float32") if header["format_version"] >= 4 else "float32"
    if storage == "int8":
        sizes["quant"] = 2 * dim * 4  # scale then offset, float32
    if storage != "float32":
        sizes["codes"] = count * dim * _CODE_DTYPES[storage].itemsize
    if header.get("stamps"):
        sizes["stamps"] = count * _STAMP.itemsize
    if header.get("meta_bytes") is not None:
        sizes["meta"] = (count + 1) * 8 + count + header["meta_bytes"]
    out, at = {}, 0
    for name, size in sizes.items():
        out[name] = (at, size)
        at += size
    return out


def _payload_size(header: dict) -> int:
    return sum(size for _, size in _sections(header).values())


def _index_header(path: Path, text: bytes) -> dict:
    """The header's JSON object, each field of the right type and range (else ``IndexFileError``)."""
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError(f"expected a JSON object, got {type(header).__name__}")
        version = header["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise IndexFileError(f"{path}: damaged index header ({e})") from e
    if version not in READS_VERSIONS or not _is_int(version):
        raise IndexFileError(f"{path}: index format version {version!r}; this build reads versions "
                             f"{', '.join(map(str, READS_VERSIONS[:-1]))} and {READS_VERSIONS[-1]}")
    keys = ("sha256", "dim", "count", "metric", "next_id", "model")
    if version >= 2:
        keys += ("model_path", "stamps", "meta_bytes")
    missing = [key for key in keys if key not in header]
    if missing:
        raise IndexFileError(f"{path}: damaged index header (no {', '.join(missing)})")
    dim, count, metric, next_id, model = (header[key] for key in ("dim", "count", "metric", "next_id", "model"))
    if not (_is_int(dim) and dim > 0 and _is_int(count) and count >= 0 and metric in METRICS):
        raise IndexFileError(f"{path}: damaged index header (dim={dim!r}, count={count!r}, metric={metric!r})")
    if not (_is_int(next_id) and 0 <= next_id <= _MAX_ID + 1):
        raise IndexFileError(f"{path}: damaged index header (next_id={next_id!r}, expected an int in [0, 2**63])")
    if not (model is None or isinstance(model, dict)) or not isinstance(header["sha256"], str):
        raise IndexFileError(f"{path}: damaged index header (model={model!r}, sha256={header['sha256']!r})")
    if version >= 2:
        model_path, stamps, meta_bytes = header["model_path"], header["stamps"], header["meta_bytes"]
        if not (model_path is None or isinstance(model_path, str)) or not isinstance(stamps, bool):
            raise IndexFileError(f"{path}: damaged index header (model_path={model_path!r}, stamps={stamps!r})")
        if not (meta_bytes is None or (_is_int(meta_bytes) and meta_bytes >= 0)):
            raise IndexFileError(f"{path}: damaged index header (meta_bytes={meta_bytes!r}, expected null or a "
                                 f"byte count)")
    names = SECTIONS
    present = {"ids": True, "vectors": True, "stamps": header.get("stamps"),
               "meta": header.get("meta_bytes") is not None}
    if version >= 4:
        storage = header.get("storage")
        if not isinstance(storage, str) or storage not in _CODE_DTYPES:
            raise IndexFileError(f"{path}: damaged index header (storage={storage!r}, expected 'float16' or 'int8' "
                                 f"in a version-4 index; a float32 index is version 3)"[:500])
        names = SECTIONS_V4
        present.update(quant=storage == "int8", codes=True)
    if version >= 3:
        digests = header.get("section_sha256")
        if not (isinstance(digests, dict) and set(digests) == set(names)
                and all(isinstance(digests[k], str) if present[k] else digests[k] is None for k in names)):
            wanted = ", ".join(k for k in names if present[k])
            raise IndexFileError(f"{path}: damaged index header (section_sha256={digests!r}, expected an object "
                                 f"with a sha256 for each section present: {wanted}, null for the others)"[:500])
    return header


def _contents_problem(ids: np.ndarray, vectors: np.ndarray, metric: str, next_id: int) -> str | None:
    """What makes these stored ids and vectors unlike anything ``add`` stores, or None: the ids must be
    distinct, >= 0 and below ``next_id``; the vectors finite, of unit length (or zero) under cosine, of a
    squared norm within float32's range under ip."""
    return _ids_problem(ids, next_id) or _vectors_problem(vectors, metric)


def _ids_problem(ids: np.ndarray, next_id: int) -> str | None:
    """What makes these stored ids unlike anything ``add`` stores (distinct, >= 0, below ``next_id``), or None.
    Ids in increasing order (no removes yet) are checked in one pass; others are sorted."""
    if ids.size:
        if ids.min() < 0:
            return f"ids must be >= 0, found {int(ids.min())} (row {int(ids.argmin())})"
        if (ids[1:] > ids[:-1]).all():
            largest = int(ids[-1])
        else:
            uniq, counts = np.unique(ids, return_counts=True)
            repeated = counts > 1
            if repeated.any():
                return (f"id {int(uniq[repeated][0])} is stored {int(counts[repeated][0])} times "
                        f"({int(repeated.sum())} ids repeated)")
            largest = int(uniq[-1])
        if next_id <= largest:
            return (f"next_id {next_id} is not above the largest id {largest} (the next automatic id would "
                    f"repeat one)")
    return None


def _vectors_problem(vectors: np.ndarray, metric: str) -> str | None:
    """What makes these stored vectors unlike anything ``add`` stores (finite, unit or zero under cosine, a
    squared norm within float32's range under ip), or None. Reads them block by block."""
    sq = _sq_norms(vectors)
    bad = ~np.isfinite(sq)
    if bad.any():
        return f"vectors hold NaN or inf in rows {_rows_named(bad)}"
    if metric == "cosine":
        norms = np.sqrt(sq)
        off = (np.abs(norms - 1.0) > _UNIT_TOL) & (sq != 0)
        if off.any():
            first = int(np.flatnonzero(off)[0])
            return (f"a cosine index stores unit (or zero) vectors, but rows {_rows_named(off)} have norms "
                    f"further than {_UNIT_TOL} from 1 (row {first}: {norms[first]:.9g})")
    else:
        big = sq > _F32_MAX
        if big.any():
            return f"vectors have a squared norm beyond float32's range in rows {_rows_named(big)}"
    return None


def _is_int(value) -> bool:
    return type(value) is int  # JSON integers only: not bool, not float


def _digest(header: dict, arrays) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for a in arrays:
        h.update(a if isinstance(a, (bytes, bytearray)) else memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B"))
    return h.hexdigest()


def _sq_norms(x: np.ndarray) -> np.ndarray:
    """Squared L2 norm of each row of ``x``, in float64 (no overflow)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for r0 in range(0, x.shape[0], _NORM_CHUNK):
        c = x[r0 : r0 + _NORM_CHUNK].astype(np.float64)
        out[r0 : r0 + _NORM_CHUNK] = np.einsum("ij,ij->i", c, c)
    return out


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (any float dtype, finite) divided by their L2 norm, computed in float64, as (n, dim)
    float32; zero rows stay zero. A row whose squares could underflow float64 is scaled by its largest value
    first, so tiny vectors keep their direction."""
    out = np.empty(x.shape, dtype=np.float32)
    for r0 in range(0, x.shape[0], _NORM_CHUNK):
        c = x[r0 : r0 + _NORM_CHUNK].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", c, c))
        small = norms < _SMALL_NORM
        if small.any():
            peak = np.abs(c[small]).max(axis=1)
            peak[peak == 0] = 1.0
            c[small] /= peak[:, None]
            norms[small] = np.sqrt(np.einsum("ij,ij->i", c[small], c[small]))
        norms[norms == 0] = 1.0
        out[r0 : r0 + _NORM_CHUNK] = c / norms[:, None]
    return out


def _as_dim(dim) -> int:
    return positive_int(dim, "dim")


def _as_k(k) -> int:
    return positive_int(k, "k")
