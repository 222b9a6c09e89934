"""python -m engine.search: index a folder of images with an exported encoder, then query it.

The command line (``main``) and its steps; ``engine/search.py`` only runs it for ``python -m engine.search``,
and the class that does the searching is ``engine.searcher.Searcher``.

    python -m engine.search index ~/Pictures --model models/la.onnx --index pictures.idx
    python -m engine.search query a.jpg b.jpg --index pictures.idx -k 5 --out results.png

``index`` embeds every image under FOLDER (recursive; .jpg .jpeg .png .bmp .webp .tif .tiff; symbolic links
followed, each folder read and each file listed once, so link loops end) and writes the index
(``Searcher.save``: ids are row numbers 0..n-1) and, beside it, ``<index>.paths.json``: the image paths
(relative to FOLDER), FOLDER, the model file and its identity, and the index's checksum, so a query can name
its results. Files that cannot be decoded, or are too large to (``engine.preprocess.read_image``), are skipped
with a warning and listed in the sidecar.

``query`` embeds each query image with the index's model (``--model``, or the one recorded at indexing; a
different model is refused), prints its top-k results with their cosine scores (k at most the number of
indexed images), and with ``--out`` writes a PNG with one row per query: the query, then its results with
rank, score and file name. A sidecar that is damaged (a field of the wrong type, a path leaving FOLDER) or
does not match its index's ids is refused. File names that are not valid UTF-8 are shown with ``\\xNN``
escapes.
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

import numpy as np

from engine.errors import ImageReadError, IndexFileError, InputError, LookalikeError, ModelError
from engine.fileio import atomic_write, unwritable
from engine.validate import is_int

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SIDECAR_SUFFIX = ".paths.json"
SIDECAR_VERSION = 1
CHUNK = 256  # images handed to the searcher at a time while indexing
THUMB = 256  # longest side of the pictures in the results PNG

EPILOG = """\
examples:
  python -m engine.search index ~/Pictures --model models/la.onnx --index pictures.idx
  python -m engine.search query query.jpg --index pictures.idx -k 5 --out results.png
  python -m engine.search query a.jpg b.png --index pictures.idx --model models/la.onnx

The index file holds the embeddings (and the model's identity); <index>.paths.json beside it holds the
image paths, so keep the two together. Scores are cosine similarities (1 = same direction).
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


def check_output(path, what: str) -> None:
    """Refuse (InputError) an output file ``path`` that cannot be written: a folder there, or a folder for it
    that cannot be made or written (``engine.fileio.unwritable``). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write the {what} to {path}: it is a folder; give a file name")
    why = unwritable(path.parent)
    if why:
        raise InputError(f"cannot write the {what} to {path}: {why}")


# -- index ------------------------------------------------------------------------------------------------

def build_index(folder, *, model, index, batch_size: int = 32, progress: bool = True, log=print) -> dict:
    """Embed every image under ``folder`` and write ``index`` plus its sidecar; returns the sidecar dict."""
    from engine.encoder import Encoder
    from engine.preprocess import read_image
    from engine.searcher import Searcher

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"expected a folder of images, got {folder} "
                         f"({'not a folder' if folder.exists() else 'nothing there'})")
    files = list_images(folder)
    if not files:
        raise InputError(f"no images found under {folder} (looked for {', '.join(IMAGE_EXTS)}, recursively)")
    check_output(index, "index")  # before the embedding, not after it
    encoder = Encoder(model, batch_size=batch_size)
    searcher = Searcher(encoder=encoder)
    floor = encoder.preprocess.min_decode_size()  # read_image decodes a huge JPEG no larger than the encoder needs
    kept, skipped = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc=f"index ({encoder.name})", unit="img", dynamic_ncols=True)
    try:
        for s in range(0, len(files), CHUNK):
            chunk = files[s : s + CHUNK]
            try:
                searcher.add_images([str(p) for p in chunk])
                kept += chunk
            except ImageReadError:  # rare: find the culprits (decoding one at a time), embed the rest
                good = []
                for p in chunk:
                    try:
                        read_image(p, min_size=floor)
                        good.append(p)
                    except ImageReadError as e:
                        skipped.append(str(p.relative_to(folder).as_posix()))
                        print(f"warning: skipped {printable(p)}: {printable(e)}", file=sys.stderr)
                if good:
                    searcher.add_images([str(p) for p in good])
                kept += good
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if not kept:
        raise InputError(f"none of the {len(files)} image files under {folder} could be read")
    if not np.array_equal(searcher.ids, np.arange(len(kept))):
        raise IndexFileError("the searcher did not number the images 0..n-1 in order; cannot name the results")
    index = Path(index)
    searcher.save(index)
    side = {
        "format_version": SIDECAR_VERSION,
        "index_sha256": index_digest(index),
        "root": str(folder.resolve()),
        "model": str(Path(model).resolve()),
        "identity": encoder.identity,
        "count": len(kept),
        "paths": [p.relative_to(folder).as_posix() for p in kept],
        "skipped": skipped,
    }
    atomic_write(sidecar_path(index), (json.dumps(side, indent=1) + "\n").encode())
    log(f"indexed {len(kept)} images from {printable(folder)} with {encoder.name} (dim {encoder.dim}) -> "
        f"{printable(index)} (+ {printable(sidecar_path(index).name)})"
        + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
    return side


# -- query ------------------------------------------------------------------------------------------------

def load_sidecar(index) -> dict:
    """The paths sidecar of ``index``, checked: IndexFileError naming the file and the problem otherwise."""
    path = sidecar_path(index)
    if not Path(index).is_file():
        raise IndexFileError(f"index file not found: {index}")
    if not path.is_file():
        raise IndexFileError(f"{index} has no paths sidecar {path.name} beside it; index the folder with "
                             f"`python -m engine.search index FOLDER --model M --index {index}`")
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
    if not is_int(count):
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


def run_query(images, *, index, model=None, k: int = 5, batch_size: int = 32) -> dict:
    """Search ``images`` in ``index``; returns {"queries", "scores" (nq, k), "ids" (nq, k), "paths", "root"}."""
    from engine.encoder import Encoder
    from engine.searcher import Searcher

    side = load_sidecar(index)
    model = model or side["model"]
    if not Path(model).is_file():
        raise ModelError(f"the model {model} recorded for {index} is not there; give it with --model")
    encoder = Encoder(model, batch_size=batch_size)
    searcher = Searcher.load(index, encoder=encoder)
    if len(searcher) != side["count"]:
        raise IndexFileError(f"{index} holds {len(searcher)} vectors but its sidecar lists {side['count']} paths")
    stored = searcher.ids
    outside = stored[(stored < 0) | (stored >= len(side["paths"]))]
    if outside.size:
        raise IndexFileError(f"{index} holds ids {outside[:5].tolist()}{' ...' if outside.size > 5 else ''} but its "
                             f"sidecar names images 0..{len(side['paths']) - 1} only; index the folder again")
    # never more than the index holds: nothing below (the search, the table, the picture) grows with k
    scores, ids = searcher.search_images([str(p) for p in images], min(k, max(1, len(searcher))))
    return {"queries": [str(p) for p in images], "scores": scores, "ids": ids, "paths": side["paths"],
            "root": side["root"], "model": encoder.name}


def format_results(res: dict) -> str:
    lines = []
    for q, srow, irow in zip(res["queries"], res["scores"], res["ids"]):
        lines.append(printable(q))
        for rank, (s, i) in enumerate(zip(srow, irow), 1):
            if i < 0:
                lines.append(f"  {rank:>2}. (no more images in the index)")
                break
            lines.append(f"  {rank:>2}. {s:.4f}  [{i}] {printable(res['paths'][i])}")
    return "\n".join(lines)


def _thumb(path) -> np.ndarray | None:
    import cv2

    from engine.preprocess import read_image

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
    from matplotlib.figure import Figure

    nq, k = res["ids"].shape
    fig = Figure(figsize=(2.0 * (k + 1), 2.3 * nq))
    axes = np.atleast_2d(fig.subplots(nq, k + 1, squeeze=False))
    root = Path(res["root"])
    for r in range(nq):
        cells = [(res["queries"][r], f"query\n{printable(Path(res['queries'][r]).name)}", "tab:blue")]
        for c in range(k):
            i = int(res["ids"][r, c])
            if i < 0:
                cells.append((None, "", "black"))
            else:
                rel = res["paths"][i]
                cells.append((root / rel, f"#{c + 1}  {res['scores'][r, c]:.3f}\n{printable(Path(rel).name)}",
                              "black"))
        for c, (path, title, colour) in enumerate(cells):
            ax = axes[r][c]
            ax.set_axis_off()
            if path is None:
                continue
            img = _thumb(path)
            if img is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(img)
            ax.set_title(_short(title), fontsize=7, color=colour, parse_math=False)  # a '$' in a name is text
    fig.suptitle(f"lookalike: top-{k} by cosine similarity ({printable(res['model'])})", fontsize=9,
                 parse_math=False)
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


# -- command line -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.search",
                                description="Index a folder of images with an exported encoder, then find the "
                                            "images most similar to query images.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{index,query}")
    pi = sub.add_parser("index", help="embed every image under a folder and write an index",
                        description="Embed every image under FOLDER (recursive) and write the index and its "
                                    "<index>.paths.json sidecar. Unreadable files are skipped with a warning.")
    pi.add_argument("folder", metavar="FOLDER", help="folder of images (.jpg .jpeg .png .bmp .webp .tif .tiff)")
    pi.add_argument("--model", required=True, metavar="M", help="exported encoder, e.g. models/la.onnx")
    pi.add_argument("--index", required=True, metavar="OUT.idx", help="index file to write")
    pi.add_argument("--batch-size", type=int, default=32, help="images per network call (default: 32)")
    pi.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pq = sub.add_parser("query", help="find the indexed images most similar to query images",
                        description="Print the top-k indexed images for each query image (cosine score, id, "
                                    "path) and optionally draw them into a PNG.")
    pq.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    pq.add_argument("--index", required=True, metavar="OUT.idx", help="index written by `index`")
    pq.add_argument("--model", default=None, metavar="M",
                    help="encoder file (default: the one recorded at indexing; another model is refused)")
    pq.add_argument("-k", type=int, default=5,
                    help="results per query (default: 5; at most the number of indexed images)")
    pq.add_argument("--out", default=None, metavar="results.png",
                    help="write a PNG: each query beside its top-k results with their scores")
    pq.add_argument("--batch-size", type=int, default=32, help="images per network call (default: 32)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "index":
            build_index(args.folder, model=args.model, index=args.index, batch_size=args.batch_size,
                        progress=not args.no_progress)
            return 0
        if args.k < 1:
            raise InputError(f"-k must be a positive int, got {args.k}")
        if args.out:
            check_output(args.out, "results picture")
        res = run_query(args.images, index=args.index, model=args.model, k=args.k, batch_size=args.batch_size)
        print(format_results(res))
        if args.out:
            print(f"wrote {printable(results_picture(res, args.out))}")
        return 0
    except LookalikeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk filled up, a file vanished mid-run ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
