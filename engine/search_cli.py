"""python -m engine.search: index a folder of images, query it, and find its near-duplicates.

The command line (``main``) and its steps; ``engine/search.py`` only runs it for ``python -m engine.search``,
the class that does the searching is ``engine.searcher.Searcher`` and the grouping of near-duplicates is
``engine.dups``.

    python -m engine.search index ~/Pictures --index pictures.idx        # the packaged default image model
    python -m engine.search index ~/Pictures --index pictures.idx        # again: only what changed
    python -m engine.search query a.jpg photos/ --index pictures.idx -k 5 --out results.png [--json]
    python -m engine.search dups ~/Pictures --out dups/ [--index pictures.idx] [--threshold 0.9]

``index`` embeds every image under FOLDER (recursive; .jpg .jpeg .png .bmp .webp .tif .tiff; symbolic links
followed, each folder read and each file listed once, so link loops end) into one index file (format 2, see
``engine.searcher``): each vector's meta is the image's absolute path (FOLDER resolved, then the path under
it) and its stamp the file's size, modification time (ns) and sha256, which makes indexing again incremental:
a file whose size and modification time are those recorded is unchanged without being read; one whose size
or time changed is hashed, and embedded again only when its sha256 changed too (a file touched but not
edited is not); new files are embedded, and entries under FOLDER whose file is gone (or no longer reads as an
image) are removed. Entries of the index outside FOLDER (another folder indexed into the same file, vectors
added through the API without a path) are left as they are. Files that cannot be decoded, or are too large to
(``engine.preprocess.read_image``), are skipped with a warning; the summary line counts what was added,
updated, removed, unchanged and skipped (with reasons). Without ``--model``, a new index uses the packaged
default image model (``engine.default_models``) and an existing one the model it was built with (recorded in
the file), and the command says which.

``query`` embeds each query image (files, and folders expanded as ``index`` lists them) with the index's model
(``--model``, else the file recorded in the index when it is still there, else the default image model; a
model whose identity differs from the one recorded is refused), leaves the query itself out of its own results
(the entries with its path, as given or resolved; for a query outside the index, the entries with its content
sha256: the same image stored under another path; a byte-identical copy of an indexed query is a result like any
other), prints the top-k results with their cosine scores (k at most the number of indexed images), ``--json``
prints them as JSON instead (schema in ``query --help``), and ``--out`` writes a PNG with one row per query: the
query, then its results with rank, score and file name.

It reads any index ``Searcher.save`` wrote: paths come from the meta (an index whose vectors have no meta
names its results by id only), and a version-1 index with the ``<index>.paths.json`` sidecar older versions
of this command wrote beside it (checked: a damaged sidecar, a path leaving its folder, or a sidecar of
another index is refused). Indexing into such an index rewrites it as one version-2 file and removes the
sidecar. File names that are not valid UTF-8 are recorded and shown with ``\\xNN`` escapes.

``dups`` embeds FOLDER (into ``--index`` incrementally when given, else in memory), then groups
near-duplicates (``engine.dups``): two images whose cosine similarity is at least ``--threshold`` are joined,
and the groups are the connected components; it writes ``dups.json``, ``dups.csv`` and ``dups.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import heapq
import io
import json
import os
import stat
import sys
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from engine.errors import ImageReadError, IndexFileError, InputError, LookalikeError
from engine.fileio import atomic_write, unwritable

if TYPE_CHECKING:
    import numpy as np

# numpy, OpenCV, onnxruntime, numba and matplotlib are imported inside the commands, after the arguments are
# parsed, so that ``--help`` answers at once.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SIDECAR_SUFFIX = ".paths.json"  # the version-1 index's paths (read, never written now)
SIDECAR_VERSION = 1
CHUNK = 256  # images handed to the encoder at a time while indexing
THUMB = 256  # longest side of the pictures in the results PNG

EPILOG = """\
examples:
  python -m engine.search index ~/Pictures --index pictures.idx
  python -m engine.search query query.jpg --index pictures.idx -k 5 --out results.png
  python -m engine.search query a.jpg more/ --index pictures.idx --json
  python -m engine.search dups ~/Pictures --out dups/

The index is one file: the embeddings, the model's identity, and each image's path and file stamp (size,
modification time, sha256), so indexing the folder again embeds only what changed. Indexes written by
Searcher.save work here too, and older indexes with their <index>.paths.json sidecar still load.
Scores are cosine similarities (1 = same direction).
"""

QUERY_JSON = """\
--json prints one JSON object:
  {"index": PATH, "model": NAME, "k": K,
   "queries": [{"query": PATH,
                "excluded": [ID, ...],          # entries left out as the query itself
                "results": [{"rank": 1, "score": S, "id": ID, "path": PATH or null}, ...]}, ...]}
Paths are text (bytes of a name that are not UTF-8 as \\xNN); a result without a recorded path has null.
"""


def sidecar_path(index) -> Path:
    index = Path(index)
    return index.with_name(index.name + SIDECAR_SUFFIX)


def list_images(folder) -> list[Path]:
    """Image files under ``folder``, recursive, hidden files and folders skipped, sorted by relative path.

    Symbolic links are followed, but every folder is read once and every file listed once (both known by
    device and inode), so a link back up the tree (``ln -s . loop``) or two links crossing each other end,
    and an image reached under two names (hard links, a link to a file or folder already listed) is listed
    under one. Folders reached through fewer links are read first, so that name is a real path when there
    is one; among equals the one that sorts first wins.
    """
    folder = Path(folder)
    best: dict = {}  # (st_dev, st_ino) of an image file -> (links on its path, relative path)
    unknown = []  # image names whose target cannot be stat'ed (broken links): listed, so the indexer names them
    done = set()  # (st_dev, st_ino) of the folders read
    todo = [(0, (), folder)]  # heap of (links followed to get there, relative parts, path)
    while todo:
        links, rel, path = heapq.heappop(todo)
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in done:
                continue
            done.add(key)
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:  # unreadable or vanished: skipped, as os.walk does
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                via = int(e.is_symlink())
                st = e.stat()  # follows links
            except OSError:
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                heapq.heappush(todo, (links + via, (*rel, e.name), Path(e.path)))
            elif e.name.lower().endswith(IMAGE_EXTS):
                name = "/".join((*rel, e.name))
                if st is None:
                    unknown.append(name)
                    continue
                cand = (links + via, name)
                key = (st.st_dev, st.st_ino)
                if key not in best or cand < best[key]:
                    best[key] = cand
    names = sorted([n for _, n in best.values()] + unknown)
    return [folder / n for n in names]


def printable(name) -> str:
    """``name`` (a path or text) as text every terminal and matplotlib can show: bytes of a file name that are not
    UTF-8 (Python keeps them as lone surrogates, e.g. a Latin-1 ``caf\\xe9.jpg`` on Linux) become ``\\xNN``, other
    characters that do not print (control characters, a newline) their Python escape."""
    s = str(name)
    if s.isprintable():
        return s
    out = []
    for c in s:
        if c.isprintable():
            out.append(c)
        elif 0xDC80 <= ord(c) <= 0xDCFF:  # an undecodable byte, as os.fsdecode keeps it
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        else:
            out.append(repr(c)[1:-1])
    return "".join(out)


def meta_path(text: str) -> Path:
    """The file a meta path names: ``text`` itself, or, when no such file exists and ``text`` holds ``\\xNN``
    escapes (``engine.searcher.meta_text`` writes the bytes of a name that are not UTF-8 so), the name with those
    bytes restored when that file exists."""
    import re

    p = Path(text)
    if "\\x" in text and not p.exists():
        raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), text.encode("utf-8"))
        q = Path(os.fsdecode(raw))
        if q.exists():
            return q
    return p


def index_digest(index) -> str:
    """The checksum recorded in the index file's header line (the whole file's sha256 if it has none)."""
    import hashlib

    index = Path(index)
    with open(index, "rb") as f:
        line = f.readline(1 << 20)
    try:
        head = json.loads(line.split(b" ", 1)[1])
        if isinstance(head, dict) and isinstance(head.get("sha256"), str):
            return head["sha256"]
    except (IndexError, ValueError):
        pass
    return hashlib.sha256(index.read_bytes()).hexdigest()


def index_version(index) -> int | None:
    """The ``format_version`` of the index file's header line, or None when it does not read as one."""
    try:
        with open(index, "rb") as f:
            line = f.readline(1 << 20)
        head = json.loads(line.split(b" ", 1)[1])
        v = head.get("format_version") if isinstance(head, dict) else None
        return v if type(v) is int else None
    except (OSError, IndexError, ValueError):
        return None


def check_output(path, what: str) -> None:
    """Refuse (InputError) an output file ``path`` that cannot be written: a folder there, or a folder for it
    that cannot be made or written (``engine.fileio.unwritable``). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write the {what} to {path}: it is a folder; give a file name")
    why = unwritable(path.parent)
    if why:
        raise InputError(f"cannot write the {what} to {path}: {why}")


# -- the index and its model ------------------------------------------------------------------------------

def load_sidecar(index) -> dict:
    """The paths sidecar of a version-1 ``index``, checked: IndexFileError naming the file and the problem
    otherwise."""
    path = sidecar_path(index)
    if not Path(index).is_file():
        raise IndexFileError(f"index file not found: {index}")
    if not path.is_file():
        raise IndexFileError(f"{index} is a version-1 index without its paths sidecar {path.name} beside it; index "
                             f"the folder again with `python -m engine.search index FOLDER --index {index}`")
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
        _check_sidecar(side)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise IndexFileError(f"{path}: damaged paths sidecar ({e})") from None
    if side["index_sha256"] != index_digest(index):
        raise IndexFileError(f"{path} does not belong to {index} (the index was rewritten since); index the folder "
                             f"again")
    return side


def _check_sidecar(side) -> None:
    """ValueError naming the first thing a sidecar's JSON gets wrong."""
    if not isinstance(side, dict):
        raise ValueError(f"expected a JSON object, got {type(side).__name__}")
    if side.get("format_version") != SIDECAR_VERSION:
        raise ValueError(f"format version {side.get('format_version')!r}, expected {SIDECAR_VERSION}")
    for key in ("root", "model", "index_sha256"):
        if not isinstance(side.get(key), str):
            raise ValueError(f"{key!r} must be a string, got {_kind(side.get(key), key in side)}")
    paths, count = side.get("paths"), side.get("count")
    if not isinstance(paths, list):
        raise ValueError(f"'paths' must be a list of strings, got {_kind(paths, 'paths' in side)}")
    if type(count) is not int:
        raise ValueError(f"'count' must be an int, got {_kind(count, 'count' in side)}")
    if len(paths) != count:
        raise ValueError(f"{len(paths)} paths for count {count}")
    for i, rel in enumerate(paths):
        if not isinstance(rel, str):
            raise ValueError(f"paths[{i}] must be a string, got {_kind(rel, True)}")
        parts = PurePosixPath(rel).parts
        if not rel or "\0" in rel or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise ValueError(f"paths[{i}] = {rel!r} is not a path inside the indexed folder (expected a relative "
                             f"path without '..')")


def _kind(value, present: bool) -> str:
    return f"{type(value).__name__} {value!r}"[:80] if present else "nothing (absent)"


def choose_model(model, recorded, log=print):
    """The ``engine.encoder.Encoder`` to use: ``model`` when given; else the ``recorded`` file when it is there
    (an index's ``model_path``); else the packaged default image model. Says which when it was not given."""
    from engine.default_models import default_model
    from engine.encoder import Encoder

    if model is not None:
        return Encoder(model)
    if recorded and Path(recorded).is_file():
        enc = Encoder(recorded)
        log(f"model: {printable(enc.path)} ({enc.describe}), recorded in the index")
        return enc
    enc = Encoder(default_model("image"))
    log(f"model: the default image model {printable(enc.path)} ({enc.describe})"
        + (f" (the recorded {printable(recorded)} is not there)" if recorded else ""))
    return enc


def _peek_v2(index) -> dict:
    """The header fields of a version-2 index that say which model built it (without loading the vectors)."""
    try:
        with open(index, "rb") as f:
            line = f.readline(1 << 20)
        head = json.loads(line.split(b" ", 1)[1])
        return head if isinstance(head, dict) else {}
    except (OSError, IndexError, ValueError):
        return {}


def open_index(index, *, model=None, log=print, mmap=False):
    """(Searcher with its encoder attached, True when it came from a version-1 index + sidecar) for an existing
    index file: version 2 or 3 (its meta are the paths), or version 1 with its sidecar (the sidecar's paths become
    the meta, absolute). Refuses a model whose identity differs from the one recorded (ModelError). ``mmap``:
    ``Searcher.load``'s (a version-1 index is read whole)."""
    from engine.searcher import Searcher, meta_text

    index = Path(index)
    if not index.is_file():
        raise IndexFileError(f"index file not found: {index}" + (" (it is a folder)" if index.is_dir() else ""))
    if index_version(index) == 1:
        side = load_sidecar(index)
        encoder = choose_model(model, side["model"], log=log)
        searcher = Searcher.load(index, encoder=encoder)
        if len(searcher) != side["count"]:
            raise IndexFileError(f"{index} holds {len(searcher)} vectors but its sidecar lists {side['count']} "
                                 f"paths")
        stored = searcher.ids
        outside = stored[(stored < 0) | (stored >= len(side["paths"]))]
        if outside.size:
            raise IndexFileError(f"{index} holds ids {outside[:5].tolist()}{' ...' if outside.size > 5 else ''} but "
                                 f"its sidecar names images 0..{len(side['paths']) - 1} only; index the folder again")
        root = Path(side["root"])
        searcher._meta = [meta_text(root / side["paths"][i]) for i in stored.tolist()]
        return searcher, True
    recorded = _peek_v2(index).get("model_path")
    encoder = choose_model(model, recorded if isinstance(recorded, str) else None, log=log)
    return Searcher.load(index, encoder=encoder, mmap=mmap), False


# -- index ------------------------------------------------------------------------------------------------

def _under(key: str, root_key: str) -> bool:
    return key.startswith(root_key.rstrip("/") + "/")


def update_index(folder, *, index=None, model=None, batch_size: int = 32, progress: bool = True, log=print,
                 storage=None):
    """Bring the index of the images under ``folder`` up to date (see the module docstring): ``index`` an existing
    file (updated incrementally), a new one, or None (in memory only; nothing is written). Returns
    ``(searcher, summary)``, the summary a dict of the counts (``added``, ``updated``, ``removed``, ``unchanged``,
    ``skipped``: a list of (path, reason)), ``embedded`` (the images given to the encoder) and ``root``.
    ``storage`` (float32, float16, int8; ``Searcher``'s) is for a new index; an existing one keeps its own, and
    asking it for another is an error."""
    from engine.preprocess import read_image
    from engine.searcher import FileStamp, Searcher, meta_text

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"expected a folder of images, got {folder} "
                         f"({'not a folder' if folder.exists() else 'nothing there'})")
    files = list_images(folder)
    if not files:
        raise InputError(f"no images found under {folder} (looked for {', '.join(IMAGE_EXTS)}, recursively)")
    upgraded = False
    if index is not None:
        index = Path(index)
        check_output(index, "index")  # before the embedding, not after it
    if index is not None and index.exists():
        searcher, upgraded = open_index(index, model=model, log=log)
        encoder = searcher.encoder
        if storage is not None and storage != searcher.storage:
            raise InputError(f"{index} holds {searcher.storage} vectors, --storage asks for {storage}: an index keeps "
                             f"the storage it was built with (write a new one, or leave --storage out)")
    else:
        encoder = choose_model(model, None, log=log)
        encoder.batch_size = batch_size
        searcher = Searcher(encoder=encoder, storage=storage or "float32")
    encoder.batch_size = batch_size
    root = folder.resolve()
    root_key = meta_text(root)
    listed = {meta_text(root / p.relative_to(folder)): p for p in files}
    known = {}  # meta path under root -> (id, stamp)
    for id_, m, st in zip(searcher.ids.tolist(), searcher.meta(), searcher.stamps()):
        if m is not None and _under(m, root_key):
            known[m] = (id_, st)
    summary = {"added": 0, "updated": 0, "removed": 0, "unchanged": 0, "skipped": [], "embedded": 0,
               "root": str(root), "model": encoder.name, "storage": searcher.storage}
    todo = []  # (meta path, file, stamp or None: new files are read under the progress bar, old id or None)
    restamp = []  # (id, new stamp): same bytes, new size / time
    gone = [known[k][0] for k in known if k not in listed]
    for key, p in listed.items():
        old = known.get(key)
        if old is None or old[1] is None:  # new, or recorded without a stamp (a version-1 index, the API)
            todo.append((key, p, None, None if old is None else old[0]))
            continue
        try:
            st = os.stat(p)
            if (old[1].size, old[1].mtime_ns) == (st.st_size, st.st_mtime_ns):
                summary["unchanged"] += 1
                continue
            stamp = FileStamp.of(p)  # size or time changed: the bytes decide
        except OSError as e:
            summary["skipped"].append((key, f"cannot read it ({e.strerror or e})"))
            gone.append(old[0])  # an entry whose file no longer reads is dropped
            continue
        if old[1].sha256 == stamp.sha256:
            summary["unchanged"] += 1
            restamp.append((old[0], stamp))
            continue
        todo.append((key, p, stamp, old[0]))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"index ({encoder.name})", unit="img", dynamic_ncols=True)
    floor = encoder.preprocess.min_decode_size()  # read_image decodes a huge JPEG no larger than the encoder needs
    try:
        for s in range(0, len(todo), CHUNK):
            chunk = []
            for t in todo[s : s + CHUNK]:  # stamps first: a file edited while it is embedded is embedded again next time
                try:
                    chunk.append(t if t[2] is not None else (t[0], t[1], FileStamp.of(t[1]), t[3]))
                except OSError as e:
                    summary["skipped"].append((t[0], f"cannot read it ({e.strerror or e})"))
                    if t[3] is not None:
                        gone.append(t[3])
                    log(f"warning: skipped {printable(t[1])}: cannot read it ({e.strerror or e})", file=sys.stderr)
            try:
                vectors = encoder.encode([str(t[1]) for t in chunk]) if chunk else None
                good = chunk
                summary["embedded"] += len(chunk)
            except ImageReadError:  # rare: find the culprits (decoding one at a time), embed the rest
                good = []
                for t in chunk:
                    try:
                        read_image(t[1], min_size=floor)
                        good.append(t)
                    except ImageReadError as e:
                        summary["skipped"].append((t[0], str(e)))
                        if t[3] is not None:
                            gone.append(t[3])
                        log(f"warning: skipped {printable(t[1])}: {printable(e)}", file=sys.stderr)
                vectors = encoder.encode([str(t[1]) for t in good]) if good else None
                summary["embedded"] += len(good)
            if good:
                old_ids = [t[3] for t in good if t[3] is not None]
                searcher.remove(old_ids)
                searcher.add(vectors, meta=[t[0] for t in good], stamps=[t[2] for t in good])
                summary["updated"] += len(old_ids)
                summary["added"] += len(good) - len(old_ids)
            if bar is not None:
                bar.update(len(todo[s : s + CHUNK]))
    finally:
        if bar is not None:
            bar.close()
    for id_, stamp in restamp:  # the same bytes under a new time: keep the vector, record the new stamp
        vec, meta = searcher.get([id_]), searcher.meta([id_])
        searcher.remove([id_])
        searcher.add(vec, ids=[id_], meta=meta, stamps=[stamp])
    summary["removed"] = searcher.remove(sorted(set(gone)))
    n_here = sum(1 for m in searcher.meta() if m is not None and _under(m, root_key))
    if n_here == 0:
        raise InputError(f"none of the {len(files)} image files under {folder} could be read")
    if index is not None:
        searcher.save(index)
        if upgraded and sidecar_path(index).is_file():
            sidecar_path(index).unlink()
            log(f"rewrote {printable(index)} as one version-2 file; removed its old {sidecar_path(index).name}")
    summary["count"] = len(searcher)
    log(summary_line(summary, index))
    return searcher, summary


def summary_line(summary: dict, index) -> str:
    skipped = summary["skipped"]
    reasons = ""
    if skipped:
        shown = "; ".join(f"{printable(Path(k).name)}: {printable(r)}" for k, r in skipped[:5])
        reasons = f" ({shown}{'; ...' if len(skipped) > 5 else ''})"
    where = f" -> {printable(index)}" if index is not None else ""
    storage = summary.get("storage", "float32")
    held = "" if storage == "float32" else f" ({storage} vectors)"
    return (f"indexed {printable(summary['root'])} with {summary['model']}{held}: {summary['added']} added, "
            f"{summary['updated']} updated, {summary['removed']} removed, {summary['unchanged']} unchanged, "
            f"{len(skipped)} skipped{reasons}{where} ({summary['count']} images in the index)")


def build_index(folder, *, model=None, index, batch_size: int = 32, progress: bool = True, log=print,
                storage=None) -> dict:
    """``update_index`` writing ``index``; returns the summary."""
    return update_index(folder, index=index, model=model, batch_size=batch_size, progress=progress, log=log,
                        storage=storage)[1]


def _log(*args, file=None, **kwargs):
    print(*args, file=file or sys.stdout, **kwargs)


# -- query ------------------------------------------------------------------------------------------------

def expand_queries(items) -> list[Path]:
    """Query files as given, folders expanded to their images (``list_images``)."""
    out = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise InputError(f"no images found under the query folder {p}")
            out += found
        else:
            out.append(p)
    return out


def run_query(images, *, index, model=None, k: int = 5, batch_size: int = 32, log=None, mmap=False,
              rerank=None) -> dict:
    """Search ``images`` in ``index``, each query left out of its own results; returns {"queries", "scores"
    (nq, k), "ids" (nq, k), "paths" (id -> path or None), "excluded" (per query), "model"}. ``mmap=True`` maps
    the index file instead of reading it whole (``Searcher.load(path, mmap=True)``); ``rerank=R`` scores the best
    R of a float16 / int8 index again against its float32 vectors (``Searcher.search``)."""
    import numpy as np

    from engine.searcher import FileStamp, meta_text

    queries = expand_queries(images)
    searcher, _ = open_index(index, model=model, log=log or (lambda *a, **kw: None), mmap=mmap)
    searcher.encoder.batch_size = batch_size
    ids = searcher.ids.tolist()
    by_path, by_sha = {}, {}
    for id_, m, st in zip(ids, searcher.meta(), searcher.stamps()):
        if m is not None:
            by_path.setdefault(m, []).append(id_)
        if st is not None:
            by_sha.setdefault(st.sha256, []).append(id_)
    excluded = []
    for q in queries:
        ex = set()
        for key in {meta_text(q), meta_text(q.absolute()), meta_text(q.resolve())}:  # as given, too (API meta)
            ex.update(by_path.get(key, ()))
        if by_sha and not ex:  # not indexed by its path: the same content stored elsewhere is the query itself
            try:
                ex.update(by_sha.get(FileStamp.of(q).sha256, ()))
            except OSError:
                pass  # the encoder names the file
        excluded.append(sorted(ex))
    n = len(searcher)
    k = min(k, max(1, n))  # never more than the index holds: nothing below grows with k
    extra = max((len(e) for e in excluded), default=0)
    raw_scores, raw_ids = searcher.search_images([str(q) for q in queries], min(k + extra, max(1, n)),
                                                 rerank=rerank)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for r, ex in enumerate(excluded):
        keep = ~np.isin(raw_ids[r], np.asarray(ex, dtype=np.int64)) if ex else np.ones(raw_ids.shape[1], bool)
        kept_s, kept_i = raw_scores[r][keep][:k], raw_ids[r][keep][:k]
        scores[r, : len(kept_s)], out_ids[r, : len(kept_i)] = kept_s, kept_i
    cols = max(1, int((out_ids >= 0).sum(axis=1).max())) if len(queries) else k
    scores, out_ids = scores[:, :cols], out_ids[:, :cols]  # no column that only padding fills
    paths = dict(zip(ids, searcher.meta()))
    return {"queries": [str(q) for q in queries], "scores": scores, "ids": out_ids, "paths": paths,
            "excluded": excluded, "model": searcher.encoder.name, "index": str(index)}


def result_path(res: dict, i: int) -> str | None:
    """The path of id ``i`` in results: ``res["paths"]`` maps ids to paths (``run_query``), or is a list indexed by
    id, its entries relative to ``res["root"]`` when that is given (as ``demo.py`` builds them)."""
    paths = res["paths"]
    if isinstance(paths, dict):
        return paths.get(i)
    if not 0 <= i < len(paths):
        return None
    root = res.get("root")
    return str(Path(root) / paths[i]) if root else paths[i]


def format_results(res: dict) -> str:
    lines = []
    for q, srow, irow in zip(res["queries"], res["scores"], res["ids"]):
        lines.append(printable(q))
        for rank, (s, i) in enumerate(zip(srow, irow), 1):
            if i < 0:
                lines.append(f"  {rank:>2}. (no more images in the index)")
                break
            path = result_path(res, int(i))
            lines.append(f"  {rank:>2}. {s:.4f}  [{i}] {printable(path) if path is not None else '(no path)'}")
    return "\n".join(lines)


def results_json(res: dict) -> str:
    """The results as the JSON ``query --help`` documents."""
    out = {"index": printable(res["index"]), "model": res["model"], "k": int(res["ids"].shape[1]), "queries": []}
    for q, srow, irow, ex in zip(res["queries"], res["scores"], res["ids"], res["excluded"]):
        rows = []
        for rank, (s, i) in enumerate(zip(srow.tolist(), irow.tolist()), 1):
            if i < 0:
                break
            path = result_path(res, i)
            rows.append({"rank": rank, "score": round(float(s), 6), "id": i,
                         "path": printable(path) if path is not None else None})
        out["queries"].append({"query": printable(q), "excluded": list(ex), "results": rows})
    return json.dumps(out, indent=1, ensure_ascii=False)


def _thumb(path) -> np.ndarray | None:
    """A thumbnail of the image file ``path``, or None when it does not read as one. Only files named like images
    are read: an index's meta names any path, and a hostile index must not get other files drawn into a picture."""
    import cv2

    from engine.preprocess import read_image

    if not str(path).lower().endswith(IMAGE_EXTS):
        return None
    try:
        img = read_image(path, min_size=(THUMB, THUMB))
    except ImageReadError:
        return None
    h, w = img.shape[:2]
    s = THUMB / max(h, w)
    if s < 1:
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return img


def results_picture(res: dict, out) -> Path:
    """One row per query: the query, then its results with rank, score and file name; written atomically."""
    import numpy as np
    from matplotlib.figure import Figure

    nq, k = res["ids"].shape
    fig = Figure(figsize=(2.0 * (k + 1), 2.3 * nq))
    axes = np.atleast_2d(fig.subplots(nq, k + 1, squeeze=False))
    for r in range(nq):
        cells = [(Path(res["queries"][r]), f"query\n{printable(Path(res['queries'][r]).name)}", "tab:blue")]
        for c in range(k):
            i = int(res["ids"][r, c])
            if i < 0:
                cells.append((None, "", "black"))
            else:
                path = result_path(res, i)
                name = printable(Path(path).name) if path is not None else f"id {i}"
                cells.append((meta_path(path) if path is not None else False,
                              f"#{c + 1}  {res['scores'][r, c]:.3f}\n{name}", "black"))
        draw_cells(axes[r], cells)
    fig.suptitle(f"lookalike: top-{k} by cosine similarity ({printable(res['model'])})", fontsize=9,
                 parse_math=False)
    return save_figure(fig, out)


def draw_cells(axes_row, cells) -> None:
    """Draw (path | None for an empty cell | False for no file, title, colour) cells into a row of axes."""
    for c, (path, title, colour) in enumerate(cells):
        ax = axes_row[c]
        ax.set_axis_off()
        if path is None:
            continue
        img = _thumb(path) if path is not False else None
        if img is None:
            ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(img)
        ax.set_title(_short(title), fontsize=7, color=colour, parse_math=False)  # a '$' in a name is text


def save_figure(fig, out) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = Path(out)
    atomic_write(out, buf.getvalue())
    return out


def _short(title: str, width: int = 26) -> str:
    head, _, name = title.partition("\n")
    if len(name) > width:
        name = name[: width - 3] + "..."
    return f"{head}\n{name}" if name else head


# -- dups -------------------------------------------------------------------------------------------------

def run_dups(folder, *, out, index=None, model=None, threshold=None, k=None, batch_size: int = 32,
             progress: bool = True, log=_log) -> dict:
    """Embed ``folder`` (into ``index`` incrementally when given), group its near-duplicates (``engine.dups``),
    and write dups.json, dups.csv and dups.png into ``out``; returns the report dict."""
    from engine import dups
    from engine.searcher import meta_text

    threshold = dups.DEFAULT_THRESHOLD if threshold is None else threshold
    k = dups.DEFAULT_K if k is None else k
    dups.check_options(threshold, k)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a folder, got {out} (a file)")
    why = unwritable(out)
    if why:
        raise InputError(f"cannot write into {out}: {why}")
    searcher, summary = update_index(folder, index=index, model=model, batch_size=batch_size, progress=progress,
                                     log=log)
    root_key = meta_text(Path(summary["root"]))
    ids = [i for i, m in zip(searcher.ids.tolist(), searcher.meta()) if m is not None and _under(m, root_key)]
    groups = dups.find_groups(searcher, ids, threshold=threshold, k=k)
    report = dups.report(groups, searcher, threshold=threshold, k=k, folder=summary["root"], model=summary["model"])
    written = dups.write_outputs(report, out)
    n_images = sum(len(g["members"]) for g in report["groups"])
    log(f"{len(report['groups'])} groups of near-duplicates ({n_images} images) among {len(ids)} at cosine >= "
        f"{threshold:g}; wrote {', '.join(printable(p) for p in written)}")
    return report


# -- command line -------------------------------------------------------------------------------------------

def _threshold_help() -> str:
    return ("cosine similarity at or above which two images are near-duplicates (default: %(default)s, chosen on "
            "benchmarks/dups_threshold.py: real photos against their crops, resizes, JPEG q30, rotations, brightness "
            "and flips, the highest recall at precision >= 0.99 with the default image model); scores of other "
            "models are on another scale")


def build_parser() -> argparse.ArgumentParser:
    from engine import dups  # stdlib only at import: the defaults, without numpy

    p = argparse.ArgumentParser(prog="python -m engine.search",
                                description="Index a folder of images with an image encoder, find the images most "
                                            "similar to query images, or find near-duplicates in a folder.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{index,query,dups}")
    pi = sub.add_parser("index", help="embed the images under a folder into an index (again: only what changed)",
                        description="Embed every image under FOLDER (recursive) into the index file. On an existing "
                                    "index only new and changed files are embedded (by size, modification time, "
                                    "then sha256) and vanished ones removed; a summary line counts them. "
                                    "Unreadable files are skipped with a warning.")
    pi.add_argument("folder", metavar="FOLDER", help="folder of images (.jpg .jpeg .png .bmp .webp .tif .tiff)")
    pi.add_argument("--index", required=True, metavar="OUT.idx", help="index file to write or update")
    pi.add_argument("--model", default=None, metavar="M",
                    help="exported encoder, e.g. models/la.onnx (default: the one the index was built with, or the "
                         "packaged default image model for a new index)")
    pi.add_argument("--batch-size", type=int, default=32, help="images per network call (default: 32)")
    pi.add_argument("--storage", choices=("float32", "float16", "int8"), default=None,
                    help="how a new index stores its vectors in memory: float16 (half) or int8 (a quarter, "
                         "per-dimension scale) codes are searched and the float32 vectors stay in the file for "
                         "query --rerank (default: float32; an existing index keeps its own)")
    pi.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pq = sub.add_parser("query", help="find the indexed images most similar to query images",
                        description="Print the top-k indexed images for each query image (cosine score, id, "
                                    "path), the query itself left out, and optionally draw them into a PNG.",
                        epilog=QUERY_JSON, formatter_class=argparse.RawDescriptionHelpFormatter)
    pq.add_argument("images", nargs="+", metavar="IMAGE", help="query image files or folders of them")
    pq.add_argument("--index", required=True, metavar="OUT.idx", help="index written by `index` or Searcher.save")
    pq.add_argument("--model", default=None, metavar="M",
                    help="encoder file (default: the one recorded in the index, else the default image model; "
                         "another model is refused)")
    pq.add_argument("-k", type=int, default=5,
                    help="results per query (default: 5; at most the number of indexed images)")
    pq.add_argument("--json", action="store_true", help="print the results as JSON (schema below)")
    pq.add_argument("--out", default=None, metavar="results.png",
                    help="write a PNG: each query beside its top-k results with their scores")
    pq.add_argument("--batch-size", type=int, default=32, help="images per network call (default: 32)")
    pq.add_argument("--mmap", action="store_true",
                    help="map the index file instead of reading it whole (for an index larger than memory: the "
                         "vectors are read as the search touches them; older index files are read whole)")
    pq.add_argument("--rerank", type=int, default=None, metavar="R",
                    help="for a float16 / int8 index: score the best R again against the float32 vectors in the "
                         "file (exact order among them; a float32 index is exact already)")
    pd = sub.add_parser("dups", help="find groups of near-duplicate images under a folder",
                        description="Embed every image under FOLDER (into --index incrementally when given), join "
                                    "every two images whose cosine similarity is at least --threshold, and write "
                                    "the groups (connected components) as dups.json, dups.csv (group, path, score to "
                                    "the group's first member) and dups.png (one row of thumbnails per group) into "
                                    "--out. Each image's neighbours are searched exactly, at most -k of them.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pd.add_argument("folder", metavar="FOLDER", help="folder of images")
    pd.add_argument("--out", required=True, metavar="DIR", help="folder for dups.json, dups.csv and dups.png")
    pd.add_argument("--index", default=None, metavar="X.idx",
                    help="index to reuse and update incrementally (default: embed in memory, write no index)")
    pd.add_argument("--model", default=None, metavar="M",
                    help="encoder file (default: the index's, else the packaged default image model)")
    pd.add_argument("--threshold", type=float, default=dups.DEFAULT_THRESHOLD, metavar="T",
                    help=_threshold_help())
    pd.add_argument("-k", type=int, default=dups.DEFAULT_K,
                    help="neighbours searched per image (default: %(default)s); a group can still be larger, "
                         "through chains of neighbours")
    pd.add_argument("--batch-size", type=int, default=32, help="images per network call (default: 32)")
    pd.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be a positive int, got {args.batch_size}")
        if args.command == "index":
            build_index(args.folder, model=args.model, index=args.index, batch_size=args.batch_size,
                        progress=not args.no_progress, log=_log, storage=args.storage)
            return 0
        if args.command == "dups":
            run_dups(args.folder, out=args.out, index=args.index, model=args.model, threshold=args.threshold,
                     k=args.k, batch_size=args.batch_size, progress=not args.no_progress, log=_log)
            return 0
        if args.k < 1:
            raise InputError(f"-k must be a positive int, got {args.k}")
        if args.out:
            check_output(args.out, "results picture")
        res = run_query(args.images, index=args.index, model=args.model, k=args.k, batch_size=args.batch_size,
                        log=lambda *a, **kw: _log(*a, file=sys.stderr), mmap=args.mmap, rerank=args.rerank)
        print(results_json(res) if args.json else format_results(res))
        if args.out:
            written = results_picture(res, args.out)
            if not args.json:
                print(f"wrote {printable(written)}")
        return 0
    except LookalikeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up, a file vanished mid-run ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
