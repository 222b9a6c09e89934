"""Image search: Searcher's image methods with the real Encoder, and `python -m engine.search` end to end.

Oracle: Encoder.encode + a brute-force numpy top-k over the same real photos.
"""

import hashlib
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
from trained_models import ModelCache

from engine import Encoder, Searcher
from engine.errors import ModelError
from engine.search_cli import IMAGE_EXTS, sidecar_path
from engine.search_cli import main as search_main
from engine.searcher import FileStamp

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


def index_paths(index, folder) -> dict:
    """{id: path relative to folder} of an index, read back by Searcher.load from the vectors' meta."""
    s = Searcher.load(index)
    root = Path(folder).resolve()
    return {i: Path(m).relative_to(root).as_posix() for i, m in zip(s.ids.tolist(), s.meta())}


def test_cli_index_and_query(model, folder, photos, tmp_path, capsys):
    index = tmp_path / "out" / "pictures.idx"
    assert search_main(["index", str(folder), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err and "float32 pixels" in captured.err
    assert "16 added, 0 updated, 0 removed, 0 unchanged, 2 skipped (broken.jpg: " in captured.out
    assert [p.name for p in index.parent.iterdir()] == ["pictures.idx"]  # one file, no sidecar
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and p.name not in ("broken.jpg", "depth.tiff"))
    paths = index_paths(index, folder)
    assert sorted(paths.values()) == files and len(paths) == 16
    loaded = Searcher.load(index)
    assert loaded.model == Encoder(model).identity and loaded.model_path == str(model.resolve())
    for i, st in zip(loaded.ids.tolist(), loaded.stamps()):  # an independent stamp of each file
        f = folder / paths[i]
        assert st == FileStamp(f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).digest())

    queries = [photos[3], photos[20]]  # the first is indexed (a copy in sub/), the second is not
    out = tmp_path / "results.png"
    rc = search_main(["query", *queries, "--index", str(index), "-k", "3", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    # oracle: encode everything, brute-force top-3 over the index less the query's own copy
    enc = Encoder(model)
    ids = sorted(paths)
    base = enc.encode([folder / paths[i] for i in ids])
    printed = parse_results(text, queries)
    self_id = [i for i in ids if paths[i] == f"sub/{Path(photos[3]).name}"]
    for q, exclude in zip(queries, (self_id, [])):
        keep = [j for j, i in enumerate(ids) if i not in exclude]
        srow, jrow = brute_force(enc.encode([q]), base[keep], 3)
        srow, irow = srow[0], [ids[keep[j]] for j in jrow[0]]
        rows = printed[q]
        assert [r[0] for r in rows] == [1, 2, 3]
        np.testing.assert_allclose([r[1] for r in rows], srow, atol=1e-4)
        for (_, score, i, path), ref_i in zip(rows, irow):
            assert path == str(folder.resolve() / paths[i])
            assert i == ref_i or abs(score - srow[list(irow).index(ref_i)]) < 1e-4  # equal scores may swap
    assert all(r[2] not in self_id for r in printed[queries[0]]) and printed[queries[0]][0][1] < 0.9999
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] > 200 and img.shape[1] > 4 * 150  # 2 rows, 1 + 3 columns
    assert search_main(["query", *queries, "--index", str(index), "-k", "3", "--mmap"]) == 0  # the file mapped
    assert capsys.readouterr().out == text.replace(f"wrote {out}\n", "")

    # without --model: the model recorded at indexing
    assert search_main(["query", photos[20], "--index", str(index), "-k", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 3 and "recorded in the index" in captured.err


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
    # a version-1 index whose sidecar does not belong to it is refused
    to_version1(index, folder)
    write_version1(index, Searcher(4))
    assert search_main(["query", str(next(folder.glob("*.jpg"))), "--index", str(index)]) == 2
    assert "does not belong" in capsys.readouterr().err
    sidecar_path(index).unlink()
    assert search_main(["query", str(next(folder.glob("*.jpg"))), "--index", str(index)]) == 2
    assert "is a version-1 index without its paths sidecar" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        search_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "index" in text and "query" in text and "dups" in text and "paths.json" in text
    with pytest.raises(SystemExit):
        search_main(["query", "--help"])
    text = capsys.readouterr().out
    for opt in ("--index", "--model", "-k", "--out", "--json", '"excluded"', '"results"'):
        assert opt in text
    with pytest.raises(SystemExit):
        search_main(["dups", "--help"])
    text = capsys.readouterr().out
    for opt in ("--threshold", "--out", "--index", "cosine similarity", "benchmarks/dups_threshold.py"):
        assert opt in text


def test_help_imports_nothing_heavy():
    """`--help` of the command and each subcommand answers without numpy's heavy neighbours."""
    heavy = ("torch", "onnxruntime", "numba", "cv2", "matplotlib")
    code = ("import sys\nfrom engine.search_cli import main\nfor a in (['--help'], ['index', '--help'], "
            "['query', '--help'], ['dups', '--help']):\n    try:\n        main(a)\n    except SystemExit:\n"
            "        pass\nprint('HEAVY:' + ' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{heavy!r})))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n").splitlines()[-1] == "HEAVY:", r.stdout[-300:]


# -- damaged sidecars, symbolic-link loops, file names that are not UTF-8, a huge -k -------------------------

def write_version1(index: Path, s: Searcher) -> str:
    """``s`` saved as a version-1 index file (as `index` wrote it before version 2); returns its sha256."""
    import hashlib

    n = len(s)
    header = {"format_version": 1, "dim": s.dim, "metric": s.metric, "count": n, "next_id": int(max([-1, *s.ids.tolist()])) + 1,
              "model": s.model}
    body = s.ids.astype("<i8").tobytes() + s.get(s.ids).astype("<f4").tobytes()
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + body).hexdigest()
    index.write_bytes(b"LOOKALIKE-INDEX " + json.dumps({**header, "sha256": digest}, sort_keys=True).encode()
                      + b"\n" + body)
    return digest


def to_version1(index: Path, folder: Path) -> dict:
    """Rewrite a version-2 index of ``folder`` as a version-1 index, ids 0..n-1, with its paths sidecar beside it,
    as older versions of `index` wrote them; returns the sidecar."""
    s = Searcher.load(index)
    root = Path(folder).resolve()
    order = sorted(zip(s.meta(), s.ids.tolist()))  # by path, as the old command numbered them
    v1 = Searcher(s.dim)
    v1._model = s.model
    v1.add(s.get([i for _, i in order]))
    side = {"format_version": 1, "index_sha256": write_version1(index, v1), "root": str(root),
            "model": s.model_path, "identity": s.model, "count": len(order),
            "paths": [Path(m).relative_to(root).as_posix() for m, _ in order], "skipped": []}
    sidecar_path(index).write_text(json.dumps(side, indent=1))
    return side


@pytest.fixture(scope="module")
def indexed(model, photos, tmp_path_factory):
    """A real version-1 index of 6 photos (ids 0..5) and its sidecar, written once; tests copy them."""
    root = tmp_path_factory.mktemp("indexed")
    (root / "pictures").mkdir()
    for p in photos[:6]:
        shutil.copy(p, root / "pictures" / Path(p).name)
    index = root / "p.idx"
    assert search_main(["index", str(root / "pictures"), "--model", str(model), "--index", str(index),
                        "--no-progress"]) == 0
    to_version1(index, root / "pictures")
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
    """A version-1 index and its sidecar (what `index` wrote before version 2) are still read, and checked."""
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
    assert search_main(["query", photos[7], "--index", str(index), "-k", "6"]) == 0
    assert len(parse_results(capsys.readouterr().out, [photos[7]])[photos[7]]) == 6


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
            "print('\\n'.join(p.relative_to(sys.argv[1]).as_posix() for p in list_images(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == names


def test_cli_indexes_each_image_once_through_a_link_loop(model, photos, tmp_path, capsys):
    root, names = linked_folder(photos, tmp_path / "pictures")
    index = tmp_path / "p.idx"
    assert search_main(["index", str(root), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    assert sorted(index_paths(index, root).values()) == names
    assert f"{len(names)} added, 0 updated" in capsys.readouterr().out


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
    assert Searcher.load(index).meta().count(str(root.resolve() / "caf\\xe9.jpg")) == 1  # recorded escaped
    for q, name in ((shown, "caf\\xe9.jpg"), (str(tex), tex.name), (photos[1], Path(photos[1]).name)):
        assert len(rows[q]) == 5 and name not in [Path(r[3]).name for r in rows[q]]  # itself left out
    assert "caf\\xe9.jpg" in {Path(r[3]).name for r in rows[str(tex)]}  # and found for another query
    img = cv2.imread(str(out))
    assert img is not None and img.shape[:2] == (3 * 230, 6 * 200)  # 3 queries x (query + 5 results)
    # the picture shows the indexed file whose name is not UTF-8 (meta_path restores its bytes)
    from engine.search_cli import meta_path

    assert meta_path(str(root.resolve() / "caf\\xe9.jpg")) == root.resolve() / odd.name


def test_a_huge_k_gives_the_whole_index(indexed, photos, tmp_path, capsys):
    assert search_main(["query", photos[0], photos[7], "--index", str(indexed), "-k", "1000000"]) == 0
    rows = parse_results(capsys.readouterr().out, [photos[0], photos[7]])
    # photos[0] is a copy of an indexed photo, but a version-1 index records no content digest to tell: kept
    assert [len(rows[q]) for q in (photos[0], photos[7])] == [6, 6]
    out = tmp_path / "r.png"
    assert search_main(["query", photos[7], "--index", str(indexed), "-k", "40", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no more images" not in text and len(parse_results(text, [photos[7]])[photos[7]]) == 6
    img = cv2.imread(str(out))
    assert img.shape[:2] == (230, 7 * 200)  # the query and the 6 images of the index: no empty columns


def test_a_byte_identical_copy_of_an_indexed_query_is_a_result(model, photos, tmp_path, capsys):
    """Only the query's own entry is left out: its copy under another name is found first, at cosine 1."""
    folder = tmp_path / "copies"
    folder.mkdir()
    for p in photos[:4]:
        shutil.copy(p, folder / Path(p).name)
    query = folder / Path(photos[0]).name
    shutil.copy(query, folder / "copy.jpg")
    index = tmp_path / "copies.idx"
    assert search_main(["index", str(folder), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    capsys.readouterr()
    assert search_main(["query", str(query), "--index", str(index), "-k", "4"]) == 0
    rows = parse_results(capsys.readouterr().out, [str(query)])[str(query)]
    assert [Path(r[3]).name for r in rows][0] == "copy.jpg" and rows[0][1] >= 0.9999
    assert len(rows) == 4 and Path(query).name not in [Path(r[3]).name for r in rows]


# -- one index file for the API and the command line ---------------------------------------------------------

def test_the_cli_reads_an_api_index_and_the_api_reads_a_cli_index(model, photos, tmp_path, capsys):
    files = [tmp_path / "api" / Path(p).name for p in photos[:6]]
    files[0].parent.mkdir()
    for src, dst in zip(photos, files):
        shutil.copy(src, dst)
    s = Searcher.from_model(model)
    ids = s.add_images([str(f) for f in files])
    assert s.meta(ids) == [str(f) for f in files]  # the paths as given
    assert s.stamps(ids) == [FileStamp(f.stat().st_size, f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).digest())
                             for f in files]
    index = tmp_path / "api.idx"
    s.save(index)
    assert search_main(["query", photos[1], photos[10], "--index", str(index), "-k", "6"]) == 0
    rows = parse_results(capsys.readouterr().out, [photos[1], photos[10]])
    enc = Encoder(model)
    emb = enc.encode(files)
    # photos[1] has the content of files[1]: left out by its sha256; photos[10] is not indexed
    for q, keep in ((photos[1], [0, 2, 3, 4, 5]), (photos[10], list(range(6)))):
        ref_scores, _ = brute_force(enc.encode([q]), emb[keep], len(keep))
        assert len(rows[q]) == len(keep)
        np.testing.assert_allclose([r[1] for r in rows[q]], ref_scores[0], atol=1e-4)
        assert {r[3] for r in rows[q]} == {str(files[j]) for j in keep}
    # the CLI's index, read by the API: the paths are the meta
    cli_index = tmp_path / "cli.idx"
    assert search_main(["index", str(files[0].parent), "--model", str(model), "--index", str(cli_index),
                        "--no-progress"]) == 0
    t = Searcher.load(cli_index)
    assert sorted(t.meta()) == sorted(str(f.resolve()) for f in files)
    got = dict(zip(t.meta(), t.get(t.ids)))
    np.testing.assert_allclose(np.stack([got[str(f.resolve())] for f in files]), emb, atol=1e-5)
    # an API index whose vectors have no meta: results named by id
    bare = Searcher(encoder=enc)
    bare.add(emb[:3])
    bare.save(tmp_path / "bare.idx")
    capsys.readouterr()
    assert search_main(["query", photos[10], "--index", str(tmp_path / "bare.idx"), "-k", "2"]) == 0
    assert capsys.readouterr().out.count("(no path)") == 2


class CountingEncoder:
    """Counts the images given to the real Encoder.encode (which still runs)."""

    def __init__(self, monkeypatch):
        self.images = []
        real = Encoder.encode

        def encode(enc, images, **kw):
            items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
            self.images += [Path(str(i)).name for i in items]
            return real(enc, images, **kw)

        monkeypatch.setattr(Encoder, "encode", encode)


def index_state(index) -> dict:
    """{path: (vector, stamp)} of an index."""
    s = Searcher.load(index)
    return {m: (v, st) for m, v, st in zip(s.meta(), s.get(s.ids), s.stamps())}


def test_indexing_again_embeds_only_what_changed(model, photos, tmp_path, capsys, monkeypatch):
    root = tmp_path / "pictures"
    (root / "sub").mkdir(parents=True)
    names = [f"{'sub/' if i % 3 == 0 else ''}{Path(p).name}" for i, p in enumerate(photos[:8])]
    for p, n in zip(photos, names):
        shutil.copy(p, root / n)
    index = tmp_path / "p.idx"
    counter = CountingEncoder(monkeypatch)
    assert search_main(["index", str(root), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    assert "8 added, 0 updated, 0 removed, 0 unchanged, 0 skipped" in capsys.readouterr().out
    assert sorted(counter.images) == sorted(Path(n).name for n in names)
    first = index_state(index)

    # the folder changes: 2 new photos, 1 deleted, 1 edited, 1 touched (same bytes, new time), 1 now unreadable
    shutil.copy(photos[8], root / "new1.jpg")
    shutil.copy(photos[9], root / "sub" / "new2.jpg")
    (root / names[1]).unlink()
    shutil.copy(photos[12], root / names[2])  # other bytes under the same name
    touched = root / names[4]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (root / names[5]).write_bytes(b"no longer an image")
    counter.images.clear()
    assert search_main(["index", str(root), "--index", str(index), "--no-progress"]) == 0  # its recorded model
    captured = capsys.readouterr()
    assert "2 added, 1 updated, 2 removed, 5 unchanged, 1 skipped" in captured.out, captured.out
    assert "recorded in the index" in captured.out
    # given to the encoder: the new, the edited and the unreadable file (the batch it failed is retried without
    # it); never an unchanged one, nor the touched one
    assert set(counter.images) == {"new1.jpg", "new2.jpg", Path(names[2]).name, Path(names[5]).name}
    after = index_state(index)
    # the oracle: the same folder indexed from scratch
    fresh = tmp_path / "fresh.idx"
    assert search_main(["index", str(root), "--model", str(model), "--index", str(fresh), "--no-progress"]) == 0
    want = index_state(fresh)
    assert sorted(after) == sorted(want) and len(want) == 8
    for path, (v, stamp) in want.items():
        np.testing.assert_allclose(after[path][0], v, atol=1e-5)
        assert after[path][1] == stamp  # the touched file's new time is recorded
    key = str(root.resolve() / names[0])  # an unchanged file keeps its vector from the first run, bit for bit
    np.testing.assert_array_equal(after[key][0], first[key][0])
    # nothing changed: nothing embedded
    counter.images.clear()
    assert search_main(["index", str(root), "--index", str(index), "--no-progress"]) == 0
    assert "0 added, 0 updated, 0 removed, 8 unchanged, 1 skipped" in capsys.readouterr().out
    assert counter.images == [Path(names[5]).name]  # only the unreadable file, tried again (skips are not recorded)


def test_indexing_a_version1_index_rewrites_it_as_one_file(indexed, model, tmp_path, capsys):
    index = tmp_path / "p.idx"
    shutil.copy(indexed, index)
    shutil.copy(sidecar_path(indexed), sidecar_path(index))
    side = json.loads(sidecar_path(index).read_text())
    assert search_main(["index", side["root"], "--index", str(index), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 added, 6 updated, 0 removed, 0 unchanged" in out and "removed its old p.idx.paths.json" in out
    assert not sidecar_path(index).exists()
    s = Searcher.load(index)
    assert sorted(s.meta()) == sorted(str(Path(side["root"]) / p) for p in side["paths"])
    assert all(st is not None for st in s.stamps()) and s.model == Encoder(model).identity


def test_query_folders_and_json(model, photos, tmp_path, capsys):
    root = tmp_path / "pictures"
    root.mkdir()
    for p in photos[:7]:
        shutil.copy(p, root / Path(p).name)
    index = tmp_path / "p.idx"
    assert search_main(["index", str(root), "--model", str(model), "--index", str(index), "--no-progress"]) == 0
    queries = tmp_path / "queries"
    queries.mkdir()
    shutil.copy(photos[2], queries / "a-copy.jpg")  # an indexed photo's bytes under another name
    shutil.copy(photos[15], queries / "b-new.jpg")
    capsys.readouterr()
    assert search_main(["query", str(queries), str(root / Path(photos[4]).name), "--index", str(index), "-k", "3",
                        "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["k"] == 3 and res["model"] == "mpnn" and res["index"] == str(index)
    asked = [queries / "a-copy.jpg", queries / "b-new.jpg", root / Path(photos[4]).name]
    assert [q["query"] for q in res["queries"]] == [str(p) for p in asked]
    s = Searcher.load(index)
    by_path = dict(zip(s.meta(), s.ids.tolist()))
    selves = [[by_path[str(root.resolve() / Path(photos[2]).name)]], [],
              [by_path[str(root.resolve() / Path(photos[4]).name)]]]
    enc = Encoder(model)
    for q, path, self_ids in zip(res["queries"], asked, selves):
        assert q["excluded"] == self_ids
        keep = [i for i in s.ids.tolist() if i not in self_ids]
        ref_scores, ref_rows = brute_force(enc.encode([path]), s.get(keep), 3)
        assert [r["rank"] for r in q["results"]] == [1, 2, 3]
        np.testing.assert_allclose([r["score"] for r in q["results"]], ref_scores[0], atol=1e-4)
        assert [r["id"] for r in q["results"]] == [keep[j] for j in ref_rows[0]]
        assert all(r["path"] == s.meta([r["id"]])[0] for r in q["results"])
        assert q["results"][0]["score"] < 0.9999  # never the query itself at 1.000


def test_default_image_model(photos, tmp_path, capsys):
    from conftest import need

    from engine.default_models import FILES, FOLDER

    need(FOLDER / FILES["image"])
    root = tmp_path / "pictures"
    root.mkdir()
    for p in photos[:3]:
        shutil.copy(p, root / Path(p).name)
    index = tmp_path / "p.idx"
    assert search_main(["index", str(root), "--index", str(index), "--no-progress"]) == 0
    assert f"model: the default image model {FOLDER / FILES['image']}" in capsys.readouterr().out
    s = Searcher.from_model()
    t = Searcher.load(index)
    assert t.model == s.encoder.identity and t.model_path == str((FOLDER / FILES["image"]).resolve())
    first = root.resolve() / Path(photos[0]).name
    (i,) = [i for i, m in zip(t.ids.tolist(), t.meta()) if m == str(first)]
    np.testing.assert_allclose(t.get([i]), s.encoder.encode([first]), atol=1e-5)


def test_an_int8_index_answers_as_float32_after_rerank_and_keeps_its_storage(model, photos, tmp_path, capsys):
    """`index --storage int8` keeps int8 codes (the float32 vectors in the file); `query --rerank` over every row
    gives the float32 index's answer (oracle: brute force over the encoder's float32 vectors). Asking an existing
    index for another storage is an error that names both and leaves the file as it was."""
    root = tmp_path / "pictures"
    root.mkdir()
    for p in photos[:12]:
        shutil.copy(p, root / Path(p).name)
    index = tmp_path / "p8.idx"
    assert search_main(["index", str(root), "--model", str(model), "--index", str(index), "--storage", "int8",
                        "--no-progress"]) == 0
    assert "(int8 vectors)" in capsys.readouterr().out
    s = Searcher.load(index)
    assert s.storage == "int8" and len(s) == 12
    queries = [photos[15], photos[18]]
    assert search_main(["query", *queries, "--index", str(index), "-k", "4", "--rerank", "12", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    enc = Encoder(model)
    ids = s.ids.tolist()
    ref_scores, ref_rows = brute_force(enc.encode(queries), s.get(ids), 4)
    for q, rs, rr in zip(res["queries"], ref_scores, ref_rows):
        assert [r["id"] for r in q["results"]] == [ids[j] for j in rr]
        np.testing.assert_allclose([r["score"] for r in q["results"]], rs, atol=1e-5)
    before = index.read_bytes()
    assert search_main(["index", str(root), "--index", str(index), "--storage", "float16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds int8 vectors" in err and "float16" in err
    assert index.read_bytes() == before
