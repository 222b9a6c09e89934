"""engine.dups and `python -m engine.search dups`: near-duplicate groups on real photos with real edits.

Oracles: the groups known by construction (each edited copy belongs with its original), and a brute-force
numpy grouping (every pair's cosine, connected components by breadth-first search) over the same embeddings.
"""

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from trained_models import ModelCache

from engine import Encoder, Searcher
from engine.dups import find_groups
from engine.search_cli import main as search_main

THRESHOLD = 0.99  # the tiny test model's scale: edits below score >= 0.993 there, different photos <= 0.98


@pytest.fixture(scope="module")
def model(request) -> Path:
    return ModelCache(request.config.cache.mkdir("lookalike-tiny-models")).onnx("mpnn")


def _rgb(path):
    from engine.preprocess import read_image

    return read_image(path)


def _save(path: Path, rgb: np.ndarray, *params) -> None:
    assert cv2.imwrite(str(path), rgb[:, :, ::-1].copy(), list(params))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[set[str]]]:
    """Real photos of 7 different species, and real edits of 3 of them; returns the folder and the true groups
    (file names)."""
    from export.verify import shared_data_dir
    from train.data import photo_files

    fungi = shared_data_dir() / "fungi-sample" / "images"
    if fungi.is_dir():
        by_species = {}
        for p in sorted(fungi.glob("*.jpg")):
            by_species.setdefault(p.stem.rsplit("_", 1)[0], p)
        sources = list(by_species.values())[:7]
    else:
        sources = [p for p in photo_files() if p.stem not in ("motorcycle_left", "motorcycle_right")][:7]
    root = tmp_path_factory.mktemp("dups") / "pictures"
    (root / "edits").mkdir(parents=True)
    names = []
    for i, p in enumerate(sources):
        name = f"{'abcdefg'[i]}-{p.stem}{p.suffix}"
        shutil.copy(p, root / name)
        names.append(name)
    a, b, c = (_rgb(root / n) for n in names[:3])
    shutil.copy(root / names[0], root / "edits" / "a-copy.jpg")  # the same bytes
    h, w = a.shape[:2]
    _save(root / "edits" / "a-half.png", cv2.resize(a, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    _save(root / "edits" / "a-q30.jpg", a, cv2.IMWRITE_JPEG_QUALITY, 30)
    h, w = b.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 5.0, 1.0)
    _save(root / "edits" / "b-rot5.png", cv2.warpAffine(b, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))
    _save(root / "edits" / "b-bright.png", np.clip(b.astype(np.float32) * 1.3, 0, 255).astype(np.uint8))
    h, w = c.shape[:2]
    _save(root / "edits" / "c-third.png", cv2.resize(c, (w // 3, h // 3), interpolation=cv2.INTER_AREA))
    truth = [{names[0], "edits/a-copy.jpg", "edits/a-half.png", "edits/a-q30.jpg"},
             {names[1], "edits/b-bright.png", "edits/b-rot5.png"}, {names[2], "edits/c-third.png"}]
    return root, truth


def oracle_groups(emb: np.ndarray, threshold: float) -> list[set[int]]:
    """Connected components (two or more members) of the pairs whose float64 cosine is >= threshold."""
    e = emb.astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    adj = (e @ e.T) >= threshold
    seen, out = set(), []
    for s in range(len(e)):
        if s in seen:
            continue
        comp, todo = {s}, [s]
        while todo:
            i = todo.pop()
            for j in np.flatnonzero(adj[i]).tolist():
                if j not in comp:
                    comp.add(j)
                    todo.append(j)
        seen |= comp
        if len(comp) > 1:
            out.append(comp)
    return out


def rel(path: str, root: Path) -> str:
    return Path(path).relative_to(root.resolve()).as_posix()


def test_dups_finds_the_edited_copies(model, folder, tmp_path, capsys):
    root, truth = folder
    out = tmp_path / "out"
    assert search_main(["dups", str(root), "--out", str(out), "--model", str(model), "--threshold", str(THRESHOLD),
                        "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"3 groups of near-duplicates (9 images) among 13 at cosine >= {THRESHOLD:g}" in text
    rep = json.loads((out / "dups.json").read_text())
    got = [{rel(m["path"], root) for m in g["members"]} for g in rep["groups"]]
    assert sorted(map(sorted, got)) == sorted(map(sorted, truth))
    assert [g["size"] for g in rep["groups"]] == [4, 3, 2]  # largest first
    # scores to each group's first member (its first path), against the encoder's embeddings
    enc = Encoder(model)
    for g in rep["groups"]:
        paths = [m["path"] for m in g["members"]]
        assert paths == sorted(paths)
        e = enc.encode(paths).astype(np.float64)
        want = e @ e[0]
        np.testing.assert_allclose([m["score"] for m in g["members"]], want, atol=1e-5)
        assert min(want) >= THRESHOLD - 1e-5 or len(paths) > 2  # a pair scores above the threshold itself
    with open(out / "dups.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["group", "path", "score"]
    assert [(int(r[0]), r[1]) for r in rows[1:]] == [(g["group"], m["path"]) for g in rep["groups"]
                                                     for m in g["members"]]
    img = cv2.imread(str(out / "dups.png"))
    assert img is not None and img.shape[:2] == (3 * 230, 4 * 200)  # a row per group, 4 thumbnails at most


def test_dups_reuses_an_index_incrementally(model, folder, tmp_path, capsys):
    root, _ = folder
    index = tmp_path / "p.idx"
    args = ["dups", str(root), "--out", str(tmp_path / "o"), "--index", str(index), "--model", str(model),
            "--threshold", str(THRESHOLD), "--no-progress"]
    assert search_main(args) == 0
    assert "13 added" in capsys.readouterr().out
    first = (tmp_path / "o" / "dups.json").read_text()
    args[args.index("--model") : args.index("--model") + 2] = []  # the index's recorded model
    assert search_main(args) == 0
    assert "0 added, 0 updated, 0 removed, 13 unchanged" in capsys.readouterr().out
    assert (tmp_path / "o" / "dups.json").read_text() == first


@pytest.mark.parametrize("quantile", [0.5, 0.9, 0.97, 0.995])
def test_groups_equal_the_brute_force_components(model, folder, quantile):
    root, _ = folder
    files = sorted(p for p in root.rglob("*") if p.is_file())
    emb = Encoder(model).encode(files)
    s = Searcher(emb.shape[1])
    ids = s.add(emb, ids=np.arange(100, 100 + len(files)), meta=[str(f) for f in files])
    e = emb.astype(np.float64)
    pair_scores = (e @ e.T)[np.triu_indices(len(files), 1)]
    # a threshold in a gap between pair scores wider than float32 rounding, so the searcher's float32 scores and
    # the oracle's float64 ones fall on the same side of it
    ps = np.sort(pair_scores)
    i = int(quantile * (len(ps) - 1))
    i = min(i, len(ps) - 2)
    while ps[i + 1] - ps[i] < 1e-4:  # the nearest wide gap at or below the quantile
        i -= 1
    t = float(ps[i] + ps[i + 1]) / 2
    want = {frozenset(100 + i for i in g) for g in oracle_groups(emb, t)}
    assert want  # something to group at every quantile
    got = find_groups(s, ids, threshold=t, k=len(files))  # k covers every neighbour: exact
    assert {frozenset(g) for g in got} == want
    assert all(g == sorted(g, key=lambda i: str(files[i - 100])) for g in got)
    # a small k keeps each group inside one of the exact groups (it can only miss pairs)
    small = find_groups(s, ids, threshold=t, k=2)
    assert all(any(set(g) <= w for w in want) for g in small)


def test_dups_refuses_bad_options(model, folder, tmp_path, capsys):
    root, _ = folder
    for extra, message in ((["--threshold", "1.5"], "the threshold must be a cosine similarity in [-1, 1], got 1.5"),
                           (["--threshold", "nan"], "the threshold must be a cosine similarity in [-1, 1], got nan"),
                           (["-k", "0"], "k must be an int in 1..1024")):
        assert search_main(["dups", str(root), "--out", str(tmp_path / "o"), "--model", str(model), *extra]) == 2
        err = capsys.readouterr().err
        assert f"error: {message}" in err and "Traceback" not in err
    (tmp_path / "afile").write_text("x")
    assert search_main(["dups", str(root), "--out", str(tmp_path / "afile"), "--model", str(model)]) == 2
    assert "--out must be a folder" in capsys.readouterr().err


def test_dups_with_the_default_model_and_threshold(folder, tmp_path, capsys):
    """No --model, no --threshold: the packaged image model at DEFAULT_THRESHOLD finds byte copies and a lossless
    re-encoding of the same pixels (cosine 1 up to rounding), and says which model it used."""
    from conftest import need

    from engine.default_models import FILES, FOLDER
    from engine.dups import DEFAULT_THRESHOLD

    need(FOLDER / FILES["image"])
    src, _ = folder
    root = tmp_path / "pictures"
    root.mkdir()
    names = sorted(p.name for p in src.iterdir() if p.is_file())[:4]
    for n in names:
        shutil.copy(src / n, root / n)
    shutil.copy(src / names[0], root / "z-copy.jpg")
    _save(root / "z-same-pixels.png", _rgb(src / names[1]))
    assert search_main(["dups", str(root), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model: the default image model" in out and f"cosine >= {DEFAULT_THRESHOLD:g}" in out
    rep = json.loads((tmp_path / "o" / "dups.json").read_text())
    assert rep["threshold"] == DEFAULT_THRESHOLD and rep["model"] == "la"
    got = sorted(sorted(rel(m["path"], root) for m in g["members"]) for g in rep["groups"])
    assert got == sorted([sorted([names[0], "z-copy.jpg"]), sorted([names[1], "z-same-pixels.png"])])
