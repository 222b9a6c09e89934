"""Image search: Searcher's image methods with the real Encoder, and `python -m engine.search` end to end.

Oracle: Encoder.encode + a brute-force numpy top-k over the same real photos.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine import Encoder, Searcher
from engine.errors import ModelError
from engine.search_cli import main as search_main
from engine.search_cli import IMAGE_EXTS, sidecar_path
from trained_models import ModelCache

ROOT = Path(__file__).resolve().parents[1]


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


# -- damaged sidecars, symbolic-link loops, file names that are not UTF-8, a huge -k -------------------------

@pytest.fixture(scope="module")
def indexed(model, photos, tmp_path_factory):
    """A real index of 6 photos (ids 0..5) and its sidecar, written once; tests copy them."""
    root = tmp_path_factory.mktemp("indexed")
    (root / "pictures").mkdir()
    for p in photos[:6]:
        shutil.copy(p, root / "pictures" / Path(p).name)
    index = root / "p.idx"
    assert search_main(["index", str(root / "pictures"), "--model", str(model), "--index", str(index),
                        "--no-progress"]) == 0
    return index


def rewrite_index(src: Path, dst: Path, ids) -> str:
    """Copy the index ``src`` to ``dst`` with other ids, re-sealed as the file format says (sha256 of the
    header's other fields as canonical JSON, then the payload); returns the new digest."""
    import hashlib

    line, body = src.read_bytes().split(b"\n", 1)
    header = json.loads(line.split(b" ", 1)[1])
    header.pop("sha256")
    count = header["count"]
    header["next_id"] = max(header["next_id"], max(ids) + 1)  # keep the index itself valid (Searcher.load checks it)
    body = np.asarray(ids, "<i8").tobytes() + body[count * 8 :]
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + body).hexdigest()
    dst.write_bytes(b"LOOKALIKE-INDEX " + json.dumps({**header, "sha256": digest}, sort_keys=True).encode() + b"\n"
                    + body)
    return digest


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(model=["a.onnx"]), r"'model' must be a string, got list \['a\.onnx'\]"),
    (lambda s: s.update(root=None), r"'root' must be a string, got NoneType None"),
    (lambda s: s.pop("index_sha256"), r"'index_sha256' must be a string, got nothing"),
    (lambda s: s["paths"].__setitem__(2, 7), r"paths\[2\] must be a string, got int 7"),
    (lambda s: s["paths"].__setitem__(1, "../secret.jpg"), r"paths\[1\] = '\.\./secret\.jpg' is not a path inside"),
    (lambda s: s["paths"].__setitem__(4, "a/../../b.jpg"), r"paths\[4\] = 'a/\.\./\.\./b\.jpg' is not a path inside"),
    (lambda s: s["paths"].__setitem__(0, "/etc/hostname"), r"paths\[0\] = '/etc/hostname' is not a path inside"),
    (lambda s: s.update(count="6"), r"'count' must be an int, got str '6'"),
])
def test_a_damaged_sidecar_is_refused_naming_the_problem(indexed, photos, tmp_path, capsys, edit, message):
    index = tmp_path / indexed.name
    shutil.copy(indexed, index)
    side = json.loads(sidecar_path(indexed).read_text())
    edit(side)
    sidecar_path(index).write_text(json.dumps(side))
    assert search_main(["query", photos[0], "--index", str(index), "-k", "6"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"^error: {re.escape(str(sidecar_path(index)))}: damaged paths sidecar \\(.*{message}", err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("ids, message", [
    ([0, 1, 2, 3, 4, 9], "holds ids [9] but its sidecar names images 0..5 only"),
    ([0, 1, -3, 2, 3, 4], "damaged index: ids must be >= 0, found -3"),  # refused by Searcher.load before the sidecar is read
])
def test_an_index_with_ids_the_sidecar_does_not_name_is_refused(indexed, photos, tmp_path, capsys, ids, message):
    index = tmp_path / indexed.name
    digest = rewrite_index(indexed, index, ids)
    side = json.loads(sidecar_path(indexed).read_text())
    sidecar_path(index).write_text(json.dumps({**side, "index_sha256": digest}))
    assert search_main(["query", photos[0], "--index", str(index), "-k", "6"]) == 2
    err = capsys.readouterr().err
    assert f"error: {index}" in err and message in err, err
    # the same ids in another order name every image: accepted
    rewrite_index(indexed, index, [5, 4, 3, 2, 1, 0])
    side["index_sha256"] = rewrite_index(indexed, index, [5, 4, 3, 2, 1, 0])
    sidecar_path(index).write_text(json.dumps(side))
    assert search_main(["query", photos[0], "--index", str(index), "-k", "6"]) == 0
    assert len(parse_results(capsys.readouterr().out, [photos[0]])[photos[0]]) == 6


def linked_folder(photos, root: Path) -> tuple[Path, list[str]]:
    """Real photos in a/ b/ and the top, a link back to the top, a hard link and a link to a file; returns the
    folder and the relative paths each image should be listed under (once)."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    names = []
    for i, p in enumerate(photos[:6]):
        rel = f"{'ab '[i % 3]}/{Path(p).name}".lstrip(" /")
        shutil.copy(p, root / rel)
        names.append(rel)
    (root / "loop").symlink_to(".")
    os.link(root / names[0], root / "b" / "zz-hard-link.jpg")  # the same file under a second name
    (root / "b" / "0-file-link.jpg").symlink_to(root / names[1])  # sorts first, but is a link: the real name wins
    return root, sorted(names)


def test_list_images_follows_links_but_lists_each_image_once(photos, tmp_path):
    from engine.search_cli import list_images

    root, names = linked_folder(photos, tmp_path / "pictures")
    assert [p.relative_to(root).as_posix() for p in list_images(root)] == names


def test_crossing_links_finish(photos, tmp_path):
    root, names = linked_folder(photos, tmp_path / "pictures")
    (root / "a" / "to-b").symlink_to("../b")
    (root / "b" / "to-a").symlink_to("../a")
    (root / "a" / "up").symlink_to("..")
    code = ("import sys; from engine.search_cli import list_images; "
            f"print('\\n'.join(p.relative_to(sys.argv[1]).as_posix() for p in list_images(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == names


def test_cli_indexes_each_image_once_through_a_link_loop(model, photos, tmp_path, capsys):
    root, names = linked_folder(photos, tmp_path / "pictures")
    index = tmp_path / "p.idx"
    assert search_main(["index", str(root), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    assert json.loads(sidecar_path(index).read_text())["paths"] == names
    assert f"indexed {len(names)} images" in capsys.readouterr().out


def test_file_names_that_are_not_utf8(model, photos, tmp_path, capsys):
    root = tmp_path / "pictures"
    root.mkdir()
    for p in photos[:4]:
        shutil.copy(p, root / Path(p).name)
    odd = root / os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: Python keeps the \xe9 as a lone surrogate
    shutil.copy(photos[5], odd)
    tex = root / "x$\\frac$.jpg"  # to matplotlib, bad mathtext
    shutil.copy(photos[6], tex)
    index = tmp_path / "p.idx"
    assert search_main(["index", str(root), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "results.png"
    assert search_main(["query", str(odd), str(tex), photos[1], "--index", str(index), "-k", "6", "--out",
                        str(out)]) == 0
    text = capsys.readouterr().out
    shown = str(root / "caf\\xe9.jpg")  # printed with the byte escaped
    rows = parse_results(text, [shown, str(tex), photos[1]])
    assert rows[shown][0][1] == pytest.approx(1.0, abs=1e-4) and rows[shown][0][3] == "caf\\xe9.jpg"
    assert rows[str(tex)][0][1] == pytest.approx(1.0, abs=1e-4) and rows[str(tex)][0][3] == tex.name
    assert [r[3] for r in rows[photos[1]]][0] == Path(photos[1]).name
    img = cv2.imread(str(out))
    assert img is not None and img.shape[:2] == (3 * 230, 7 * 200)  # 3 queries x (query + 6 results)


def test_a_huge_k_gives_the_whole_index(indexed, photos, tmp_path, capsys):
    assert search_main(["query", photos[0], photos[7], "--index", str(indexed), "-k", "1000000"]) == 0
    rows = parse_results(capsys.readouterr().out, [photos[0], photos[7]])
    assert [len(rows[q]) for q in (photos[0], photos[7])] == [6, 6]
    out = tmp_path / "r.png"
    assert search_main(["query", photos[0], "--index", str(indexed), "-k", "40", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no more images" not in text and len(parse_results(text, [photos[0]])[photos[0]]) == 6
    img = cv2.imread(str(out))
    assert img.shape[:2] == (230, 7 * 200)  # the query and the 6 images of the index: no empty columns
