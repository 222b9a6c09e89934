"""engine.IVFSearcher: exactness with every list probed, the probe semantics and recall against numpy oracles,
the id contract through adds and removes, files (round trip, damaged and crafted files), and concurrent use."""

import hashlib
import json
import threading

import numpy as np
import pytest
import reference as ref

from engine.errors import IndexFileError, InputError
from engine.ivf import FORMAT_VERSION, MAGIC, TRAIN_MIN_PER_LIST, IVFSearcher
from engine.searcher import Searcher


def data(seed, n, d):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def clustered(seed, n, d, centres=40, noise=0.6):
    """Unit centres (fixed) plus Gaussian noise of norm ~``noise``: neighbours come from the same centre."""
    c = np.random.default_rng(1000).standard_normal((centres, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    return (c[rng.integers(centres, size=n)] + noise / np.sqrt(d) * rng.standard_normal((n, d))).astype(np.float32)


def trained(x, *, nlist=16, metric="cosine", ids=None, **kwargs):
    s = IVFSearcher(x.shape[1], nlist=nlist, metric=metric, **kwargs)
    s.train(x)
    s.add(x, ids=ids)
    return s


def members(s):
    """(list of each stored id) from the index's layout: {list: ids}."""
    out = {}
    for lst in range(s._sizes.shape[0]):
        a = int(s._starts[lst])
        out[lst] = s._ids[a : a + int(s._sizes[lst])].copy()
    return out


def recall(ids, truth):
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) / truth.shape[1] for a, b in zip(ids, truth)]))


# -- exactness and the probe semantics ---------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("nq", [1, 3, 40])
def test_probing_every_list_is_the_exact_searchers_answer(metric, nq):
    x, q = data(1, 3000, 24), data(2, nq, 24)
    ids = np.random.default_rng(3).permutation(10**6)[:3000]
    s = trained(x, metric=metric, ids=ids)
    exact = Searcher(24, metric=metric)
    exact.add(x, ids=ids)
    for nprobe in (16, 10**6):  # nprobe >= nlist: every list
        scores, got = s.search(q, 10, nprobe=nprobe)
        want_scores, want_ids = exact.search(q, 10)
        if metric == "cosine":
            xs, qs, atol = ref.normalize(x), ref.normalize(q), 1e-5
        else:
            xs, qs, atol = x, q, 1e-5 * float(np.abs(x).sum(1).max() * np.abs(q).max())
        ref.check_topk(scores, got, qs, xs, 10, vector_ids=ids, atol=atol)  # ties aside, the exact answer
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=atol)
        assert (got == want_ids).mean() > 0.99  # any difference is a near-tie (checked above)


def test_exact_ties_go_to_the_lower_id():
    base = np.eye(4, dtype=np.float32)
    s = IVFSearcher(4, nlist=2)
    s.train(np.vstack([base] * 4))
    s.add(np.vstack([base, base]), ids=[20, 11, 12, 13, 10, 21, 22, 23])
    scores, ids = s.search(np.array([1, 0, 0, 0], np.float32), 3, nprobe=2)
    assert ids.tolist() == [[10, 20, 11]] and scores.tolist() == [[1.0, 1.0, 0.0]]


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_answer_is_the_exact_top_k_of_the_probed_lists(metric):
    """At nprobe p a query's answer is the exact top k of the vectors stored in the p lists whose centroids
    score highest against it; and every vector sits in the list of (one of) its best centroids."""
    x, q = clustered(4, 2500, 16), clustered(5, 30, 16)
    s = trained(x, nlist=20, metric=metric)
    c = s.centroids.astype(np.float64)
    xs = ref.normalize(x) if metric == "cosine" else x.astype(np.float64)
    qs = ref.normalize(q) if metric == "cosine" else q.astype(np.float64)
    lists = members(s)
    for lst, ids in lists.items():  # the assignment: highest centroid score, up to float32 rounding
        cs = ref.normalize(xs[ids]) @ c.T
        assert (cs[:, lst] >= cs.max(axis=1) - 1e-5).all()
    coarse = qs @ c.T
    for nprobe in (1, 3, 7):
        scores, got = s.search(q, 12, nprobe=nprobe)
        for i in range(q.shape[0]):
            order = np.argsort(-coarse[i], kind="stable")
            if coarse[i, order[nprobe - 1]] - coarse[i, order[nprobe]] < 1e-5:
                continue  # the p-th and (p+1)-th lists tie within rounding: either may be probed
            ids = np.concatenate([lists[lst] for lst in order[:nprobe]])
            ref.check_topk(scores[i : i + 1], got[i : i + 1], qs[i : i + 1], xs[ids], 12, vector_ids=ids,
                           atol=1e-4)


def test_recall_on_clustered_data_at_moderate_nprobe():
    """100 clusters cut by 32 lists (measured: recall@10 0.85 at nprobe 1, 0.96 at 4, 0.99 at 8)."""
    x, q = clustered(6, 6000, 32, centres=100, noise=0.8), clustered(7, 200, 32, centres=100, noise=0.8)
    s = trained(x, nlist=32)
    _, truth = ref.topk_ip(ref.normalize(q), ref.normalize(x), 10)
    got = {p: recall(s.search(q, 10, nprobe=p)[1], truth) for p in (1, 4, 8, 32)}
    assert got[32] == 1.0
    assert got[8] >= 0.97 and got[4] >= 0.93, got
    assert got[1] < got[4] < got[32], got  # the knob does something
    s.nprobe = 4
    assert recall(s.search(q, 10)[1], truth) == got[4]  # the attribute is the default


def test_untrained_index_scans_everything_then_trains_itself():
    nlist = 8
    x = clustered(8, 400, 12)
    s = IVFSearcher(12, nlist=nlist, nprobe=1)
    s.add(x[:100])
    assert not s.is_trained and s.centroids is None and s.list_sizes.tolist() == [100]
    q = clustered(9, 20, 12)
    scores, ids = s.search(q, 5)  # one list, always scanned: exact
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x[:100]), 5)
    threshold = TRAIN_MIN_PER_LIST * nlist
    s.add(x[100:threshold - 1])
    assert not s.is_trained
    s.add(x[threshold - 1 :])  # reaches TRAIN_MIN_PER_LIST vectors per list
    assert s.is_trained and s.centroids.shape == (nlist, 12) and s.list_sizes.sum() == 400
    assert sorted(s.ids.tolist()) == list(range(400))
    scores, ids = s.search(q, 5, nprobe=nlist)
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x), 5)


def test_retraining_moves_the_stored_vectors():
    x = clustered(10, 1500, 16)
    s = trained(x[:800], nlist=8)
    s.add(x[800:])
    before = s.centroids
    s.train(clustered(11, 3000, 16, centres=9))
    assert not np.array_equal(before, s.centroids) and len(s) == 1500 and s.list_sizes.sum() == 1500
    q = clustered(12, 10, 16)
    scores, ids = s.search(q, 10, nprobe=8)
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x), 10)


# -- padding, empty, bad input -----------------------------------------------------------------------


def test_empty_index_answers_padding():
    for s in (IVFSearcher(8, nlist=4), trained(data(0, 50, 8), nlist=4)):
        s.remove(np.arange(50))
        scores, ids = s.search(data(1, 3, 8), 4)
        assert ids.tolist() == [[-1] * 4] * 3 and np.isneginf(scores).all()
        assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_k_beyond_the_probed_vectors_is_padded():
    x = clustered(13, 300, 8, centres=4, noise=0.2)
    s = trained(x, nlist=4)
    q = x[:5]
    scores, ids = s.search(q, 500, nprobe=1)  # one list holds fewer than 500 vectors
    assert scores.shape == (5, 500)
    sizes = s.list_sizes
    for i in range(5):
        hits = int((ids[i] >= 0).sum())
        assert hits in sizes.tolist() and (ids[i, hits:] == -1).all() and np.isneginf(scores[i, hits:]).all()
    scores, ids = s.search(q, 500, nprobe=4)  # every list: all 300, then padding
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x), 500)
    assert s.search(q, 10**12, nprobe=4)[1].shape == (5, 1024)  # the answer width follows the index


@pytest.mark.parametrize("kwargs, match", [
    ({"nlist": 0}, "nlist must be a positive int, got 0"),
    ({"nprobe": -1}, "nprobe must be a positive int, got -1"),
    ({"nlist": 2.0}, r"nlist must be a positive int, got 2\.0"),
    ({"metric": "l2"}, r"metric must be one of \('cosine', 'ip'\), got 'l2'"),
    ({"train_size": 3, "nlist": 4}, "train_size must be at least nlist \\(4\\), got 3"),
    ({"seed": -2}, "seed must be an int >= 0, got -2"),
])
def test_bad_construction_is_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        IVFSearcher(8, **kwargs)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_vectors_are_stored_as_the_exact_searcher_stores_them(metric):
    """float16/32/64 input, tiny and huge float64 rows, zero rows: the stored rows are the Searcher's (the fast
    coercion path agrees with the numpy one to float32 rounding)."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((60, 9)) * 10.0 ** rng.integers(-3, 3, size=(60, 1))
    x[3] = 0
    if metric == "cosine":
        x[4] *= 1e-200  # squares underflow float64: scaled first
        x[5] *= 1e17  # squares beyond float32, fine in float64
    small = x.copy()
    small[4:6] = x[6:8]  # float16 holds neither the tiny nor the huge row
    inputs = [x, x.astype(np.float32), small.astype(np.float16), np.asfortranarray(x)]
    for given in inputs:
        s, exact = IVFSearcher(9, metric=metric, nlist=4), Searcher(9, metric=metric)
        ids = s.add(given)
        exact.add(given)
        np.testing.assert_allclose(s.get(ids), exact.get(ids), rtol=2e-7, atol=1e-30)
        q = given[:7]
        np.testing.assert_allclose(s.search(q, 5)[0], exact.search(q, 5)[0], rtol=1e-5, atol=1e-5)
    if metric == "ip":
        big = np.ones((3, 9))
        big[1] = 2e19  # squared norm beyond float32's range
        with pytest.raises(InputError, match=r"squared norm beyond float32's range .* in rows \[1\] \(1 in all\)"):
            IVFSearcher(9, metric="ip").add(big)
    with pytest.raises(InputError, match=r"vectors contain NaN or inf \(after casting to float32\) in rows \[0, 2\]"):
        IVFSearcher(9, metric=metric).add(np.array([[1e39] * 9, [1.0] * 9, [np.inf] * 9]))


def test_bad_input_is_refused_and_changes_nothing():
    s = trained(data(0, 200, 8), nlist=4)
    with pytest.raises(InputError, match="training needs at least nlist = 4 vectors, got 3"):
        s.train(data(1, 3, 8))
    with pytest.raises(InputError, match=r"vectors contain NaN or inf .* in rows \[1\]"):
        s.add(np.array([[1.0] * 8, [np.nan] * 8]))
    with pytest.raises(InputError, match="id 5 is already in the index"):
        s.add(data(2, 2, 8), ids=[300, 5])
    with pytest.raises(InputError, match="must be a real floating-point array"):
        s.search(np.ones((2, 8), np.int32), 3)
    with pytest.raises(InputError, match="nprobe must be a positive int, got 0"):
        s.search(data(3, 2, 8), 3, nprobe=0)
    with pytest.raises(InputError, match="k must be a positive int"):
        s.search(data(3, 2, 8), 0)
    with pytest.raises(InputError, match="nprobe must be a positive int"):
        s.nprobe = True
    assert len(s) == 200 and 300 not in s


# -- ids, add and remove ---------------------------------------------------------------------------


def test_adds_and_removes_match_the_oracle_over_the_stored_vectors():
    """Many small adds (lists outgrow their slack and the layout is rebuilt), removals, explicit and automatic
    ids; after each step every list probed gives the oracle's answer over exactly the vectors stored."""
    rng = np.random.default_rng(14)
    d = 16
    pool = clustered(15, 4000, d)
    s = trained(pool[:500], nlist=8)
    stored = dict(zip(range(500), range(500)))  # id -> row of pool
    highest, nxt_row = 499, 500
    q = clustered(16, 25, d)
    for step in range(30):
        m = int(rng.integers(1, 120))
        if step % 3 == 0:
            new = [10**9 + step * 1000 + j for j in range(m)]
            assert s.add(pool[nxt_row : nxt_row + m], ids=new).tolist() == new
        else:
            new = s.add(pool[nxt_row : nxt_row + m]).tolist()
            assert new == list(range(highest + 1, highest + 1 + m))  # one past the highest ever assigned
        highest = max(highest, *new)
        stored.update(zip(new, range(nxt_row, nxt_row + m)))
        nxt_row += m
        gone = rng.choice(sorted(stored), size=int(rng.integers(0, 60)), replace=False).tolist()
        assert s.remove(gone + [-7, 10**15]) == len(gone)  # unknown ids are ignored
        for g in gone:
            del stored[g]
        ids = np.array(sorted(stored))
        xs = ref.normalize(pool[[stored[i] for i in ids]])
        assert len(s) == len(ids) and sorted(s.ids.tolist()) == ids.tolist() and s.list_sizes.sum() == len(ids)
        scores, got = s.search(q, 10, nprobe=8)
        ref.check_topk(scores, got, ref.normalize(q), xs, 10, vector_ids=ids)
        probe = ids[:: max(1, len(ids) // 7)]
        np.testing.assert_allclose(s.get(probe), xs[:: max(1, len(ids) // 7)], atol=1e-6)
    assert s.remove(gone) == 0  # removing twice is harmless
    with pytest.raises(KeyError, match="id -3 is not in the index"):
        s.get([-3])


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("state", ["trained", "untrained", "empty"])
def test_save_load_round_trip_answers_identically(tmp_path, metric, state):
    x = clustered(17, 900, 12)
    ids = np.random.default_rng(18).permutation(10**5)[:900]
    if state == "trained":
        s = trained(x, nlist=8, metric=metric, ids=ids, nprobe=3)
        s.remove(ids[::5])
    else:
        s = IVFSearcher(12, nlist=8, metric=metric, nprobe=3)
        if state == "untrained":
            s.add(x[:100], ids=ids[:100])
    path = tmp_path / "i.lkv"
    s.save(path)
    t = IVFSearcher.load(path)
    assert (t.dim, t.metric, t.nlist, t.nprobe, t.is_trained, len(t)) == (
        12, metric, 8, 3, s.is_trained, len(s))
    assert sorted(t.ids.tolist()) == sorted(s.ids.tolist()) and t.list_sizes.tolist() == s.list_sizes.tolist()
    q = clustered(19, 20, 12)
    for nprobe in (1, 3, 8):
        a, b = s.search(q, 7, nprobe=nprobe), t.search(q, 7, nprobe=nprobe)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    more = t.add(x[:50])  # a loaded index goes on growing, numbering on from the saved next_id
    assert np.array_equal(more, s.add(x[:50]))
    t.save(path)  # overwrite
    assert len(IVFSearcher.load(path)) == len(t)


def write_ivf(path, *, centroids, offsets, ids, vectors, metric="cosine", nlist=None, next_id=None, version=2,
              digests=None, **fields):
    """An IVF index file laid out as ``save`` writes it (``version`` 2; 1: as it wrote before), with correct
    digests over whatever it is given (``digests`` overrides some section digests)."""
    ids = np.asarray(ids, dtype="<i8")
    vectors = np.asarray(vectors, dtype="<f4").reshape(len(ids), -1)
    centroids = np.asarray(centroids, dtype="<f4").reshape(-1, vectors.shape[1])
    offsets = np.asarray(offsets, dtype="<i8")
    header = {"format_version": version, "dim": vectors.shape[1], "metric": metric, "count": len(ids),
              "next_id": int(ids.max()) + 1 if next_id is None else next_id,
              "nlist": len(centroids) if nlist is None else nlist, "nprobe": 2, "train_size": 64 * len(centroids),
              "seed": 0, "trained": len(centroids) > 0, **fields}
    sections = [centroids.tobytes(), offsets.tobytes(), ids.tobytes(), vectors.tobytes()]
    payload = b"".join(sections)
    if version == 1:
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + payload).hexdigest()
        path.write_bytes(MAGIC + json.dumps({**header, "sha256": digest}, sort_keys=True).encode() + b"\n" + payload)
        return path
    header["section_sha256"] = {name: hashlib.sha256(b).hexdigest()
                                for name, b in zip(("centroids", "offsets", "ids", "vectors"), sections)}
    header["section_sha256"].update(digests or {})
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    line = MAGIC + json.dumps({**header, "sha256": digest}, sort_keys=True).encode()
    path.write_bytes(line + b" " * (-(len(line) + 1) % 64) + b"\n" + payload)
    return path


def small_index():
    """A trained index with nlist 2 as the arrays ``save`` writes: unit centroids +-e0, 6 unit vectors."""
    c = np.zeros((2, 4), np.float32)
    c[0, 0], c[1, 0] = 1, -1
    v = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [2, 0, 0, 1], [-1, 1, 0, 0], [-1, 0, 1, 0], [-2, 1, 1, 1]], np.float64)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return {"centroids": c, "offsets": [0, 3, 6], "ids": [4, 9, 1, 0, 7, 3], "vectors": v}


def test_write_ivf_lays_out_what_save_writes(tmp_path):
    """The crafting helper is checked against save itself: same bytes for the same index."""
    arrays = small_index()
    s = IVFSearcher(4, nlist=2, nprobe=2, train_size=128)
    e0 = np.eye(4, dtype=np.float32)[:1]
    s.train(np.vstack([e0] * 64 + [-e0] * 64))  # two clusters of identical points: centroids +-e0 exactly
    c = s.centroids
    assert sorted(c[:, 0].tolist()) == [-1.0, 1.0] and (c[:, 1:] == 0).all()
    s.add(arrays["vectors"], ids=arrays["ids"])
    labels = np.argmax(arrays["vectors"] @ c.T, axis=1)
    order = np.argsort(labels, kind="stable")  # list by list, in insertion order within a list
    s.save(tmp_path / "saved.lkv")
    crafted = write_ivf(tmp_path / "crafted.lkv", centroids=c, offsets=[0, 3, 6],
                        ids=np.asarray(arrays["ids"])[order], vectors=arrays["vectors"][order])
    assert crafted.read_bytes() == (tmp_path / "saved.lkv").read_bytes()
    t = IVFSearcher.load(write_ivf(crafted, **arrays))
    assert t.search(arrays["vectors"][:1], 1, nprobe=1)[1].tolist() == [[4]]
    v1 = IVFSearcher.load(write_ivf(tmp_path / "v1.lkv", version=1, **arrays))  # what save wrote before version 2
    assert v1.ids.tolist() == t.ids.tolist() and np.array_equal(v1.get(v1.ids), t.get(t.ids))


@pytest.mark.parametrize("case, message", [
    ("offsets not from 0", r"list offsets must rise from 0 to count 6, got 1 \.\. 6"),
    ("offsets past count", r"list offsets must rise from 0 to count 6, got 0 \.\. 7"),
    ("offsets falling", r"list offsets must rise from 0 to count 6, got 0 \.\. 6 \(list 1 would hold -1 vectors\)"),
    ("duplicate id", r"id 9 is stored 2 times"),
    ("negative id", r"ids must be >= 0, found -4"),
    ("next_id too low", r"next_id 5 is not above the largest id 9"),
    ("NaN vector", r"vectors hold NaN or inf in rows \[2\]"),
    ("non-unit cosine vector", r"a cosine index stores unit \(or zero\) vectors, but rows \[5\]"),
    ("non-unit centroid", r"centroids must be finite unit \(or zero\) vectors, but rows \[1\]"),
    ("NaN centroid", r"centroids must be finite unit \(or zero\) vectors, but rows \[0\]"),
])
def test_crafted_files_with_a_correct_checksum_but_impossible_contents_are_refused(tmp_path, case, message):
    arrays = small_index()
    fields = {}
    if case == "offsets not from 0":
        arrays["offsets"] = [1, 3, 6]
    elif case == "offsets past count":
        arrays["offsets"] = [0, 3, 7]
    elif case == "offsets falling":
        arrays["offsets"] = [0, 5, 4, 6]
        arrays["centroids"] = np.vstack([arrays["centroids"], np.eye(4, dtype=np.float32)[1:2]])
    elif case == "duplicate id":
        arrays["ids"] = [4, 9, 1, 0, 9, 3]
    elif case == "negative id":
        arrays["ids"] = [4, 9, 1, -4, 7, 3]
    elif case == "next_id too low":
        fields["next_id"] = 5
    elif case == "NaN vector":
        arrays["vectors"][2, 1] = np.nan
    elif case == "non-unit cosine vector":
        arrays["vectors"][5] *= 1.01
    elif case == "non-unit centroid":
        arrays["centroids"][1] *= 0.5
    elif case == "NaN centroid":
        arrays["centroids"][0, 3] = np.nan
    path = write_ivf(tmp_path / "i.lkv", **arrays, **fields)
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index: {message}"):
        IVFSearcher.load(path)


@pytest.mark.parametrize("field, value", [
    ("count", 6.0), ("dim", True), ("nlist", 0), ("nprobe", "2"), ("next_id", -1), ("trained", 1),
    ("metric", "l2"), ("train_size", 1), ("seed", None),
])
def test_header_fields_of_the_wrong_type_are_refused(tmp_path, field, value):
    path = write_ivf(tmp_path / "i.lkv", **small_index(), **{field: value})
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index header \({field}={value!r}"):
        IVFSearcher.load(path)


def test_damaged_files_are_refused(tmp_path):
    s = trained(clustered(20, 300, 8), nlist=4)
    path = tmp_path / "i.lkv"
    s.save(path)
    good = path.read_bytes()
    header_end = good.index(b"\n") + 1
    for name, bad, message in [
        ("flipped payload byte", good[:-9] + bytes([good[-9] ^ 1]) + good[-8:], "checksum mismatch"),
        ("flipped centroid byte", good[: header_end + 5] + bytes([good[header_end + 5] ^ 0x10])
         + good[header_end + 6 :], "checksum mismatch"),
        ("truncated", good[:-4], r"truncated or damaged index: payload is \d+ bytes, header says \d+"),
        ("appended", good + b"\0" * 8, r"truncated or damaged index: payload is \d+ bytes"),
        ("header only", good[:header_end], r"payload is 0 bytes"),
        ("edited header", good.replace(b'"nprobe": 16', b'"nprobe": 17'), "checksum mismatch"),
        ("other version", good.replace(b'"format_version": 2', b'"format_version": 4'),  # 3: compressed
         "IVF index format version 4; this build reads versions 1, 2 and 3"),
        ("not json", MAGIC + b"{oops\n", r"damaged index header"),
        ("empty", b"", "is not a lookalike IVF index file"),
    ]:
        path.write_bytes(bad)
        with pytest.raises(IndexFileError, match=message):
            IVFSearcher.load(path)
    exact = Searcher(8)
    exact.save(tmp_path / "exact.lkx")
    with pytest.raises(IndexFileError, match="is not a lookalike IVF index file"):
        IVFSearcher.load(tmp_path / "exact.lkx")
    with pytest.raises(IndexFileError, match="cannot read index file .*missing"):
        IVFSearcher.load(tmp_path / "missing.lkv")


def test_a_huge_count_in_the_header_is_refused_without_reading(tmp_path):
    path = write_ivf(tmp_path / "i.lkv", **small_index(), count=10**15)  # checksum fits the edited header
    with pytest.raises(IndexFileError, match=r"payload is 200 bytes, header says 24000000000000056"):
        IVFSearcher.load(path)


# -- concurrency -----------------------------------------------------------------------------------


def test_concurrent_searches_during_adds_removes_and_retraining():
    """4 threads search with every list probed while 1 thread adds and removes vectors that never enter the
    top k (they point the other way; lists outgrow their slack) and retrains once. Every answer must be the
    oracle's over the fixed base vectors (up to float32 near-ties)."""
    rng = np.random.default_rng(21)
    d, k, nlist = 32, 10, 8
    base = np.hstack([np.ones((3000, 1)), 0.1 * rng.standard_normal((3000, d - 1))]).astype(np.float32)
    probes = np.hstack([np.ones((40, 1)), 0.1 * rng.standard_normal((40, d - 1))]).astype(np.float32)
    far = np.hstack([-np.ones((4000, 1)), 0.1 * rng.standard_normal((4000, d - 1))]).astype(np.float32)
    nb, nq = ref.normalize(base), ref.normalize(probes)
    want_scores, want_rows = ref.topk_ip(nq, nb, k)
    assert (ref.normalize(far) @ nq.T).max() < want_scores[:, -1].min()

    s = IVFSearcher(d, nlist=nlist, nprobe=nlist, threads=2)
    s.train(np.vstack([base[:600], far[:600]]))
    s.add(base)
    far_ids = np.arange(10**6, 10**6 + 4000)
    present = []
    stop = threading.Event()
    failures, count = [], [0]

    def reader(batch):
        rrng = np.random.default_rng(batch)
        while not stop.is_set():
            i0 = int(rrng.integers(0, nq.shape[0] - batch + 1))
            scores, ids = s.search(probes[i0 : i0 + batch], k)
            if not (np.array_equal(ids, want_rows[i0 : i0 + batch])
                    and np.allclose(scores, want_scores[i0 : i0 + batch], atol=1e-5, rtol=0)):
                try:
                    ref.check_topk(scores, ids, nq[i0 : i0 + batch], nb, k)
                except AssertionError as e:
                    failures.append((batch, i0, str(e)))
            count[0] += 1

    def writer():
        wrng = np.random.default_rng(1)
        nxt = 0
        try:
            for step in range(60):
                m = int(wrng.integers(1, 60))
                s.add(far[nxt : nxt + m], ids=far_ids[nxt : nxt + m])
                present.extend(far_ids[nxt : nxt + m].tolist())
                nxt += m
                drop = wrng.choice(len(present), size=min(len(present), int(wrng.integers(1, 30))), replace=False)
                gone = [present[i] for i in drop]
                assert s.remove(gone) == len(gone)
                for g in gone:
                    present.remove(g)
                if step == 30:
                    s.train(np.vstack([base[1000:1400], far[:400]]))
        except BaseException as e:  # noqa: BLE001
            failures.append(("writer", repr(e)))
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(b,)) for b in (1, 3, 17, 40)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"{len(failures)} inconsistent answers, first: {failures[0][:2]}"
    assert count[0] > 4 and len(s) == 3000 + len(present)
