"""Near-duplicate groups among indexed images (``python -m engine.search dups FOLDER``).

    groups = find_groups(searcher, ids, threshold=DEFAULT_THRESHOLD, k=DEFAULT_K)   # [[id, ...], ...]

Two images are near-duplicates when the cosine similarity of their embeddings is at least ``threshold``; the
groups are the connected components of that relation (a chain a~b~c puts a and c in one group even when
a and c score below the threshold). Each image's neighbours come from an exact search (``Searcher.search``)
limited to its ``k`` best (``DEFAULT_K``, at most ``MAX_K``): a group can be larger than ``k + 1`` through
chains, but an image with more than ``k`` near-duplicates may miss pairs beyond its k-th (they join the group
through the others whenever any of them lists it). Members are ordered by path (then id); a group's "first
member" is its first, and each member's score is its cosine similarity to that first member.

``DEFAULT_THRESHOLD`` is a cosine similarity of the packaged default image model's embeddings
(``engine.default_models.default_model("image")``), chosen on ``benchmarks/dups_threshold.py``: real photos
against real edits of themselves (crops to 60-80 %, resizes to 1/2 and 1/3, JPEG quality 30, rotations by 5
degrees, brightness +30 %, mirror flips, all counted as duplicates) and against every other photo; it is the
threshold of the highest recall of duplicate pairs at a precision of at least 0.99. Measured on the packaged
la model (dim 128), 179 photos x 9 versions, 1,432 duplicate pairs against 1,286,604 different-photo pairs:
0.9994 gives precision 1.000 and recall 0.362 (JPEG q30 0.955, 1/2 size 0.754, 1/3 size 0.682, 5-degree
rotation 0.402, crops, brightness and flips under 0.04); in the same run a 32 x 32 grey-thumbnail cosine
reaches recall 0.541 at precision 0.996. Different photos score up to 0.9994 under this model, so a lower
threshold finds more edits only with many false pairs (0.99: recall 0.58, precision 0.56). Another model's
scores are on another scale: measure its threshold with that script (``--model``).

Imports only the standard library at module level (the command line's ``--help`` reads the defaults here).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from engine.errors import InputError

DEFAULT_THRESHOLD = 0.9994  # benchmarks/dups_threshold.py on the default image model (la, dim 128); see above
DEFAULT_K = 32  # neighbours searched per image
MAX_K = 1024  # the most neighbours searched per image (bounds the search's answer: n x (k + 1) scores)
QUERY_BLOCK = 1024  # images searched at a time (bounds memory: QUERY_BLOCK x (k + 1) scores and ids)
PICTURE_GROUPS = 40  # groups drawn in dups.png (the largest first); the JSON and CSV list them all
PICTURE_COLUMNS = 8  # members drawn per group row


def check_options(threshold, k) -> None:
    """InputError unless ``threshold`` is a finite number in [-1, 1] and ``k`` an int in 1..MAX_K."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not -1.0 <= threshold <= 1.0:
        raise InputError(f"the threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InputError(f"k must be an int in 1..{MAX_K} (neighbours searched per image), got {k!r}")


def find_groups(searcher, ids, *, threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K) -> list[list[int]]:
    """Groups (lists of ids, two or more each) of near-duplicates among ``ids`` of a cosine ``searcher``: the
    connected components of the pairs scoring at least ``threshold`` among each image's ``k`` best neighbours.
    Members are ordered by meta (path), then id; groups by size (largest first), then first member."""
    import numpy as np

    from engine.searcher import Searcher

    check_options(threshold, k)
    if searcher.metric != "cosine":
        raise InputError(f"near-duplicates are found by cosine similarity; this index's metric is {searcher.metric}")
    ids = np.asarray(sorted({int(i) for i in ids}), dtype=np.int64)
    n = len(ids)
    if n < 2:
        return []
    sub = Searcher(searcher.dim)
    sub.add(searcher.get(ids), ids=np.arange(n))  # rows 0..n-1 of these images only (others in the index ignored)
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    vectors = sub.get(np.arange(n))
    kk = min(k + 1, n)  # +1: each image finds itself
    for s in range(0, n, QUERY_BLOCK):
        scores, nb = sub.search(vectors[s : s + QUERY_BLOCK], kk)
        rows, cols = np.nonzero((scores >= threshold) & (nb >= 0))
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = find(s + r), find(int(nb[r, c]))
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = np.array([find(i) for i in range(n)])
    meta = searcher.meta(ids)
    order = {int(i): (m if m is not None else "", int(i)) for i, m in zip(ids.tolist(), meta)}
    groups = {}
    for i, r in enumerate(roots.tolist()):
        groups.setdefault(r, []).append(int(ids[i]))
    out = [sorted(g, key=order.__getitem__) for g in groups.values() if len(g) > 1]
    out.sort(key=lambda g: (-len(g), order[g[0]]))
    return out


def report(groups, searcher, *, threshold: float, k: int, folder=None, model=None) -> dict:
    """The JSON-ready report of ``groups``: each member's id, path (meta) and cosine score to the first member."""
    import numpy as np

    out = {"threshold": threshold, "k": k, "folder": folder, "model": model, "metric": "cosine similarity",
           "groups": []}
    for g_id, g in enumerate(groups, 1):
        v = searcher.get(g)
        scores = (v[1:].astype(np.float64) @ v[0].astype(np.float64)).tolist()
        members = [{"id": int(i), "path": _text(m), "score": 1.0 if j == 0 else round(scores[j - 1], 6)}
                   for j, (i, m) in enumerate(zip(g, searcher.meta(g)))]
        out["groups"].append({"group": g_id, "size": len(g), "members": members})
    return out


def _text(m):
    from engine.search_cli import printable

    return None if m is None else printable(m)


def write_outputs(rep: dict, out) -> list[Path]:
    """dups.json, dups.csv and dups.png in the folder ``out`` (each written atomically); returns their paths."""
    from engine.fileio import atomic_write

    out = Path(out)
    atomic_write(out / "dups.json", (json.dumps(rep, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "path", "score"])
    for g in rep["groups"]:
        for m in g["members"]:
            w.writerow([g["group"], m["path"] if m["path"] is not None else f"id {m['id']}", f"{m['score']:.6f}"])
    atomic_write(out / "dups.csv", buf.getvalue().encode("utf-8"))
    picture(rep, out / "dups.png")
    return [out / "dups.json", out / "dups.csv", out / "dups.png"]


def picture(rep: dict, path) -> Path:
    """One row per group (the first ``PICTURE_GROUPS``), its members' thumbnails (the first ``PICTURE_COLUMNS``)
    titled with their score to the first member and file name."""
    import numpy as np
    from matplotlib.figure import Figure

    from engine.search_cli import draw_cells, meta_path, printable, save_figure

    groups = rep["groups"][:PICTURE_GROUPS]
    if not groups:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, f"no near-duplicates at cosine >= {rep['threshold']:g}", ha="center", va="center")
        return save_figure(fig, path)
    cols = min(PICTURE_COLUMNS, max(g["size"] for g in groups))
    fig = Figure(figsize=(2.0 * cols, 2.3 * len(groups)))
    axes = np.atleast_2d(fig.subplots(len(groups), cols, squeeze=False))
    for r, g in enumerate(groups):
        cells = []
        for j, m in enumerate(g["members"][:cols]):
            name = printable(Path(m["path"]).name) if m["path"] is not None else f"id {m['id']}"
            head = f"group {g['group']} ({g['size']})" if j == 0 else f"{m['score']:.3f}"
            cells.append((meta_path(m["path"]) if m["path"] is not None else False, f"{head}\n{name}",
                          "tab:blue" if j == 0 else "black"))
        cells += [(None, "", "black")] * (cols - len(cells))
        draw_cells(axes[r], cells)
    more = len(rep["groups"]) - len(groups)
    fig.suptitle(f"lookalike: near-duplicates at cosine >= {rep['threshold']:g} ({printable(rep['model'] or '')})"
                 + (f"; {more} more groups in dups.csv" if more > 0 else ""), fontsize=9, parse_math=False)
    return save_figure(fig, path)
