"""engine.scale on a real local Ray (one cluster for the module): embedding with Ray Data, sharded search.

Oracles: the in-process ``Encoder`` on the same photos (scikit-image's bundled photographs, read by path);
one ``Searcher`` holding the same vectors in increasing id order, and a numpy brute force with exact integer
scores for the tie order; the shard index files read back with ``Searcher.load`` for the routing.
"""

import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="engine.scale needs Ray: pip install 'ray[data]>=2.9' pyarrow")
pytest.importorskip("pyarrow")

from engine import Encoder, Searcher  # noqa: E402
from engine.errors import IndexFileError, InputError  # noqa: E402
from engine.scale.__main__ import main as scale_main  # noqa: E402
from engine.scale.embed import (  # noqa: E402
    embed_collection, load_embeddings, read_manifest, searcher_from_embeddings, shard_searchers)
from engine.scale.sharded import ShardedSearcher, ShardUnavailable, shard_name  # noqa: E402
from engine.search_cli import list_images  # noqa: E402

pytestmark = pytest.mark.slow

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=str(temp))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model() -> Path:
    from engine.default_models import default_model

    return default_model("image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """scikit-image's photographs (two in a subfolder) and one file that is not an image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("needs scikit-image's bundled photographs (pip install scikit-image)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, name in enumerate(PHOTOS):
        shutil.copy(data / name, root / ("sub" if i % 3 == 2 else ".") / name)
    (root / "broken.jpg").write_bytes(b"this is not a JPEG\n" * 10)
    return root


@pytest.fixture(scope="module")
def embedded(cluster, folder, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "photos.emb"
    res = embed_collection(folder, out, model=model, batch_size=2, rows_per_shard=3, actors=2, progress=False)
    return out, res


# -- embedding ------------------------------------------------------------------------------------------------

def test_embedding_a_folder_equals_the_in_process_encoder(embedded, folder, model):
    out, res = embedded
    files = list_images(folder)  # the ids are positions in this list
    names = [f.relative_to(folder).as_posix() for f in files]
    broken = names.index("broken.jpg")
    assert res["embedded"] == len(PHOTOS) and res["skipped"] == 1 and res["shards_written"] == 2  # 8 ids, 4 a shard
    man = read_manifest(out)
    assert man["complete"] and man["dim"] == Encoder(model).dim and man["rows_per_shard"] == 4
    assert man["model"] == Encoder(model).identity
    skipped = [s for e in man["shards"] for s in e["skipped"]]
    assert [(s["id"], s["path"]) for s in skipped] == [(broken, "broken.jpg")]
    assert "broken.jpg" in skipped[0]["reason"] and "not a readable image" in skipped[0]["reason"]
    assert [e["rows"] for e in man["shards"]] == [4 - (broken < 4), 4 - (broken >= 4)]

    emb = load_embeddings(out)
    good = [i for i in range(len(files)) if i != broken]
    assert emb.ids.tolist() == good
    assert emb.paths == [names[i] for i in good]
    ref = Encoder(model, batch_size=2).encode([str(files[i]) for i in good])
    np.testing.assert_allclose(emb.vectors, ref, atol=2e-6)
    s = searcher_from_embeddings(out)
    assert sorted(s.ids.tolist()) == good
    assert [len(p) for p in shard_searchers(out)] == [e["rows"] for e in man["shards"]]


def test_a_rerun_keeps_the_verified_shards_and_redoes_the_others(embedded, folder, model, tmp_path):
    out, _ = embedded
    again = tmp_path / "again.emb"
    shutil.copytree(out, again)
    first = read_manifest(out)
    (again / first["shards"][1]["file"]).unlink()  # as if killed before shard 1
    res = embed_collection(folder, again, model=model, batch_size=2, rows_per_shard=3, actors=2, progress=False)
    assert (res["shards_kept"], res["shards_written"]) == (1, 1)
    assert res["embedded"] + res["skipped"] == first["shards"][1]["stop_id"] - first["shards"][1]["first_id"]
    assert read_manifest(again)["shards"] == first["shards"]  # same files, same sha256: as if never interrupted

    damaged = again / first["shards"][0]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-5] + b"XXXXX")
    res = embed_collection(folder, again, model=model, batch_size=2, rows_per_shard=3, actors=2, progress=False)
    assert (res["shards_kept"], res["shards_written"]) == (1, 1)
    assert res["embedded"] == first["shards"][0]["rows"]
    assert read_manifest(again)["shards"] == first["shards"]

    res = embed_collection(folder, again, model=model, batch_size=2, rows_per_shard=3, progress=False)
    assert (res["embedded"], res["shards_written"], res["shards_kept"]) == (0, 0, 2)
    with pytest.raises(InputError, match="another rows_per_shard"):
        embed_collection(folder, again, model=model, batch_size=2, rows_per_shard=9, progress=False)
    with pytest.raises(InputError, match="another input"):
        embed_collection([str(f) for f in list_images(folder)][:3], again, model=model, batch_size=2,
                         rows_per_shard=3, progress=False)


def test_a_parquet_list_of_paths_and_hostile_shards(cluster, embedded, folder, model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [str(f) for f in list_images(folder) if f.name != "broken.jpg"][:3]
    pq.write_table(pa.table({"path": files}), tmp_path / "list.parquet")
    out = tmp_path / "list.emb"
    res = embed_collection(tmp_path / "list.parquet", out, model=model, batch_size=2, progress=False)
    emb = load_embeddings(out)
    assert res["embedded"] == 3 and emb.paths == files and emb.ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(emb.vectors, Encoder(model, batch_size=2).encode(files), atol=2e-6)

    pq.write_table(pa.table({"file": files}), tmp_path / "nopath.parquet")
    with pytest.raises(InputError, match="no 'path' column"):
        embed_collection(tmp_path / "nopath.parquet", tmp_path / "x.emb", model=model, progress=False)

    # A shard rewritten with float64 embeddings, its manifest digest updated to match: the schema check refuses it.
    import hashlib
    import json

    man = json.loads((out / "manifest.json").read_text())
    t = pq.read_table(out / man["shards"][0]["file"])
    vec = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    bad = pa.table({"id": t.column("id"), "path": t.column("path"),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), vec.shape[1])})
    pq.write_table(bad, out / man["shards"][0]["file"])
    with pytest.raises(IndexFileError, match="sha256 differs"):
        load_embeddings(out)
    man["shards"][0]["sha256"] = hashlib.sha256((out / man["shards"][0]["file"]).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(IndexFileError, match="columns must be id int64, path string, embedding"):
        load_embeddings(out)


def test_the_command_line(cluster, folder, model, tmp_path, capsys):
    out = tmp_path / "cli.emb"
    assert scale_main(["index", str(folder), "--out", str(out), "--model", str(model), "--actors", "1",
                       "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert f"{len(PHOTOS)} embeddings" in printed.out and "1 unreadable images skipped" in printed.out
    assert "skipped broken.jpg" in printed.err
    assert load_embeddings(out).vectors.shape[0] == len(PHOTOS)
    assert scale_main(["shard", str(out), "--out", str(tmp_path / "idx"), "--shards", "2"]) == 0
    with ShardedSearcher.load(tmp_path / "idx") as s:
        assert len(s) == len(PHOTOS) and s.storage == "float32"
    assert scale_main(["shard", str(out), "--out", str(tmp_path / "idx8"), "--shards", "2", "--storage", "int8"]) == 0
    with ShardedSearcher.load(tmp_path / "idx8") as s:
        assert len(s) == len(PHOTOS) and s.storage == "int8"
    assert scale_main(["index", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "nothing there" in err and "Traceback" not in err


# -- sharded search -------------------------------------------------------------------------------------------

def one_searcher(vectors, ids, metric="cosine") -> Searcher:
    """The oracle: one Searcher holding the vectors in increasing id order (its ties go to the lower id)."""
    order = np.argsort(ids)
    s = Searcher(vectors.shape[1], metric=metric)
    s.add(vectors[order], ids[order])
    return s


def assert_same_answer(got, want, atol=1e-6):
    """Same shape and padding; scores equal within BLAS rounding; ids equal wherever the order is not a near tie."""
    (gs, gi), (ws, wi) = got, want
    assert gs.shape == ws.shape and gi.shape == wi.shape and gs.dtype == np.float32 and gi.dtype == np.int64
    assert np.array_equal(gi == -1, wi == -1) and np.all(gs[gi == -1] == -np.inf)
    real = wi != -1
    np.testing.assert_allclose(gs[real], ws[real], atol=atol, rtol=0)
    gap = np.full(ws.shape, np.inf)
    d = np.abs(np.diff(np.where(real, ws, -9.0), axis=1)) if ws.shape[1] > 1 else np.zeros((len(ws), 0))
    gap[:, :-1] = np.minimum(gap[:, :-1], d)
    gap[:, 1:] = np.minimum(gap[:, 1:], d)
    clear = real & (gap > 2 * atol)
    assert np.array_equal(gi[clear], wi[clear])
    assert all(set(g[r]) == set(w[r]) for g, w, r in zip(gi, wi, real))


@pytest.fixture(scope="module")
def vectors(embedded):
    """600 random vectors (rows 550..579 copies of row 7: exact ties) and the real photo embeddings."""
    rng = np.random.default_rng(16)
    x = rng.standard_normal((600, 128)).astype(np.float32)
    x[550:580] = x[7]
    real = load_embeddings(embedded[0]).vectors
    return np.concatenate([x, real])


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_search_equals_one_searcher(cluster, vectors, shards, tmp_path):
    n = len(vectors)
    ids = np.random.default_rng(shards).permutation(np.arange(0, 3 * n, 3))  # gaps, not in order
    rng = np.random.default_rng(1)
    q = np.concatenate([rng.standard_normal((9, vectors.shape[1])), vectors[[7, 600, 603]]])
    oracle = one_searcher(vectors, ids)
    with ShardedSearcher.build(tmp_path / "idx", vectors, ids, shards=shards) as s:
        assert len(s) == n and np.array_equal(s.ids, np.sort(ids))
        for k in (1, 5, 40, n - 1, n, n + 7, 2000):
            got = s.search(q, k)
            assert got[0].shape == (len(q), min(k, max(n, 1024)))
            assert_same_answer(got, oracle.search(q, k))
        # the 31 copies of row 7 tie exactly: ordered by id, and k cuts through them
        g = s.search(vectors[7], 20)
        tied = np.sort(ids[[7, *range(550, 580)]])[:20]
        assert np.array_equal(g[1][0], tied)
        assert_same_answer(s.search(vectors[7].astype(np.float64), 3), oracle.search(vectors[7], 3))
        with pytest.raises(InputError, match=r"queries must have shape \(n, 128\)"):
            s.search(np.ones((2, 5), np.float32), 3)
        with pytest.raises(InputError, match="k must be a positive int"):
            s.search(q, 0)


def test_ties_and_padding_bit_for_bit_against_a_brute_force(cluster, tmp_path):
    """Small-integer vectors under "ip": every score is an exact integer, so the answer is exact: scores equal
    bit for bit and the order among the many equal scores is the lower id first."""
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(301, 8)).astype(np.float32)
    ids = rng.permutation(301).astype(np.int64) * 2 + 1
    q = rng.integers(-2, 3, size=(17, 8)).astype(np.float32)
    with ShardedSearcher.build(tmp_path / "idx", x, ids, shards=4, metric="ip") as s:
        exact = q.astype(np.int64) @ x.astype(np.int64).T
        for k in (1, 10, 300, 301, 302, 1500):
            cols = min(k, 1024)
            order = np.lexsort((np.broadcast_to(ids, exact.shape), -exact), axis=1)[:, :cols]
            want_ids = np.full((len(q), cols), -1, np.int64)
            want_s = np.full((len(q), cols), -np.inf, np.float32)
            m = min(cols, len(x))
            want_ids[:, :m] = ids[order[:, :m]]
            want_s[:, :m] = np.take_along_axis(exact, order[:, :m], axis=1)
            got_s, got_i = s.search(q, k)
            assert np.array_equal(got_i, want_ids) and np.array_equal(got_s, want_s)
            assert np.array_equal(got_i, one_searcher(x, ids, "ip").search(q, k)[1])


def test_an_actor_killed_mid_query_is_restarted_and_the_query_answered(cluster, tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10000, 64)).astype(np.float32)
    q = rng.standard_normal((2000, 64)).astype(np.float32)
    oracle = one_searcher(x, np.arange(len(x)))
    want = oracle.search(q, 5)
    with ShardedSearcher.build(tmp_path / "idx", x, shards=2) as s:
        results = {}
        worker = threading.Thread(target=lambda: results.setdefault("answer", s.search(q, 5)))
        worker.start()
        victim = s._actors[1]
        ray.kill(victim)  # while the search runs (or just before it reaches shard 1): both must be answered
        worker.join(timeout=120)
        assert "answer" in results
        assert_same_answer(results["answer"], want)
        assert_same_answer(s.search(q[:10], 5), oracle.search(q[:10], 5))  # restarts it if the search beat the kill
        assert s.restarts == 1 and s._actors[1] is not victim
        ray.kill(s._actors[0])  # killed between queries: restarted on the next one
        assert_same_answer(s.search(q[:10], 5), oracle.search(q[:10], 5))
        assert s.restarts == 2

        (tmp_path / "idx" / shard_name(0)).unlink()  # its file gone: a clear error, no endless retry
        ray.kill(s._actors[0])
        with pytest.raises(ShardUnavailable, match=f"{shard_name(0)} is gone"):
            s.search(q[:2], 5)


def test_add_and_remove_reach_the_right_shard_and_survive_a_restart(cluster, tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    folder = tmp_path / "idx"
    with ShardedSearcher.create(folder, 16, shards=3) as s:
        assert len(s) == 0
        empty = s.search(x[:2], 4)
        assert np.all(empty[1] == -1) and np.all(empty[0] == -np.inf) and empty[1].shape == (2, 4)
        a = s.add(x[:30])
        assert a.tolist() == list(range(30))
        b = s.add(x[30:40], ids=[100, 101, 102, 103, 104, 205, 206, 207, 208, 209])
        c = s.add(x[40:50])  # automatic ids continue past the highest id ever given
        assert c.tolist() == list(range(210, 220))
        with pytest.raises(InputError, match="id 101 is already in the index"):
            s.add(x[:2], ids=[500, 101])
        assert len(s) == 50 and 500 not in s
        assert s.remove([3, 101, 215, 99999, 3]) == 3 and s.remove([3]) == 0
        all_ids = np.concatenate([a, b, c])
        live = ~np.isin(all_ids, [3, 101, 215])
        for i in range(3):  # an independent reader: each shard's own file holds exactly its ids (id % 3)
            held = Searcher.load(folder / shard_name(i)).ids
            assert sorted(held.tolist()) == sorted(all_ids[live][all_ids[live] % 3 == i].tolist())
        oracle = one_searcher(x[live], all_ids[live])
        np.testing.assert_array_equal(s.get([205, 0, 17]), oracle.get([205, 0, 17]))
        with pytest.raises(KeyError, match="id 3 is not in the index"):
            s.get([3])
        for actor in list(s._actors):  # every write was saved: restarted actors hold it all
            ray.kill(actor)
        assert_same_answer(s.search(x, 60), oracle.search(x, 60))
        assert s.restarts == 3
    with ShardedSearcher.load(folder) as again:  # the manifest kept next_id past the removed 215 .. 219
        assert len(again) == 47 and again.add(x[:1]).tolist() == [220]
        again.save(tmp_path / "copy")
    with ShardedSearcher.load(tmp_path / "copy") as copy:
        assert np.array_equal(copy.ids, np.sort(np.append(all_ids[live], 220)))


@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_compressed_shards_keep_their_storage_and_rerank_to_float32_scores(cluster, storage, tmp_path):
    """storage= reaches every shard file and the manifest (and survives writes and reloads); rerank=R gives the
    float32 scores of the stored vectors and, with R = 200 of 2,000, the float32 index's top 10."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    q = rng.standard_normal((25, 32)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    exact_top = np.argsort(-(qn @ unit.T), axis=1, kind="stable")[:, :10]
    folder = tmp_path / "idx"
    with ShardedSearcher.build(folder, x, shards=3, storage=storage) as s:
        assert s.storage == storage and f"storage={storage!r}" in repr(s)
        assert all(Searcher.load(folder / shard_name(i)).storage == storage for i in range(3))
        scores, ids = s.search(q, 10, rerank=200)
        want = np.take_along_axis(qn @ unit.T, ids, axis=1)
        np.testing.assert_allclose(scores, want, atol=2e-6, rtol=0)  # float32 scores, not the codes'
        assert np.array_equal(np.sort(ids, axis=1), np.sort(exact_top, axis=1))
        approx, approx_ids = s.search(q, 10)  # the codes' own scores: close to float32, not equal
        err = np.abs(approx - np.take_along_axis(qn @ unit.T, approx_ids, axis=1))
        assert err.max() < (2e-3 if storage == "float16" else 5e-2)
        with pytest.raises(InputError, match="rerank must be a positive int"):
            s.search(q, 10, rerank=0)
        s.add(x[:5])  # a write rewrites the shard files and the manifest: the storage stays
    assert json.loads((folder / "sharded.json").read_text())["storage"] == storage
    with ShardedSearcher.load(folder) as again:
        assert again.storage == storage and len(again) == 2005
    one = Searcher(32, storage=storage)
    one.add(x[:100])
    with ShardedSearcher.from_searcher(one, tmp_path / "from", shards=2) as split:
        assert split.storage == storage
        assert_same_answer(split.search(q, 5, rerank=100), one.search(q, 5, rerank=100))


def test_a_manifest_or_shard_of_another_storage_is_refused(cluster, tmp_path):
    x = np.random.default_rng(13).standard_normal((40, 8)).astype(np.float32)
    with ShardedSearcher.build(tmp_path / "idx", x, shards=2, storage="int8"):
        pass
    man_path = tmp_path / "idx" / "sharded.json"
    man = json.loads(man_path.read_text())
    man_path.write_text(json.dumps({**man, "storage": "int4"}))
    with pytest.raises(IndexFileError, match="storage must be one of .*got 'int4'"):
        ShardedSearcher.load(tmp_path / "idx")
    man_path.write_text(json.dumps({**man, "storage": "float16"}))
    with pytest.raises(ShardUnavailable, match="shard-000.lkx holds dim 8 / cosine / int8 vectors; the manifest says "
                                               "dim 8 / cosine / float16"):
        ShardedSearcher.load(tmp_path / "idx")
    del man["storage"]  # a manifest from before compressed shards reads as float32
    man_path.write_text(json.dumps(man))
    with pytest.raises(ShardUnavailable, match="the manifest says dim 8 / cosine / float32"):
        ShardedSearcher.load(tmp_path / "idx")


def test_damaged_shard_files_are_refused_naming_them(cluster, tmp_path):
    x = np.random.default_rng(9).standard_normal((20, 8)).astype(np.float32)
    with ShardedSearcher.build(tmp_path / "idx", x, shards=2):
        pass
    shutil.copy(tmp_path / "idx" / shard_name(0), tmp_path / "idx" / shard_name(1))  # shard 1 holds shard 0's ids
    with pytest.raises(ShardUnavailable, match=r"shard-001.lkx is shard 1 of 2 but holds id 0"):
        ShardedSearcher.load(tmp_path / "idx")
    f = tmp_path / "idx" / shard_name(0)
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(ShardUnavailable, match="shard-000.lkx"):
        ShardedSearcher.load(tmp_path / "idx")


def test_the_engine_imports_without_ray():
    import subprocess
    import sys

    code = ("import sys, engine, engine.scale, engine.scale.embed, engine.scale.sharded, engine.scale.__main__; "
            "print('ray' in sys.modules, 'pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]
