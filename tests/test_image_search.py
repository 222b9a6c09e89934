"""Image search: Searcher's image methods with the real Encoder, and `python -m engine.search` end to end.

Oracle: Encoder.encode + a brute-force numpy top-k over the same real photos.
"""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import Encoder, Searcher
from engine.errors import ModelError
from engine.search import main as search_main
from engine.search import IMAGE_EXTS, sidecar_path
from trained_models import ModelCache


@pytest.fixture(scope="session")
def cache(request) -> ModelCache:
    return ModelCache(request.config.cache.mkdir("lookalike-tiny-models"))


@pytest.fixture(scope="module")
def model(cache) -> Path:
    return cache.onnx("mpnn")


@pytest.fixture(scope="module")
def photos() -> list[str]:
    """21 real photo files: the shared fungi photos when present, else the embedded photographs."""
    from export.verify import shared_data_dir
    from train.data import photo_files

    fungi = shared_data_dir() / "fungi-sample" / "images"
    files = sorted(fungi.glob("*.jpg"))[::7] if fungi.is_dir() else photo_files()
    return [str(p) for p in files[:21]]


def brute_force(queries: np.ndarray, base: np.ndarray, k: int):
    """(scores, ids) by explicit cosine over every stored row; ties broken by the lower id."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    s = q.astype(np.float64) @ b.astype(np.float64).T
    ids = np.array([sorted(range(len(b)), key=lambda j: (-row[j], j))[:k] for row in s])
    return np.take_along_axis(s, ids, axis=1), ids


# -- Searcher's image methods ---------------------------------------------------------------------------------

def test_image_methods_agree_with_encode_and_vector_search(model, photos):
    enc = Encoder(model, batch_size=5)
    base, queries = photos[:17], photos[17:] + photos[3:4]
    s = Searcher.from_model(model, batch_size=5)
    assert s.dim == enc.dim
    ids = s.add_images(base)
    np.testing.assert_array_equal(ids, np.arange(len(base)))
    emb = enc.encode(base)
    np.testing.assert_allclose(s.get(ids), emb, atol=1e-6)

    scores, got = s.search_images(queries, k=6)
    v = Searcher(enc.dim)
    v.add(emb)
    v_scores, v_ids = v.search(enc.encode(queries), k=6)
    np.testing.assert_array_equal(got, v_ids)
    np.testing.assert_allclose(scores, v_scores, atol=1e-6)
    ref_scores, ref_ids = brute_force(enc.encode(queries), emb, 6)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # ids may swap only where scores tie within float32 rounding
    swapped = got != ref_ids
    assert np.all(np.abs(ref_scores[swapped] - scores[swapped]) < 1e-5)
    # a photo that is in the index finds itself first
    assert got[-1, 0] == 3 and scores[-1, 0] == pytest.approx(1.0, abs=1e-5)
    # arrays work as well as paths
    from engine.preprocess import read_image

    s2, i2 = s.search_images([read_image(p) for p in queries], k=6)
    np.testing.assert_array_equal(i2, got)


def test_save_records_identity_and_load_checks_it(model, photos, tmp_path, cache):
    s = Searcher.from_model(model)
    s.add_images(photos[:8])
    path = tmp_path / "photos.idx"
    s.save(path)
    header = json.loads(path.read_bytes().split(b"\n", 1)[0].split(b" ", 1)[1])
    enc = Encoder(model)
    assert header["model"] == enc.identity
    assert header["model"]["model"] == "mpnn" and header["model"]["dim"] == enc.dim

    loaded = Searcher.load(path, encoder=enc)
    np.testing.assert_array_equal(loaded.search_images(photos[8:10], k=3)[1], s.search_images(photos[8:10], k=3)[1])

    # another model is refused: another architecture, and the same network in float16 (another file)
    with pytest.raises(ModelError, match="siamese"):
        Searcher.load(path, encoder=Encoder(cache.onnx("siamese")))
    from export import verify
    from export.onnx import export_run

    export_run(cache.run("mpnn"), tmp_path / "m", images=verify.real_images(24)[0], variants=("fp16",),
               allow_incomplete=True, log=lambda *_: None)
    fp16 = Encoder(tmp_path / "m" / "mpnn.fp16.onnx")
    assert fp16.name == "mpnn" and fp16.dim == enc.dim
    with pytest.raises(ModelError, match="float16"):
        Searcher.load(path, encoder=fp16)


def parse_results(text: str, queries) -> dict:
    """The printed results: {query: [(rank, score, id, path), ...]}."""
    import re

    out, cur = {}, None
    for line in text.splitlines():
        if line in queries:
            cur = out.setdefault(line, [])
            continue
        m = re.match(r"^\s*(\d+)\.\s+(-?[\d.]+)\s+\[(\d+)\]\s+(.+)$", line)
        if m and cur is not None:
            cur.append((int(m[1]), float(m[2]), int(m[3]), m[4]))
    return out


# -- python -m engine.search ------------------------------------------------------------------------------

@pytest.fixture()
def folder(photos, tmp_path) -> Path:
    """A folder of real photos, one sub-folder, an unreadable .jpg and a non-image file."""
    root = tmp_path / "pictures"
    (root / "sub").mkdir(parents=True)
    for i, p in enumerate(photos[:16]):
        shutil.copy(p, (root / "sub" if i % 3 == 0 else root) / Path(p).name)
    (root / "broken.jpg").write_bytes(b"not an image")
    depth = np.random.default_rng(0).random((24, 32)).astype(np.float32)  # a float TIFF (e.g. a depth map)
    assert cv2.imwrite(str(root / "depth.tiff"), depth)
    (root / "notes.txt").write_text("ignored")
    return root


def test_cli_index_and_query(model, folder, photos, tmp_path, capsys):
    index = tmp_path / "out" / "pictures.idx"
    assert search_main(["index", str(folder), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err and "float32 pixels" in captured.err
    side = json.loads(sidecar_path(index).read_text())
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and p.name not in ("broken.jpg", "depth.tiff"))
    assert side["paths"] == files and side["count"] == 16 and side["skipped"] == ["broken.jpg", "depth.tiff"]
    assert side["identity"] == Encoder(model).identity

    queries = [photos[3], photos[20]]  # the first is indexed (in sub/), the second is not
    out = tmp_path / "results.png"
    rc = search_main(["query", *queries, "--index", str(index), "-k", "3", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    # oracle: encode everything, brute-force top-3
    enc = Encoder(model)
    ref_scores, ref_ids = brute_force(enc.encode(queries), enc.encode([folder / f for f in files]), 3)
    printed = parse_results(text, queries)
    for q, srow, irow in zip(queries, ref_scores, ref_ids):
        rows = printed[q]
        assert [r[0] for r in rows] == [1, 2, 3]
        np.testing.assert_allclose([r[1] for r in rows], srow, atol=1e-4)
        for (_, score, i, path), ref_i in zip(rows, irow):
            assert path == files[i]
            assert i == ref_i or abs(score - srow[list(irow).index(ref_i)]) < 1e-4  # equal scores may swap
    assert printed[queries[0]][0][3] == f"sub/{Path(photos[3]).name}"  # an indexed photo finds itself
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 200 and img.shape[1] > 4 * 150  # 2 rows, 1 + 3 columns

    # without --model: the model recorded at indexing
    assert search_main(["query", photos[20], "--index", str(index), "-k", "2"]) == 0
    assert capsys.readouterr().out.count("\n") == 3


def test_cli_errors(model, folder, tmp_path, capsys, cache):
    index = tmp_path / "p.idx"
    assert search_main(["index", str(folder), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    capsys.readouterr()
    assert search_main(["query", str(folder / "broken.jpg"), "--index", str(index)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert search_main(["query", str(next(folder.glob("*.jpg"))), "--index", str(index),
                        "--model", str(cache.onnx("siamese"))]) == 2
    assert "siamese" in capsys.readouterr().err
    assert search_main(["query", str(next(folder.glob("*.jpg"))), "--index", str(tmp_path / "none.idx")]) == 2
    assert "index file not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert search_main(["index", str(tmp_path / "empty"), "--model", str(model), "--index", str(index)]) == 2
    assert "no images found" in capsys.readouterr().err
    # an output that cannot be written is refused before any image is embedded, and the index stays whole
    (tmp_path / "afile").write_text("a file, not a folder")
    before = index.read_bytes()
    assert search_main(["index", str(folder), "--model", str(model), "--index", str(tmp_path / "afile" / "x.idx")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the index to {tmp_path / 'afile' / 'x.idx'}: {tmp_path / 'afile'} exists and is not a " \
        "folder" in err
    assert "img/s" not in err and "index (" not in err  # no progress bar: nothing was embedded
    assert search_main(["index", str(folder), "--model", str(model), "--index", str(tmp_path)]) == 2
    assert f"cannot write the index to {tmp_path}: it is a folder" in capsys.readouterr().err
    assert search_main(["query", str(next(folder.glob("*.jpg"))), "--index", str(index), "--out",
                        str(tmp_path / "afile" / "r.png")]) == 2
    assert "cannot write the results picture to" in capsys.readouterr().err
    assert index.read_bytes() == before
    # a sidecar that does not belong to the index is refused
    Searcher(4).save(index)
    assert search_main(["query", str(next(folder.glob("*.jpg"))), "--index", str(index)]) == 2
    assert "does not belong" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        search_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "index" in text and "query" in text and "paths.json" in text
    with pytest.raises(SystemExit):
        search_main(["query", "--help"])
    text = capsys.readouterr().out
    for opt in ("--index", "--model", "-k", "--out"):
        assert opt in text
