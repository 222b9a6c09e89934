"""Exact search over shards held by Ray actors: ``ShardedSearcher``, the ``engine.Searcher`` contract.

    s = ShardedSearcher.build("idx.shards", vectors, shards=4)   # route, write 4 index files, start 4 actors
    scores, ids = s.search(queries, k=10)                         # fan out, merge: (nq, 10) float32 / int64
    s.add(more); s.remove([3, 7]); s.close()
    s = ShardedSearcher.load("idx.shards")                        # later, or from another machine of the cluster

Layout: a folder with ``sharded.json`` (``format`` "lookalike-sharded", ``format_version`` 1, ``dim``,
``metric``, ``shards``, the shard files and ``next_id``) and one ``engine.Searcher`` index file per shard
(``shard-000.lkx``, written by ``Searcher.save``, so each is checksummed and written atomically). Each shard
is loaded by its own Ray actor (scheduling strategy SPREAD: over the machines of the cluster; ``actor_options``
are passed to ``.options()``, e.g. ``num_cpus`` to reserve cores per shard). An actor opens its shard file by
path, so on a cluster the folder must be on a file system every node mounts.

Routing: the vector with id ``i`` lives in shard ``i % shards`` (sequential ids spread evenly); a shard file
holding an id of another shard is refused on load.

Contract (as ``Searcher``): ``search(queries, k) -> (scores (nq, k') float32, ids (nq, k') int64)``,
``k' = min(k, max(len, 1024))`` (``engine.result_size.answer_columns``), best first, padded with id -1 / score
-inf. Queries are validated on the caller's side (same messages as ``Searcher``) and sent as given to every
shard (``ray.put`` once), so each shard normalises them exactly as one ``Searcher`` would.
Tie order: on equal scores, the lower id first. Each shard answers its top ``k'`` by (-score, id) (it asks its
``Searcher`` for more columns while the k'-th score ties the next one, then orders by id), and the caller
merges the shards' answers by (-score, id): the answer is that of one ``Searcher`` holding the same vectors
added in increasing id order (whose ties go to the lower row, i.e. the lower id). Bit for bit where the
scores are exact (e.g. small-integer vectors, metric "ip"); otherwise a score may differ in its last bit
(1 ulp), because BLAS can round the same dot product differently in a matrix of another shape (one
``Searcher`` does the same between index sizes), and two hits closer than that may then swap.
``add(vectors, ids=None)`` numbers new vectors from one past the highest id ever assigned (kept in the
manifest); an id already present (any shard) or repeated is refused and nothing is added. ``remove(ids)``
returns how many were removed. ``get(ids)`` in the order asked (``KeyError`` for an unknown id). ``ids``:
every stored id, ascending. Thread-safe: searches run concurrently (the actors are threaded); ``add`` /
``remove`` / ``save`` wait for them and run alone, so every answer reflects one state. One process should
write a given folder at a time.

Compressed shards: ``build`` / ``create`` take ``storage`` ("float16", "int8"; recorded in the manifest, a manifest
without it is float32) and ``search`` takes ``rerank=R``, both as ``Searcher``. Each shard encodes its own vectors
(int8: its own per-dimension offsets and scales), so without ``rerank`` a score is its shard's approximation and
may differ from one compressed ``Searcher``'s; with ``rerank`` every shard re-scores its best ``max(R, k')`` by
the codes with the float32 vectors, so the merged scores are float32 scores and each shard's short list is at
least as long as its part of one ``Searcher``'s.

Durability (chosen: persist every write). Each ``add`` / ``remove`` saves the shards it touched before it
returns (``Searcher.save``: atomic, checksummed), and the manifest's ``next_id`` too. So a restarted actor,
or ``load`` after a crash, sees every acknowledged write, and nothing is silently lost. The price is a
rewrite of the touched shard files per write call (O(shard size)): writes should come in batches (``add`` of
many vectors at once), which is how a collection is indexed; a workload of many tiny writes would want a
journal (append the write, fold it into the shard file on ``save``) instead.

Failures: a shard whose actor dies (killed, its machine lost) is restarted from its file and the call is
retried, up to ``retries`` times per call (``restarts`` counts them); a shard file that is gone or damaged
raises ``ShardUnavailable`` (an ``IndexFileError``) naming it. A write retried after its actor died during it
is not applied twice (an ``add`` whose ids are all already in the shard had been saved before the death).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from engine.errors import IndexFileError, InputError, LookalikeError
from engine.fileio import atomic_write
from engine.result_size import answer_columns
from engine.validate import is_int, positive_int

MANIFEST = "sharded.json"
FORMAT = "lookalike-sharded"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
ACTOR_CONCURRENCY = 4  # calls a shard actor runs at once (threads; its Searcher is thread-safe)
_MAX_ID = np.iinfo(np.int64).max


class ShardUnavailable(IndexFileError):
    """A shard could not be (re)started: its file is gone or damaged, or its actor keeps dying."""


def shard_name(i: int) -> str:
    return f"shard-{i:03d}.lkx"


# -- one shard, in its actor ----------------------------------------------------------------------------------

class Shard:
    """The state of one shard actor: a ``Searcher`` loaded from ``path``, saved back after every write."""

    def __init__(self, path: str, index: int, shards: int, dim: int, metric: str, storage: str = "float32"):
        from engine.searcher import Searcher

        self.path, self.error = Path(path), None
        try:
            s = Searcher.load(self.path)
            if s.dim != dim or s.metric != metric or s.storage != storage:
                raise IndexFileError(f"{path} holds dim {s.dim} / {s.metric} / {s.storage} vectors; the manifest says "
                                     f"dim {dim} / {metric} / {storage}")
            ids = s.ids
            wrong = ids[ids % shards != index]
            if wrong.size:
                raise IndexFileError(f"{path} is shard {index} of {shards} but holds id {int(wrong[0])}, which "
                                     f"belongs to shard {int(wrong[0]) % shards} (id % {shards})")
            self.searcher = s
        except (LookalikeError, OSError) as e:  # reported by ping, so the caller can name the file
            self.error = f"{type(e).__name__}: {e}"

    def ping(self):
        if self.error:
            return {"error": self.error}
        ids = self.searcher.ids
        return {"error": None, "count": int(ids.size), "max_id": int(ids.max()) if ids.size else -1}

    def search(self, queries, cols: int, rerank=None):
        """Top ``cols`` by (-score, id) among this shard's vectors (fewer when it holds fewer; no padding);
        ``rerank`` as ``Searcher.search``."""
        s = self.searcher
        n = len(s)
        want = min(cols, n)
        nq = 1 if np.ndim(queries) == 1 else len(queries)
        if want == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        c = want + 1 if want < n else want
        while True:
            scores, ids = s.search(queries, c, rerank=rerank)  # c <= n: every column is a real hit, row order on ties
            if c >= n or not (scores[:, want - 1] == scores[:, c - 1]).any():
                break  # every vector left out scores below the want-th: the top `want` by (-score, id) is here
            c = min(n, 2 * c)
        order = np.lexsort((ids, -scores), axis=-1)[:, :want]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def add(self, vectors, ids):
        s = self.searcher
        here = np.array([int(i) in s for i in ids.tolist()], dtype=bool)
        if here.all() and here.size:
            return 0  # a retry of an add that was saved before its actor died
        s.add(vectors, ids)
        try:
            s.save(self.path)
        except BaseException:
            s.remove(ids)
            raise
        return len(ids)

    def present(self, ids):
        return np.array([int(i) in self.searcher for i in ids.tolist()], dtype=bool)

    def remove(self, ids):
        s = self.searcher
        gone = ids[self.present(ids)]
        if not gone.size:
            return 0
        kept = s.get(gone)
        removed = s.remove(gone)
        try:
            s.save(self.path)
        except BaseException:
            s.add(kept, gone)
            raise
        return removed

    def get(self, ids):
        return self.searcher.get(ids)

    def ids(self):
        return self.searcher.ids

    def save_to(self, path: str):
        self.searcher.save(path)


# -- the caller's side ----------------------------------------------------------------------------------------

class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    def read(self):
        return _Held(self, False)

    def write(self):
        return _Held(self, True)


class _Held:
    def __init__(self, lock: _RWLock, write: bool):
        self.lock, self.write = lock, write

    def __enter__(self):
        c = self.lock._cond
        with c:
            if self.write:
                self.lock._waiting += 1
                while self.lock._writer or self.lock._readers:
                    c.wait()
                self.lock._waiting -= 1
                self.lock._writer = True
            else:
                while self.lock._writer or self.lock._waiting:
                    c.wait()
                self.lock._readers += 1

    def __exit__(self, *exc):
        c = self.lock._cond
        with c:
            if self.write:
                self.lock._writer = False
            else:
                self.lock._readers -= 1
            c.notify_all()


_REMOTE = None


def _remote_shard():
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(Shard)
    return _REMOTE


def _unwrap(e):
    """The exception raised inside an actor (``InputError``, ``KeyError``, ...) rather than Ray's wrapper."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


class ShardedSearcher:
    """Exact top-k over shards held by Ray actors; see the module docstring. Open with ``load``, ``create`` or
    ``build``; ``close()`` (or ``with``) stops the actors."""

    def __init__(self, folder, *, retries: int = 2, actor_options: dict | None = None):
        import ray

        if not ray.is_initialized():
            raise InputError("Ray is not initialised: call ray.init() (or ray.init(address=...)) first")
        self.folder = Path(folder)
        man = read_manifest(self.folder)
        self.dim, self.metric, self.shards = man["dim"], man["metric"], man["shards"]
        self.storage = man.get("storage", "float32")  # manifests written before compressed shards: float32
        self._files = [self.folder / f for f in man["files"]]
        if not is_int(retries) or retries < 0:
            raise InputError(f"retries must be an int >= 0, got {retries!r}")
        self.retries = int(retries)
        self.restarts = 0  # actors restarted after they died
        self._options = {"max_concurrency": ACTOR_CONCURRENCY, "scheduling_strategy": "SPREAD",
                         **(actor_options or {})}
        self._rw = _RWLock()
        self._shard_locks = [threading.Lock() for _ in range(self.shards)]
        self._actors = [None] * self.shards
        from engine.searcher import Searcher

        self._scratch = Searcher(self.dim, metric=self.metric)  # validates queries / vectors like Searcher
        try:
            handles = [self._start(i) for i in range(self.shards)]
            infos = [self._ping(i, a) for i, a in enumerate(handles)]
        except BaseException:
            self.close()
            raise
        self._count = sum(p["count"] for p in infos)
        self._next_id = max([man["next_id"]] + [p["max_id"] + 1 for p in infos])

    # -- opening --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder, **options) -> "ShardedSearcher":
        """Open the sharded index in ``folder`` (one actor per shard file)."""
        return cls(folder, **options)

    @classmethod
    def create(cls, folder, dim: int, *, shards: int, metric: str = "cosine", storage: str = "float32",
               **options) -> "ShardedSearcher":
        """An empty sharded index in ``folder`` (which must not hold one already)."""
        return cls.build(folder, np.zeros((0, positive_int(dim, "dim")), np.float32), shards=shards, metric=metric,
                         storage=storage, **options)

    @classmethod
    def build(cls, folder, vectors, ids=None, *, shards: int, metric: str = "cosine", storage: str = "float32",
              **options):
        """Write ``vectors`` (with ``ids``, default 0..n-1) as ``shards`` index files in ``folder`` (routed by
        id % shards; ``Searcher``'s checks apply) plus the manifest, then open it. Ray is needed only to open.
        ``storage`` ("float32", "float16", "int8") as ``Searcher``: each shard keeps its own codes (int8: its own
        offsets and scales)."""
        from engine.searcher import Searcher

        shards = positive_int(shards, "shards")
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise InputError(f"{folder} already holds a sharded index; load it, or choose another folder")
        x = np.asarray(vectors)
        dim = x.shape[1] if x.ndim == 2 else None
        if dim is None or dim < 1:
            raise InputError(f"vectors must have shape (n, dim) with dim >= 1, got {x.shape}")
        whole = Searcher(dim, metric=metric, storage=storage)  # validates everything once, before anything is written
        all_ids = whole.add(x, ids)
        del whole
        parts = []
        for i in range(shards):
            sel = all_ids % shards == i
            part = Searcher(dim, metric=metric, storage=storage)
            part.add(x[sel], all_ids[sel])  # the given rows: normalised exactly as one Searcher would
            part.save(folder / shard_name(i))
            parts.append(part)
        next_id = int(all_ids.max()) + 1 if all_ids.size else 0
        _write_manifest(folder, dim, parts[0].metric, shards, next_id, parts[0].storage)
        return cls(folder, **options)

    @classmethod
    def from_searcher(cls, searcher, folder, *, shards: int, **options) -> "ShardedSearcher":
        """Split a ``Searcher``'s vectors (its stored, normalised rows) over ``shards`` files in ``folder``."""
        ids = np.sort(searcher.ids)
        return cls.build(folder, searcher.get(ids), ids, shards=shards, metric=searcher.metric,
                         storage=searcher.storage, **options)

    # -- actors -----------------------------------------------------------------------------------------------
    def _start(self, i: int):
        import ray

        path = self._files[i]
        if not path.is_file():
            raise ShardUnavailable(f"shard {i} of {self.folder}: its index file {path} is gone")
        actor = _remote_shard().options(**self._options).remote(str(path.resolve()), i, self.shards, self.dim,
                                                                  self.metric, self.storage)
        self._actors[i] = actor
        return actor

    def _ping(self, i: int, actor) -> dict:
        import ray

        try:
            info = ray.get(actor.ping.remote())
        except ray.exceptions.RayActorError as e:
            raise ShardUnavailable(f"shard {i} ({self._files[i]}): its actor died while loading ({e})") from None
        if info["error"]:
            raise ShardUnavailable(f"shard {i} cannot be loaded from {self._files[i]}: {info['error']}")
        return info

    def _restart(self, i: int, dead) -> None:
        """Replace shard ``i``'s dead actor (unless another thread already did) by one loaded from its file."""
        import ray

        with self._shard_locks[i]:
            if self._actors[i] is not dead:
                return
            try:
                ray.kill(dead, no_restart=True)
            except Exception:  # noqa: BLE001  (already gone)
                pass
            self._ping(i, self._start(i))
            self.restarts += 1

    def _result(self, i: int, actor, ref, method: str, *args):
        """``ray.get(ref)``; when the actor has died, restart it and call ``method(*args)`` again (bounded)."""
        import ray

        for attempt in range(self.retries + 1):
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if attempt == self.retries:
                    raise ShardUnavailable(f"shard {i} ({self._files[i]}): its actor died {attempt + 1} times "
                                           f"during {method}; last: {e}") from None
                self._restart(i, actor)
                actor = self._actors[i]
                ref = getattr(actor, method).remote(*args)
            except ray.exceptions.RayTaskError as e:
                raise _unwrap(e) from None

    def _call(self, i: int, method: str, *args):
        actor = self._actors[i]
        return self._result(i, actor, getattr(actor, method).remote(*args), method, *args)

    def close(self) -> None:
        """Stop the shard actors (their files stay)."""
        import ray

        for i, a in enumerate(self._actors):
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                self._actors[i] = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"ShardedSearcher({str(self.folder)!r}, dim={self.dim}, metric={self.metric!r}, shards={self.shards}, " \
               f"storage={self.storage!r}, count={self._count})"

    @property
    def ids(self) -> np.ndarray:
        """Every stored id, ascending."""
        with self._rw.read():
            parts = [self._call(i, "ids") for i in range(self.shards)]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def search(self, queries, k: int, *, rerank=None):
        """Top-k of each query over every shard; see the module docstring. ``rerank=R`` (compressed storage):
        each shard re-scores its best ``max(R, k)`` by the codes with the float32 vectors (``Searcher.search``)."""
        import ray

        k = positive_int(k, "k")
        if rerank is not None:
            rerank = positive_int(rerank, "rerank")
        self._scratch.search(queries, 1)  # validation only: shape, dtype, NaN / inf (Searcher's own messages)
        nq = 1 if np.ndim(queries) == 1 else len(queries)
        with self._rw.read():
            cols = answer_columns(k, self._count)
            qref = ray.put(queries)
            actors = list(self._actors)
            refs = [a.search.remote(qref, cols, rerank) for a in actors]
            parts = [self._result(i, actors[i], refs[i], "search", qref, cols, rerank) for i in range(self.shards)]
        return merge(parts, nq, cols)

    def get(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (normalised for cosine), (m, dim) float32, in the order asked."""
        want = _as_ids(ids)
        out = np.empty((want.size, self.dim), np.float32)
        with self._rw.read():
            for i in range(self.shards):
                sel = np.flatnonzero(want % self.shards == i)
                if sel.size:
                    out[sel] = self._call(i, "get", want[sel])
        return out

    def __contains__(self, id_) -> bool:
        if not is_int(id_) or id_ < 0:
            return False
        with self._rw.read():
            return bool(self._call(int(id_) % self.shards, "present", np.array([id_], np.int64))[0])

    # -- writing ----------------------------------------------------------------------------------------------
    def add(self, vectors, ids=None) -> np.ndarray:
        """Store ``vectors`` (n, dim) in their shards (id % shards); returns their ids. Nothing is stored when it
        raises (a shard that fails midway has the others' part taken back)."""
        from engine.searcher import Searcher

        check = Searcher(self.dim, metric=self.metric)
        given = check.add(vectors, ids)  # shape, dtype, NaN, ids >= 0 and not repeated: Searcher's messages
        del check
        x = np.asarray(vectors)
        m = len(given)
        with self._rw.write():
            if ids is None:
                if m and self._next_id + m - 1 > _MAX_ID:
                    raise InputError(f"no automatic ids left for {m} vectors past {self._next_id}; give ids")
                new_ids = np.arange(self._next_id, self._next_id + m, dtype=np.int64)
            else:
                new_ids = given
            if m == 0:
                return new_ids
            route = new_ids % self.shards
            touched = [i for i in range(self.shards) if (route == i).any()]
            for i in touched:
                here = self._call(i, "present", new_ids[route == i])
                if here.any():
                    raise InputError(f"id {int(new_ids[route == i][here][0])} is already in the index")
            done = []
            try:
                for i in touched:
                    sel = route == i
                    self._call(i, "add", x[sel], new_ids[sel])
                    done.append(i)
            except BaseException:
                for i in done:
                    self._call(i, "remove", new_ids[route == i])
                raise
            self._count += m
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            _write_manifest(self.folder, self.dim, self.metric, self.shards, self._next_id, self.storage)
            return new_ids.copy()

    def remove(self, ids) -> int:
        """Remove the vectors with these ids (unknown ids are ignored); returns how many were removed."""
        todo = np.unique(_as_ids(ids))
        todo = todo[todo >= 0]
        removed = 0
        with self._rw.write():
            for i in range(self.shards):
                part = todo[todo % self.shards == i]
                if part.size:
                    part = part[self._call(i, "present", part)]  # counted before: a retried remove returns 0
                if part.size:
                    self._call(i, "remove", part)
                    removed += int(part.size)
                    self._count -= int(part.size)
        return removed

    def save(self, folder=None) -> None:
        """Write every shard and the manifest. The shards of this folder are already saved after every write
        (this rewrites the manifest); another ``folder`` gets a full copy (each file atomic, manifest last)."""
        with self._rw.write():
            if folder is None or Path(folder).resolve() == self.folder.resolve():
                _write_manifest(self.folder, self.dim, self.metric, self.shards, self._next_id, self.storage)
                return
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(self.shards):
                self._call(i, "save_to", str((folder / shard_name(i)).resolve()))
            _write_manifest(folder, self.dim, self.metric, self.shards, self._next_id, self.storage)


def _as_ids(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise InputError(f"ids must be a 1-D array of ints, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "u" and arr.max() > _MAX_ID:
        raise InputError(f"ids must fit in int64, got {int(arr.max())}")
    return arr.astype(np.int64)


def merge(parts, nq: int, cols: int):
    """Merge per-shard answers (each (nq, c_i), best first by (-score, id), disjoint ids) into the top ``cols``
    by (-score, id), padded with id -1 and score -inf."""
    scores = np.full((nq, cols), -np.inf, np.float32)
    ids = np.full((nq, cols), -1, np.int64)
    s = np.concatenate([p[0] for p in parts], axis=1) if parts else np.zeros((nq, 0), np.float32)
    i = np.concatenate([p[1] for p in parts], axis=1) if parts else np.zeros((nq, 0), np.int64)
    take = min(cols, s.shape[1])
    if take:
        order = np.lexsort((i, -s), axis=-1)[:, :take]
        scores[:, :take] = np.take_along_axis(s, order, axis=1)
        ids[:, :take] = np.take_along_axis(i, order, axis=1)
    return scores, ids


def _write_manifest(folder: Path, dim: int, metric: str, shards: int, next_id: int, storage: str) -> None:
    man = {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": int(dim), "metric": metric,
           "storage": storage, "shards": int(shards), "routing": "id % shards",
           "files": [shard_name(i) for i in range(shards)], "next_id": int(next_id)}
    atomic_write(Path(folder) / MANIFEST, (json.dumps(man, indent=1) + "\n").encode())


def read_manifest(folder) -> dict:
    """The manifest of a sharded index folder, checked field by field (``IndexFileError`` naming it)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexFileError(f"no sharded index in {folder} ({MANIFEST} is missing)")
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IndexFileError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; not a sharded-index manifest")
    try:
        man = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise IndexFileError(f"{path} is not a lookalike sharded-index manifest (format {FORMAT!r} expected)")
    if man.get("format_version") != FORMAT_VERSION:
        raise IndexFileError(f"{path} is format version {man.get('format_version')!r}; this reads {FORMAT_VERSION}")
    for key in ("dim", "shards"):
        if not is_int(man.get(key)) or man[key] < 1:
            raise IndexFileError(f"{path}: {key} must be a positive int, got {man.get(key)!r}")
    if not is_int(man.get("next_id")) or man["next_id"] < 0:
        raise IndexFileError(f"{path}: next_id must be an int >= 0, got {man.get('next_id')!r}")
    if man.get("metric") not in ("cosine", "ip"):
        raise IndexFileError(f"{path}: metric must be 'cosine' or 'ip', got {man.get('metric')!r}")
    from engine.kernels.quant import STORAGES  # numba: loaded only when an index is opened

    if man.get("storage", "float32") not in STORAGES:  # absent in manifests of float32-only shards
        raise IndexFileError(f"{path}: storage must be one of {STORAGES}, got {man.get('storage')!r}")
    if man.get("files") != [shard_name(i) for i in range(man["shards"])]:
        raise IndexFileError(f"{path}: files must be {shard_name(0)} .. {shard_name(man['shards'] - 1)}")
    return man
