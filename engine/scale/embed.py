"""Embed a collection of images with a pool of ``engine.Encoder`` actors (Ray Data), into Parquet shards.

    from engine.scale.embed import embed_collection, searcher_from_embeddings
    summary = embed_collection("~/Pictures", "pictures.emb")          # a local Ray, one actor per CPU
    searcher = searcher_from_embeddings("pictures.emb")                # an engine.Searcher over them

Input (``source``): a folder (every image under it, recursive, as ``engine.search_cli.list_images`` walks it:
hidden entries skipped, links followed, each file once, sorted by relative path), a list of paths (in the order
given; a repeated path is refused), or a Parquet file (``.parquet``) with a string column ``path`` (row order).
Ids are stable: the position of the image in that list (0 .. n-1), whatever was skipped or resumed.

Work: ``ray.data`` ``map_batches`` over an actor pool (``ActorPoolStrategy(size=actors)``) of ``Encoder``
sessions; the model file's bytes travel with the actors (another machine need not have it), the images are
opened by path on whichever machine runs the actor (on a cluster: a file system every node mounts). An actor
with a GPU (``gpus_per_actor > 0``) runs onnxruntime's CUDA provider, else the CPU one with ``threads`` intra-op
threads (and that many CPUs reserved per actor). The input is cut into blocks of ``batch_size`` consecutive ids
aligned to the start of their shard (``rows_per_shard`` is rounded up to a multiple of ``batch_size``), so the
network sees the same batches in every run, resumed or not.

Output folder ``out``:
- ``shard-00000.parquet``, ...: shard ``i`` holds the images with ids ``[i * R, (i + 1) * R)`` that could be
  read (``R = rows_per_shard``), sorted by id, columns ``id`` int64, ``path`` string (relative to the folder
  for a folder source, else as given) and ``embedding`` fixed_size_list<float32>[dim] (unit rows).
- ``manifest.json``: ``format`` "lookalike-embeddings", ``format_version`` 1, the model's identity (its
  ``Encoder.identity``: name, sha256 of the file, dim, ...), ``dim``, the source (kind, root, ``count`` and the
  ``sha256`` of the list of paths), ``rows_per_shard``, ``batch_size``, and per written shard its ``file``,
  ``first_id``, ``stop_id``, ``rows``, ``sha256`` and ``skipped`` (``{"id", "path", "reason"}`` of each image
  that could not be read: unreadable images are listed, never fatal); ``complete`` once every shard is written.
Every file is written atomically (``engine.fileio.atomic_write``), the manifest after each shard, so a run
that is killed leaves whole shards behind. Resume: a re-run with the same source, model, ``rows_per_shard`` and
``batch_size`` into the same ``out`` keeps each shard whose file still has the sha256 the manifest records and
embeds only the others; the result is the same as an uninterrupted run's. Other settings into the same ``out``
are refused (``InputError`` naming what differs).

Reading back (``load_embeddings``) treats every file as hostile: the manifest's fields are checked, each shard's
sha256 is compared with the manifest before Parquet parses it, and its schema, dtypes, row count, id range,
order and values (finite, unit or zero rows) are checked; problems raise ``IndexFileError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ImageReadError, IndexFileError, InputError, LookalikeError
from engine.fileio import atomic_write, unwritable
from engine.validate import is_int

MANIFEST = "manifest.json"
FORMAT = "lookalike-embeddings"
FORMAT_VERSION = 1
ROWS_PER_SHARD = 8192  # images per Parquet shard (rounded up to a multiple of the batch size)
BATCH_SIZE = 32  # images per network run in an actor (the Encoder's batch)
MAX_MANIFEST_BYTES = 1 << 28  # a manifest larger than this is not ours
_HASH_CHUNK = 1 << 22
_UNIT_TOL = 1e-4  # an embedding row's norm is 1 (or 0) within this


class EmbeddingFailed(LookalikeError, RuntimeError):
    """The Ray job failed midway (an actor could not start, a node was lost); the shards written are kept."""


# -- input ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Collection:
    """The images to embed: ``files`` (what the actors open) and ``names`` (what the shards record), by id."""

    kind: str  # "folder", "paths" or "parquet"
    root: str | None  # the folder, for a folder source
    files: list[str]
    names: list[str]

    @property
    def digest(self) -> str:
        """sha256 of the source's kind, root and names: the same input gives the same digest."""
        blob = json.dumps({"kind": self.kind, "root": self.root, "names": self.names}, ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def collect(source) -> Collection:
    """The image list of ``source`` (a folder, a ``.parquet`` file with a ``path`` column, or a list of paths)."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            from engine.search_cli import list_images  # the project's image walk (imports nothing heavy)

            files = list_images(p)
            if not files:
                raise InputError(f"no images found under {p} (recursively)")
            return Collection("folder", str(p.resolve()), [str(f) for f in files],
                              [f.relative_to(p).as_posix() for f in files])
        if p.is_file() and p.suffix.lower() == ".parquet":
            files = _parquet_paths(p)
            return Collection("parquet", None, files, list(files))
        if p.exists():
            raise InputError(f"expected a folder of images, a .parquet file with a 'path' column or a list of "
                             f"paths, got the file {p}")
        raise InputError(f"expected a folder of images, a .parquet file or a list of paths, got {p} (nothing there)")
    try:
        items = list(source)
    except TypeError:
        raise InputError(f"expected a folder, a .parquet file or a list of paths, got {type(source).__name__}") from None
    files = []
    for i, it in enumerate(items):
        if not isinstance(it, (str, os.PathLike)):
            raise InputError(f"path {i} must be a str or os.PathLike, got {type(it).__name__}")
        files.append(os.fspath(it))
    if not files:
        raise InputError("the list of paths is empty")
    _refuse_repeats(files, "the list of paths")
    return Collection("paths", None, files, list(files))


def _refuse_repeats(files: list[str], what: str) -> None:
    seen = {}
    for i, f in enumerate(files):
        if f in seen:
            raise InputError(f"{what} names {f!r} twice (entries {seen[f]} and {i}); ids would not be stable")
        seen[f] = i


def _parquet_paths(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path} is not a readable Parquet file ({e})") from None
    if "path" not in schema.names:
        raise InputError(f"{path} has no 'path' column (columns: {', '.join(schema.names) or 'none'})")
    kind = schema.field("path").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: column 'path' must hold strings, got {kind}")
    try:
        col = pq.read_table(path, columns=["path"]).column("path")
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: cannot read column 'path' ({e})") from None
    if col.null_count:
        raise InputError(f"{path}: column 'path' has {col.null_count} empty (null) entries")
    files = col.to_pylist()
    if not files:
        raise InputError(f"{path}: column 'path' is empty")
    _refuse_repeats(files, str(path))
    return files


# -- the actors -----------------------------------------------------------------------------------------------

class EncodeBatch:
    """Ray Data callable class: one ``Encoder`` session per actor; a batch of (id, file) -> embeddings.

    A batch that holds an unreadable image is decoded one image at a time to find it (``read_image``), and the
    readable rest is encoded together; the unreadable rows come back with ``ok`` False and the reason."""

    def __init__(self, model: str, model_bytes: bytes, batch_size: int, threads: int | None):
        import tempfile

        import ray

        from engine.encoder import CPU, CUDA, Encoder

        gpu = bool(ray.get_gpu_ids())
        # The model travels with the actor (another machine of the cluster may not have the file): written to a
        # private temporary file for Encoder, which reads it whole, then removed.
        with tempfile.TemporaryDirectory(prefix="lookalike-model-") as d:
            local = Path(d) / Path(model).name
            local.write_bytes(model_bytes)
            self.encoder = Encoder(local, providers=[CUDA, CPU] if gpu else [CPU], batch_size=batch_size,
                                   threads=None if gpu else threads)
        self.floor = self.encoder.preprocess.min_decode_size()

    def __call__(self, batch: dict) -> dict:
        from engine.preprocess import read_image

        files = [str(f) for f in batch["file"]]
        n, dim = len(files), self.encoder.dim
        emb = np.zeros((n, dim), np.float32)
        ok = np.ones(n, dtype=bool)
        reason = np.array([""] * n, dtype=object)
        try:
            emb[:] = self.encoder.encode(files)
        except ImageReadError:
            for i, f in enumerate(files):
                try:
                    read_image(f, min_size=self.floor)
                except ImageReadError as e:
                    ok[i], reason[i] = False, str(e)
            good = np.flatnonzero(ok)
            if good.size:
                emb[good] = self.encoder.encode([files[i] for i in good])
        return {"id": np.asarray(batch["id"], dtype=np.int64), "ok": ok, "reason": reason, "embedding": emb,
                "provider": np.array([self.encoder.providers[0]] * n, dtype=object)}


# -- Ray ------------------------------------------------------------------------------------------------------

class RaySession:
    """``with RaySession(address):``: connect to ``address`` (a running cluster) or start a local Ray when it
    is None; a Ray already initialised in this process is used as it is. Shuts down only what it started."""

    def __init__(self, address: str | None = None, **init_kwargs):
        self.address, self.init_kwargs, self.started = address, init_kwargs, False

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.address:  # a remote cluster needs this package shipped to its workers
                import engine

                kwargs["runtime_env"] = {"py_modules": [str(Path(engine.__file__).resolve().parent)]}
            kwargs.update(self.init_kwargs)
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = f"connect to the Ray cluster at {self.address!r}" if self.address else "start a local Ray"
                raise InputError(f"cannot {where}: {e}") from None
            self.started = True
        return self

    def __exit__(self, *exc):
        if self.started:
            import ray

            ray.shutdown()


# -- embedding ------------------------------------------------------------------------------------------------

def embed_collection(source, out, *, model=None, actors: int | None = None, batch_size: int = BATCH_SIZE,
                     rows_per_shard: int = ROWS_PER_SHARD, gpus_per_actor: float | None = None,
                     threads: int | None = None, address: str | None = None, progress: bool = True,
                     log=print) -> dict:
    """Embed ``source`` into Parquet shards under ``out`` (see the module docstring); returns a summary dict:
    ``manifest`` (as written), ``embedded`` / ``skipped`` (images this run), ``shards_written`` /
    ``shards_kept`` (this run), ``seconds``, ``first_result_seconds`` (start-up: until the first embeddings came
    back; absent when nothing was embedded) and ``actors``.

    ``model``: an exported .onnx file (default: the packaged image encoder). ``actors``: size of the actor pool
    (default: one per ``threads`` CPUs of the cluster, or one per ``gpus_per_actor`` GPUs). ``threads``:
    onnxruntime threads and CPUs per CPU actor (default 1). ``gpus_per_actor``: GPUs per actor (default 1 when
    the cluster has GPUs, else 0). ``address``: a running Ray cluster (default: a local one, started and stopped
    here unless Ray is already initialised in this process).
    """
    from engine.encoder import Encoder

    if model is None:
        from engine.default_models import default_model

        model = default_model("image")
    batch_size = _positive("batch_size", batch_size)
    rows_per_shard = _positive("rows_per_shard", rows_per_shard)
    rows_per_shard = math.ceil(rows_per_shard / batch_size) * batch_size
    threads = 1 if threads is None else _positive("threads", threads)
    if actors is not None:
        actors = _positive("actors", actors)
    if gpus_per_actor is not None and (not isinstance(gpus_per_actor, (int, float)) or gpus_per_actor < 0):
        raise InputError(f"gpus_per_actor must be a number >= 0, got {gpus_per_actor!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a folder, got the file {out}")
    why = unwritable(out)
    if why:
        raise InputError(f"cannot write embeddings to {out}: {why}")
    coll = collect(source)
    probe = Encoder(model, providers=["CPUExecutionProvider"], threads=1)  # identity and dim, checked up front
    identity, dim = probe.identity, probe.dim
    del probe
    model_bytes = Path(model).read_bytes()
    if hashlib.sha256(model_bytes).hexdigest() != identity["sha256"]:
        raise InputError(f"{model} changed while it was being read; try again")
    n = len(coll.files)
    nshards = math.ceil(n / rows_per_shard)
    settings = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": identity, "model_path": str(Path(model).resolve()),
        "dim": dim, "source": {"kind": coll.kind, "root": coll.root, "count": n, "sha256": coll.digest},
        "rows_per_shard": rows_per_shard, "batch_size": batch_size,
    }
    kept = _resumable_shards(out, settings, log)
    todo = [i for i in range(nshards) if i not in kept]
    shards = dict(kept)
    t0 = time.perf_counter()
    summary = {"embedded": 0, "skipped": 0, "shards_written": 0, "shards_kept": len(kept), "actors": 0}

    def write_manifest():
        entries = [shards[i] for i in sorted(shards)]
        skipped = [s for e in entries for s in e["skipped"]]
        man = {**settings, "shards": entries, "complete": len(shards) == nshards,
               "embedded": sum(e["rows"] for e in entries), "skipped": len(skipped)}
        atomic_write(out / MANIFEST, (json.dumps(man, indent=1) + "\n").encode())
        return man

    if kept:
        log(f"resuming: {len(kept)} of {nshards} shards already written and verified in {out}")
    if not todo:
        man = write_manifest()
        summary.update(manifest=man, seconds=time.perf_counter() - t0)
        return summary

    # Names that Parquet cannot hold (not valid UTF-8) are skipped up front, with the reason.
    unnameable = {}
    for i in (i for s in todo for i in range(s * rows_per_shard, min(n, (s + 1) * rows_per_shard))):
        try:
            coll.names[i].encode("utf-8")
        except UnicodeEncodeError:
            unnameable[i] = "the file name is not valid UTF-8 (Parquet strings must be)"

    import pyarrow as pa
    import ray

    with RaySession(address):
        cpus = int(ray.cluster_resources().get("CPU", 0))
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus_per_actor is None:
            gpus_per_actor = 1 if gpus >= 1 else 0
        if gpus_per_actor and gpus < gpus_per_actor:
            raise InputError(f"gpus_per_actor={gpus_per_actor} but the Ray cluster has {gpus:g} GPUs")
        if actors is None:
            actors = int(gpus // gpus_per_actor) if gpus_per_actor else max(1, cpus // threads)
        blocks = []
        for s in todo:
            stop = min(n, (s + 1) * rows_per_shard)
            for b in range(s * rows_per_shard, stop, batch_size):
                ids = [i for i in range(b, min(stop, b + batch_size)) if i not in unnameable]
                if ids:
                    blocks.append(pa.table({"id": pa.array(ids, pa.int64()),
                                            "file": pa.array([coll.files[i] for i in ids], pa.string())}))
        actors = max(1, min(actors, len(blocks)))
        summary["actors"] = actors
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.verbose_progress = False
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own progress bar and summary instead
        ds = ray.data.from_arrow(blocks).map_batches(
            EncodeBatch, fn_constructor_kwargs={"model": str(model), "model_bytes": model_bytes, "batch_size": batch_size,
                                   "threads": threads},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0 if gpus_per_actor else threads, num_gpus=gpus_per_actor or None)
        pending = {s: {"need": min(n, (s + 1) * rows_per_shard) - s * rows_per_shard, "got": 0,
                       "parts": [], "skipped": []} for s in todo}
        for i, why in unnameable.items():
            pending[i // rows_per_shard]["skipped"].append({"id": i, "path": coll.names[i].encode(
                "utf-8", "backslashreplace").decode(), "reason": why})
            pending[i // rows_per_shard]["got"] += 1
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(p["need"] for p in pending.values()), desc=f"embed ({identity['model']})",
                       unit="img", dynamic_ncols=True, file=sys.stderr)
            bar.update(len(unnameable))
        try:
            for s in [s for s, p in pending.items() if p["got"] == p["need"]]:  # all unnameable
                shards[s] = _write_shard(out, s, pending.pop(s), coll, dim, rows_per_shard, n)
                summary["shards_written"] += 1
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                if "first_result_seconds" not in summary:  # Ray Data and actor pool start-up until here
                    summary["first_result_seconds"] = time.perf_counter() - t0
                ids, ok = batch["id"], batch["ok"]
                for s in np.unique(ids // rows_per_shard).tolist():
                    p = pending[s]
                    sel = ids // rows_per_shard == s
                    good = sel & ok
                    p["parts"].append((ids[good], np.asarray(batch["embedding"][good], np.float32)))
                    for j in np.flatnonzero(sel & ~ok):
                        p["skipped"].append({"id": int(ids[j]), "path": coll.names[int(ids[j])],
                                             "reason": str(batch["reason"][j])})
                    p["got"] += int(sel.sum())
                    summary["embedded"] += int(good.sum())
                    if p["got"] == p["need"]:
                        shards[s] = _write_shard(out, s, pending.pop(s), coll, dim, rows_per_shard, n)
                        summary["shards_written"] += 1
                        write_manifest()
                if bar is not None:
                    bar.update(len(ids))
        except ray.exceptions.RayError as e:  # an actor that cannot start, a lost node: resumable, say so
            first = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
            raise EmbeddingFailed(f"embedding failed on the Ray cluster after {summary['shards_written']} shards were "
                                  f"written ({type(e).__name__}: {first}); run the same command again to resume"
                                  ) from e
        finally:
            if bar is not None:
                bar.close()
        if pending:
            raise EmbeddingFailed(f"Ray Data returned no results for shards {sorted(pending)}; run again to resume")
    summary["skipped"] = sum(len(shards[s]["skipped"]) for s in todo)
    man = write_manifest()
    summary.update(manifest=man, seconds=time.perf_counter() - t0)
    return summary


def _positive(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _write_shard(out: Path, s: int, p: dict, coll: Collection, dim: int, rows_per_shard: int, n: int) -> dict:
    """Write shard ``s`` (sorted by id) atomically; returns its manifest entry."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = p["parts"]
    ids = np.concatenate([a for a, _ in parts]) if parts else np.zeros(0, np.int64)
    emb = np.concatenate([e for _, e in parts]) if parts else np.zeros((0, dim), np.float32)
    order = np.argsort(ids, kind="stable")
    ids, emb = ids[order], np.ascontiguousarray(emb[order], dtype=np.float32)
    table = pa.table({
        "id": pa.array(ids, pa.int64()),
        "path": pa.array([coll.names[i] for i in ids.tolist()], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    atomic_write(out / shard_file(s), data)
    return {"file": shard_file(s), "first_id": s * rows_per_shard, "stop_id": min(n, (s + 1) * rows_per_shard),
            "rows": int(len(ids)), "sha256": hashlib.sha256(data).hexdigest(),
            "skipped": sorted(p["skipped"], key=lambda d: d["id"])}


def _resumable_shards(out: Path, settings: dict, log) -> dict:
    """Shards of an earlier run into ``out`` that can be kept: {index: manifest entry}."""
    if not (out / MANIFEST).exists():
        return {}
    man = read_manifest(out)
    for key in ("model", "dim", "source", "rows_per_shard", "batch_size", "format_version"):
        if man.get(key) != settings[key]:
            what = {"model": "another model", "source": "another input (other images or order)",
                    "dim": "another dim"}.get(key, f"another {key}")
            raise InputError(f"{out} holds embeddings made with {what} ({key}: {_short(man.get(key))} there, "
                             f"{_short(settings[key])} now); use a new --out folder, or delete that one")
    kept = {}
    for e in man["shards"]:
        f = out / e["file"]
        if f.is_file() and _file_sha256(f) == e["sha256"]:
            kept[e["first_id"] // settings["rows_per_shard"]] = e
        else:
            log(f"warning: {f} is missing or differs from the manifest; embedding it again")
    return kept


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- reading back ---------------------------------------------------------------------------------------------

def read_manifest(out) -> dict:
    """The manifest of an embeddings folder, its fields checked; ``IndexFileError`` naming the problem."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise IndexFileError(f"no embeddings manifest at {path} (embed a collection there first)")
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IndexFileError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; not an embeddings manifest")
    try:
        man = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{path} is not valid JSON ({e})") from None

    def bad(what):
        return IndexFileError(f"{path}: {what}")

    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise bad(f"not a lookalike embeddings manifest (format {FORMAT!r} expected)")
    if man.get("format_version") != FORMAT_VERSION:
        raise bad(f"format version {man.get('format_version')!r}; this lookalike reads {FORMAT_VERSION}")
    for key in ("dim", "rows_per_shard", "batch_size"):
        if not is_int(man.get(key)) or man[key] < 1:
            raise bad(f"{key} must be a positive int, got {man.get(key)!r}")
    src = man.get("source")
    if not isinstance(src, dict) or not is_int(src.get("count")) or src["count"] < 1:
        raise bad("source.count must be a positive int")
    if not isinstance(man.get("model"), dict) or not isinstance(man.get("complete"), bool):
        raise bad("model must be an object and complete a boolean")
    shards = man.get("shards")
    if not isinstance(shards, list):
        raise bad("shards must be a list")
    r, count, seen = man["rows_per_shard"], src["count"], set()
    for j, e in enumerate(shards):
        ok = (isinstance(e, dict) and isinstance(e.get("file"), str) and is_int(e.get("first_id"))
              and is_int(e.get("stop_id")) and is_int(e.get("rows")) and isinstance(e.get("sha256"), str)
              and isinstance(e.get("skipped"), list))
        if not ok:
            raise bad(f"shard entry {j} lacks file / first_id / stop_id / rows / sha256 / skipped")
        s = e["first_id"] // r if e["first_id"] >= 0 else -1
        if (e["first_id"] != s * r or s in seen or e["file"] != shard_file(s)
                or e["stop_id"] != min(count, (s + 1) * r) or not 0 <= e["rows"] <= e["stop_id"] - e["first_id"]):
            raise bad(f"shard entry {j} ({e['file']!r}) does not match the shard layout "
                      f"(rows_per_shard {r}, {count} images)")
        seen.add(s)
    return man


@dataclass
class Embeddings:
    """What ``load_embeddings`` returns: ids (n,) int64 ascending, paths (n,) str, vectors (n, dim) float32."""

    ids: np.ndarray
    paths: list[str]
    vectors: np.ndarray
    manifest: dict


def read_shard(out, entry: dict, dim: int) -> Embeddings:
    """One shard, checked against its manifest ``entry`` (sha256 first, then schema, rows, ids, values)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(out) / entry["file"]
    if not path.is_file():
        raise IndexFileError(f"embeddings shard {path} is missing")
    data = path.read_bytes() if path.stat().st_size <= (entry["rows"] + 1) * (dim * 4 + 4096) + (1 << 20) else None
    if data is None:
        raise IndexFileError(f"{path} is far larger than {entry['rows']} rows of dim {dim} can be")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IndexFileError(f"{path}: sha256 differs from the manifest (the shard was altered or damaged)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise IndexFileError(f"{path} is not a readable Parquet file ({e})") from None
    want = pa.schema([("id", pa.int64()), ("path", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])
    got = pa.schema([(f.name, f.type) for f in table.schema])
    if not got.equals(want):
        raise IndexFileError(f"{path}: columns must be id int64, path string, embedding fixed_size_list<float>[{dim}]"
                             f"; got {', '.join(f'{f.name} {f.type}' for f in table.schema)}")
    if table.num_rows != entry["rows"]:
        raise IndexFileError(f"{path} has {table.num_rows} rows; the manifest says {entry['rows']}")
    for name in ("id", "path", "embedding"):
        col = table.column(name)
        if col.null_count or (name == "embedding" and pc.list_flatten(col).null_count):
            raise IndexFileError(f"{path}: column {name!r} has null entries")
    ids = table.column("id").to_numpy()
    if ids.size and (ids.min() < entry["first_id"] or ids.max() >= entry["stop_id"] or (np.diff(ids) <= 0).any()):
        raise IndexFileError(f"{path}: ids must be ascending, unique and within [{entry['first_id']}, "
                             f"{entry['stop_id']})")
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(flat, dtype=np.float32).reshape(len(ids), dim)
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    bad = ~finite | ((np.abs(norms - 1) > _UNIT_TOL) & (norms > 0))
    if bad.any():
        raise IndexFileError(f"{path}: embedding of id {int(ids[np.argmax(bad)])} is not finite with norm 1 or 0")
    return Embeddings(ids.astype(np.int64), table.column("path").to_pylist(), vectors, entry)


def load_embeddings(out, *, require_complete: bool = True) -> Embeddings:
    """Every shard of an embeddings folder, checked (``read_shard``), concatenated in id order."""
    man = read_manifest(out)
    if require_complete and not man["complete"]:
        raise IndexFileError(f"{out} holds an unfinished run ({len(man['shards'])} shards written); run the "
                             f"embedding again to finish it, or pass require_complete=False")
    parts = [read_shard(out, e, man["dim"]) for e in sorted(man["shards"], key=lambda e: e["first_id"])]
    dim = man["dim"]
    return Embeddings(
        np.concatenate([p.ids for p in parts]) if parts else np.zeros(0, np.int64),
        [x for p in parts for x in p.paths],
        np.concatenate([p.vectors for p in parts]) if parts else np.zeros((0, dim), np.float32),
        man)


def searcher_from_embeddings(out, *, metric: str = "cosine", require_complete: bool = True):
    """One ``engine.Searcher`` over every embedding of the folder, the ids those of the shards."""
    from engine.searcher import Searcher

    emb = load_embeddings(out, require_complete=require_complete)
    s = Searcher(emb.manifest["dim"], metric=metric)
    s.add(emb.vectors, emb.ids)
    return s


def shard_searchers(out, *, metric: str = "cosine", require_complete: bool = True) -> list:
    """One ``engine.Searcher`` per Parquet shard (each checked as ``read_shard`` does)."""
    from engine.searcher import Searcher

    man = read_manifest(out)
    if require_complete and not man["complete"]:
        raise IndexFileError(f"{out} holds an unfinished run; run the embedding again to finish it")
    result = []
    for e in sorted(man["shards"], key=lambda e: e["first_id"]):
        part = read_shard(out, e, man["dim"])
        s = Searcher(man["dim"], metric=metric)
        s.add(part.vectors, part.ids)
        result.append(s)
    return result
