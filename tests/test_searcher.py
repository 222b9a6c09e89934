"""engine.Searcher: exactness against the float64 oracle, the id and storage contract, bad input, files,
and concurrent use."""

import hashlib
import json
import threading

import numpy as np
import pytest
import reference as ref

from engine.errors import IndexFileError, InputError, ModelError
from engine.searcher import FORMAT_VERSION, MAGIC, MAX_META_BYTES, FileStamp, Searcher, meta_text


def data(seed, n, d):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# -- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("d", [1, 3, 97, 256])
@pytest.mark.parametrize("nq", [1, 7, 1024])
def test_search_matches_oracle(metric, d, nq):
    rng = np.random.default_rng(d + nq)
    x = data(d, 2000, d)
    q = data(d + 1, nq, d)
    s = Searcher(d, metric=metric)
    ids = rng.permutation(10**6)[:2000]
    assert s.add(x, ids=ids).tolist() == ids.tolist()
    scores, got = s.search(q, 10)
    if metric == "cosine":
        x, q = ref.normalize(x), ref.normalize(q)
    atol = 1e-5 if metric == "cosine" else 1e-5 * max(1.0, float(np.abs(x).sum(1).max() * np.abs(q).max()))
    ref.check_topk(scores, got, q, x, 10, vector_ids=ids, atol=atol)


def test_search_after_adds_and_removes_matches_oracle():
    x = data(0, 3000, 24)
    s = Searcher(24)
    s.add(x[:1000])
    s.add(x[1000:])
    gone = np.random.default_rng(1).choice(3000, size=700, replace=False)
    assert s.remove(gone) == 700
    keep = np.setdiff1d(np.arange(3000), gone)
    q = data(2, 40, 24)
    scores, ids = s.search(q, 25)
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x[keep]), 25, vector_ids=keep)


def test_exact_ties_ordered_by_row():
    """Duplicated vectors tie exactly; the earlier stored one (lower row) comes first."""
    base = np.eye(4, dtype=np.float32)
    s = Searcher(4)
    s.add(np.vstack([base, base]), ids=[10, 11, 12, 13, 20, 21, 22, 23])
    scores, ids = s.search(np.array([1, 0, 0, 0], np.float32), 3)
    assert ids.tolist() == [[10, 20, 11]]
    assert scores.tolist() == [[1.0, 1.0, 0.0]]


def test_one_query_as_1d_is_answered_2d():
    s = Searcher(3)
    s.add(np.eye(3, dtype=np.float32))
    scores, ids = s.search(np.array([0.0, 2.0, 0.0]), 2)
    assert scores.shape == (1, 2) and ids.shape == (1, 2)
    assert ids[0, 0] == 1 and scores[0, 0] == pytest.approx(1.0)


def test_empty_index_answers_padding():
    s = Searcher(5)
    scores, ids = s.search(data(0, 3, 5), 4)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert (ids == -1).all() and np.isneginf(scores).all() and ids.shape == (3, 4)


def test_k_beyond_count_is_padded():
    s = Searcher(5)
    x = data(0, 3, 5)
    s.add(x)
    scores, ids = s.search(x[:2], 6)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2] and ids[0, 0] == 0 and ids[1, 0] == 1


def test_zero_vectors_score_zero_and_stay_zero():
    s = Searcher(4)
    x = np.array([[0, 0, 0, 0], [3, 4, 0, 0], [0, 0, 0, 2]], np.float32)
    s.add(x)
    np.testing.assert_array_equal(s.get([0]), np.zeros((1, 4), np.float32))
    np.testing.assert_allclose(s.get([1]), [[0.6, 0.8, 0, 0]], rtol=1e-6)
    scores, ids = s.search(np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.float32), 3)
    assert ids[0].tolist() == [0, 1, 2] and scores[0].tolist() == [0.0, 0.0, 0.0]  # zero query: row order
    assert ids[1].tolist() == [1, 0, 2]
    np.testing.assert_allclose(scores[1], [0.6, 0.0, 0.0], rtol=1e-6)


def test_ip_metric_keeps_magnitudes():
    s = Searcher(2, metric="ip")
    s.add(np.array([[1, 0], [3, 0], [0, 5]], np.float32))
    scores, ids = s.search(np.array([2.0, 1.0], np.float32), 3)
    assert ids.tolist() == [[1, 2, 0]] and scores.tolist() == [[6.0, 5.0, 2.0]]
    np.testing.assert_array_equal(s.get([2]), [[0, 5]])


def test_float16_and_float64_are_cast():
    s = Searcher(3, metric="ip")
    s.add(np.array([[1, 2, 3]], np.float16))
    s.add(np.array([[0.1, 0.2, 0.3]], np.float64))
    assert s.get([0, 1]).dtype == np.float32
    np.testing.assert_array_equal(s.get([1]), np.array([[0.1, 0.2, 0.3]], np.float32))
    scores, ids = s.search(np.array([1, 0, 0], np.float64), 1)
    assert ids.tolist() == [[0]] and scores.dtype == np.float32


# -- ids, remove, get ----------------------------------------------------------------------------


def test_generated_ids_continue_past_the_highest():
    s = Searcher(2)
    assert s.add(data(0, 3, 2)).tolist() == [0, 1, 2]
    assert s.add(data(1, 2, 2), ids=[10, 7]).tolist() == [10, 7]
    assert s.add(data(2, 2, 2)).tolist() == [11, 12]
    s.remove([12, 11])
    assert s.add(data(3, 1, 2)).tolist() == [13]  # never reused
    assert s.add(np.zeros((0, 2), np.float32)).tolist() == []
    assert len(s) == 6 and s.ids.tolist() == [0, 1, 2, 10, 7, 13]


def test_duplicate_ids_are_refused_and_nothing_is_added():
    s = Searcher(2)
    s.add(data(0, 3, 2), ids=[5, 6, 7])
    with pytest.raises(InputError, match="id 6 is already in the index"):
        s.add(data(1, 2, 2), ids=[100, 6])
    with pytest.raises(InputError, match="id 9 is given more than once"):
        s.add(data(1, 3, 2), ids=[9, 1, 9])
    assert len(s) == 3 and s.ids.tolist() == [5, 6, 7]
    assert s.add(data(1, 1, 2)).tolist() == [8]  # the refused calls used up no ids


@pytest.mark.parametrize(
    "ids, match",
    [
        ([1.0, 2.0], "ids must be integers, got dtype float64"),
        ([[1, 2]], r"ids must be a 1-D array of ints, got shape \(1, 2\)"),
        ([1, 2, 3], "got 2 vectors but 3 ids"),
        ([-1, 4], "ids must be >= 0"),
    ],
)
def test_bad_ids_are_refused(ids, match):
    s = Searcher(2)
    with pytest.raises(InputError, match=match):
        s.add(data(0, 2, 2), ids=ids)
    assert len(s) == 0


def test_remove_counts_and_ignores_unknown_ids():
    s = Searcher(3)
    x = data(0, 6, 3)
    s.add(x)
    assert s.remove([1, 99, 1, 4]) == 2  # 99 unknown, the second 1 already gone
    assert s.remove([1]) == 0
    assert s.remove([]) == 0
    assert len(s) == 4 and sorted(s.ids.tolist()) == [0, 2, 3, 5]
    np.testing.assert_allclose(s.get([5, 0]), ref.normalize(x[[5, 0]]), rtol=1e-6)  # 5 moved into a hole
    with pytest.raises(KeyError, match="id 4 is not in the index"):
        s.get([4])
    scores, ids = s.search(x[5], 1)
    assert ids.tolist() == [[5]]


def test_remove_everything_then_reuse():
    s = Searcher(3)
    s.add(data(0, 5, 3))
    assert s.remove(np.arange(5)) == 5
    assert len(s) == 0
    assert (s.search(data(1, 1, 3), 2)[1] == -1).all()
    assert s.add(data(2, 1, 3)).tolist() == [5]


def test_get_returns_in_asked_order_and_names_unknown_ids():
    s = Searcher(2, metric="ip")
    x = data(0, 4, 2)
    s.add(x, ids=[40, 30, 20, 10])
    np.testing.assert_array_equal(s.get([10, 40]), x[[3, 0]])
    np.testing.assert_array_equal(s.get(30), x[[1]])  # a scalar id gives one row
    with pytest.raises(KeyError, match="id 77 is not in the index"):
        s.get([10, 77])


def test_ids_property_is_a_copy():
    s = Searcher(2)
    s.add(data(0, 3, 2))
    s.ids[:] = 99
    assert s.ids.tolist() == [0, 1, 2] and s.dim == 2 and s.metric == "cosine"


def test_storage_grows_geometrically():
    s = Searcher(2)
    caps = set()
    for i in range(200):
        s.add(data(i, 1, 2))
        caps.add(s._vectors.shape[0])
    assert len(caps) <= 12  # 16, 24, 36, ...: not one reallocation per add
    assert s._vectors.flags.c_contiguous and s._vectors.dtype == np.float32


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 3), np.float32), r"vectors must have shape \(n, 4\), got \(2, 3\)"),
        (np.zeros(4, np.float32), r"vectors must have shape \(n, 4\), got \(4,\)"),
        (np.zeros((2, 2, 4), np.float32), r"vectors must have shape \(n, 4\), got \(2, 2, 4\)"),
        (np.zeros((2, 4), np.int64), "real floating-point array .*got dtype int64"),
        (np.zeros((2, 4), bool), "got dtype bool"),
        (np.zeros((2, 4), complex), "got dtype complex128"),
        (np.zeros((2, 4), object), "got dtype object"),
        ([["a"] * 4], "got dtype <U1"),
    ],
)
def test_bad_vectors_are_refused(x, match):
    s = Searcher(4)
    s.add(data(0, 2, 4))
    with pytest.raises(InputError, match=match):
        s.add(x)
    assert len(s) == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])  # 1e39 overflows float32
def test_nan_and_inf_are_refused_naming_rows(bad):
    s = Searcher(3)
    x = data(0, 12, 3)
    x = x.astype(np.float64)
    x[[2, 9], 1] = bad
    with pytest.raises(InputError, match=r"NaN or inf .* rows \[2, 9\] \(2 in all\)"):
        s.add(x)
    assert len(s) == 0
    s.add(data(1, 3, 3))
    with pytest.raises(InputError, match=r"queries contain NaN or inf .* rows \[2, 9\]"):
        s.search(x, 1)


def test_ip_refuses_norms_that_would_overflow():
    s = Searcher(2, metric="ip")
    with pytest.raises(InputError, match=r"squared norm beyond float32's range .* rows \[1\]"):
        s.add(np.array([[1, 1], [3e19, 3e19]], np.float32))
    assert len(s) == 0


@pytest.mark.parametrize(
    "q, match",
    [
        (np.zeros(3, np.float32), r"one query must have shape \(4,\), got \(3,\)"),
        (np.zeros((1, 5), np.float32), r"queries must have shape \(n, 4\), got \(1, 5\)"),
        (np.zeros((1, 1, 4), np.float32), r"queries must have shape \(n, 4\), got \(1, 1, 4\)"),
        (np.zeros((1, 4), np.int32), "got dtype int32"),
    ],
)
def test_bad_queries_are_refused(q, match):
    s = Searcher(4)
    s.add(data(0, 2, 4))
    with pytest.raises(InputError, match=match):
        s.search(q, 1)


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "3", None])
def test_bad_k_is_refused(k):
    s = Searcher(2)
    s.add(data(0, 2, 2))
    with pytest.raises(InputError, match="k must be a positive int"):
        s.search(data(1, 1, 2), k)


@pytest.mark.parametrize("k", [10**13, 2**62])
def test_a_huge_k_is_answered_with_what_the_index_holds(k):
    """The answer stops at max(len(index), 1024) columns (answer_columns): a k that once asked for terabytes
    of padding gets every stored vector, then padding up to 1024 columns."""
    s = Searcher(2)
    x = data(0, 2, 2)
    s.add(x)
    q = data(1, 1, 2)
    scores, ids = s.search(q, k)
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x), 1024)
    assert s.search(q, 3)[1][0].tolist()[2] == -1  # the index is as it was


def test_a_k_beyond_1024_but_within_the_index_is_k():
    x = data(2, 1500, 3)
    s = Searcher(3)
    s.add(x)
    q = data(3, 2, 3)
    scores, ids = s.search(q, 1400)
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x), 1400)
    scores, ids = s.search(q, 5000)  # capped at the index: every vector, no padding
    ref.check_topk(scores, ids, ref.normalize(q), ref.normalize(x), 1500)


def test_the_largest_id_leaves_no_automatic_ids_and_says_so():
    s = Searcher(2)
    s.add(np.ones((1, 2)), ids=[np.iinfo(np.int64).max])
    with pytest.raises(InputError, match=r"no automatic ids left for 1 vectors: the next would be 9223372036854775808"):
        s.add(np.ones((1, 2)))
    assert len(s) == 1
    assert s.add(np.ones((1, 2)), ids=[5]).tolist() == [5]  # explicit ids still work


def test_tiny_float64_vectors_keep_their_direction_under_cosine():
    """Normalised from the float64 values given, not from their float32 casts (subnormal or zero there)."""
    x = np.array([[3e-45, 4e-45], [1.0, 0.0], [1e-200, 1e-200]])
    q = np.array([[4e-45, 3e-45]])
    s = Searcher(2)
    s.add(x)
    scores, ids = s.search(q, 3)
    unit = x / np.abs(x).max(axis=1, keepdims=True)  # scaled exactly (powers of ten aside), then normalised
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    ref = unit @ np.array([0.8, 0.6])  # q's direction: 0.96, 0.8, 0.9899
    assert ids.tolist() == [np.argsort(-ref).tolist()]
    np.testing.assert_allclose(scores[0], np.sort(ref)[::-1], atol=1e-6)
    np.testing.assert_allclose(s.get([2]), [[2**-0.5, 2**-0.5]], rtol=1e-6)


def test_numpy_int_k_is_accepted():
    s = Searcher(2)
    s.add(data(0, 2, 2))
    assert s.search(data(1, 1, 2), np.int64(2))[1].shape == (1, 2)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0,), {}, "dim must be a positive int, got 0"),
        ((2.0,), {}, "dim must be a positive int"),
        ((), {}, "dim is required"),
        ((4,), {"metric": "l2"}, r"metric must be one of \('cosine', 'ip'\), got 'l2'"),
    ],
)
def test_bad_construction_is_refused(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        Searcher(*args, **kwargs)


def test_metric_is_case_insensitive():
    assert Searcher(3, metric="IP").metric == "ip"


# -- files -----------------------------------------------------------------------------------------


def filled(metric="cosine"):
    s = Searcher(7, metric=metric)
    s.add(data(0, 50, 7), ids=np.arange(100, 150))
    s.remove([101, 120])
    return s


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_save_load_round_trip(tmp_path, metric):
    s = filled(metric)
    path = tmp_path / "sub" / "index.lkx"
    s.save(path)
    t = Searcher.load(path)
    assert (t.dim, t.metric, len(t)) == (7, metric, 48)
    np.testing.assert_array_equal(t.ids, s.ids)
    np.testing.assert_array_equal(t.get(t.ids), s.get(s.ids))
    q = data(1, 5, 7)
    for a, b in zip(s.search(q, 6), t.search(q, 6)):
        np.testing.assert_array_equal(a, b)
    assert t.add(data(2, 1, 7)).tolist() == [150]  # next id kept
    assert [p.name for p in path.parent.iterdir()] == ["index.lkx"]  # no temporary file left


def test_save_empty_and_overwrite(tmp_path):
    path = tmp_path / "i.lkx"
    Searcher(3).save(path)
    assert len(Searcher.load(path)) == 0
    filled().save(path)
    assert len(Searcher.load(path)) == 48


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "i.lkx"
    filled().save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(IndexFileError, match=rf"{path}: truncated or damaged index"):
        Searcher.load(path)
    path.write_bytes(raw[:20])
    with pytest.raises(IndexFileError, match=str(path)):
        Searcher.load(path)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_altered_file_is_refused(tmp_path, where):
    path = tmp_path / "i.lkx"
    filled().save(path)
    raw = bytearray(path.read_bytes())
    if where == "payload":
        raw[-5] ^= 0x01
    else:
        raw = bytearray(bytes(raw).replace(b'"metric": "cosine"', b'"metric": "ip"', 1))
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match=rf"{path}: checksum mismatch"):
        Searcher.load(path)


def test_other_format_version_is_refused(tmp_path):
    path = tmp_path / "i.lkx"
    filled().save(path)
    raw = path.read_bytes()
    line, body = raw.split(b"\n", 1)
    header = json.loads(line[len(MAGIC) :])
    header["format_version"] = FORMAT_VERSION + 2  # 4 is the compressed index's (tests/test_compressed.py)
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + body)
    with pytest.raises(IndexFileError, match=rf"{path}: index format version 5; this build reads versions 1, 2, 3 and 4"):
        Searcher.load(path)


def test_foreign_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "not_an_index.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(IndexFileError, match=rf"{path} is not a lookalike index file"):
        Searcher.load(path)
    path.write_bytes(MAGIC + b"[1, 2]\n")
    with pytest.raises(IndexFileError, match="damaged index header"):
        Searcher.load(path)
    with pytest.raises(IndexFileError, match=r"cannot read index file .*missing\.lkx"):
        Searcher.load(tmp_path / "missing.lkx")


def write_index(path, ids, vectors, *, metric="cosine", next_id=None, **fields):
    """A version-1 index file (as ``save`` laid it out before version 2), with a correct sha256 over whatever it is given (crafted files
    that only the contents checks can refuse). ``fields`` override the header's values."""
    ids = np.asarray(ids, dtype="<i8")
    vectors = np.asarray(vectors, dtype="<f4").reshape(len(ids), -1)
    header = {"format_version": 1, "dim": vectors.shape[1], "metric": metric, "count": len(ids),
              "next_id": int(ids.max()) + 1 if next_id is None else next_id, "model": None, **fields}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + ids.tobytes() + vectors.tobytes())
    path.write_bytes(MAGIC + json.dumps({**header, "sha256": digest.hexdigest()}, sort_keys=True).encode() + b"\n"
                     + ids.tobytes() + vectors.tobytes())
    return path


def unit_rows(seed, n, d):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_write_index_lays_out_what_save_writes(tmp_path):
    """The crafting helpers are checked against save itself: the v3 helper gives the same bytes for the same
    index; the v2 and v1 helpers' files (what save wrote before versions 3 and 2) load as the same index."""
    s = Searcher(4)
    x = unit_rows(0, 5, 4)
    s.add(x, ids=[3, 10, 0, 7, 2])
    s.save(tmp_path / "saved.lkx")
    crafted = write_index_v3(tmp_path / "v3.lkx", [3, 10, 0, 7, 2], s.get([3, 10, 0, 7, 2]))
    assert crafted.read_bytes() == (tmp_path / "saved.lkx").read_bytes()
    s.add(unit_rows(1, 2, 4), ids=[20, 21], meta=["a", None], stamps=[None, FileStamp(5, -7, bytes(range(32)))])
    s.save(tmp_path / "saved.lkx")
    crafted = write_index_v3(tmp_path / "v3.lkx", s.ids, s.get(s.ids), meta=s.meta(), stamps=s.stamps())
    assert crafted.read_bytes() == (tmp_path / "saved.lkx").read_bytes()
    v2 = Searcher.load(write_index_v2(tmp_path / "v2.lkx", s.ids, s.get(s.ids), meta=s.meta(), stamps=s.stamps()))
    assert v2.ids.tolist() == s.ids.tolist() and v2.meta() == s.meta() and v2.stamps() == s.stamps()
    np.testing.assert_array_equal(v2.get(v2.ids), s.get(s.ids))
    v1 = Searcher.load(write_index(tmp_path / "v1.lkx", [3, 10, 0, 7, 2], x))
    assert v1.ids.tolist() == [3, 10, 0, 7, 2] and v1.meta() == [None] * 5 and v1.stamps() == [None] * 5
    np.testing.assert_array_equal(v1.get(v1.ids), s.get([3, 10, 0, 7, 2]))


@pytest.mark.parametrize("case, message", [
    ("negative id", r"ids must be >= 0, found -5 \(row 1\)"),
    ("duplicate id", r"id 3 is stored 2 times \(1 ids repeated\)"),
    ("next_id at the largest id", r"next_id 9 is not above the largest id 9 \(the next automatic id would repeat"),
    ("next_id below the largest id", r"next_id 4 is not above the largest id 9"),
    ("NaN", r"vectors hold NaN or inf in rows \[1\] \(1 in all\)"),
    ("inf", r"vectors hold NaN or inf in rows \[0, 2\] \(2 in all\)"),
    ("non-unit cosine", r"a cosine index stores unit \(or zero\) vectors, but rows \[2\] \(1 in all\) have norms "
                        r"further than 1e-06 from 1 \(row 2: 1.00001"),
    ("half-length cosine", r"a cosine index .* rows \[0, 1, 2\] \(3 in all\) have norms .* \(row 0: 0.5"),
    ("ip overflow", r"vectors have a squared norm beyond float32's range in rows \[1\]"),
])
def test_a_file_with_a_correct_checksum_but_impossible_contents_is_refused(tmp_path, case, message):
    """What add could never have stored is refused by load, naming the problem, even when the checksum fits:
    otherwise the next automatic add repeats an id, or search returns one id twice or scores above 1."""
    ids, x, metric, next_id = [0, 9, 3], unit_rows(1, 3, 5), "cosine", None
    if case == "negative id":
        ids = [0, -5, 3]
    elif case == "duplicate id":
        ids = [3, 9, 3]
    elif case == "next_id at the largest id":
        next_id = 9
    elif case == "next_id below the largest id":
        next_id = 4
    elif case == "NaN":
        x[1, 2] = np.nan
    elif case == "inf":
        x[0, 0], x[2, 4] = np.inf, -np.inf
    elif case == "non-unit cosine":
        x[2] *= np.float32(1.00001)  # 160 times float32's rounding of a unit row
    elif case == "half-length cosine":
        x *= np.float32(0.5)
    elif case == "ip overflow":
        metric = "ip"
        x[1] = 3e19  # squared norm 4.5e39 > float32 max 3.4e38: its scores could overflow
    path = write_index(tmp_path / "i.lkx", ids, x, metric=metric, next_id=next_id)
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index: {message}"):
        Searcher.load(path)


@pytest.mark.parametrize("field, value", [
    ("count", 3.0), ("dim", True), ("next_id", -1), ("next_id", 2**63 + 1), ("next_id", "10"), ("model", "mpnn"),
])
def test_header_fields_of_the_wrong_type_are_refused(tmp_path, field, value):
    path = write_index(tmp_path / "i.lkx", [0, 9, 3], unit_rows(1, 3, 5), **{field: value})
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index header \(.*{field}={value!r}"):
        Searcher.load(path)


def test_what_add_can_store_loads_from_a_crafted_file(tmp_path):
    """The checks refuse nothing add stores: ids far beyond the count (removals leave gaps), zero vectors,
    the largest id with next_id one past int64, and unit rows rounded to float32 from every scale."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 97)) * 10.0 ** rng.integers(-30, 30, size=(300, 1))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # float64 normalised, then rounded
    x[5] = 0
    ids = rng.permutation(10**6)[:300]
    ids[7] = np.iinfo(np.int64).max
    path = write_index(tmp_path / "i.lkx", ids, x, next_id=2**63)
    s = Searcher.load(path)
    assert len(s) == 300 and s.ids.tolist() == ids.tolist()
    scores, got = s.search(x[:4].astype(np.float64), 3)
    ref.check_topk(scores, got, x[:4], x, 3, vector_ids=ids)
    write_index(path, [10**9, 5], unit_rows(2, 2, 5), metric="ip", next_id=10**9 + 1)
    assert Searcher.load(path).ids.tolist() == [10**9, 5]


class StandInEncoder:
    """The attributes Searcher reads from an encoder (engine.encoder.Encoder's contract); no images."""

    def __init__(self, name, dim, sha):
        self.name, self.dim = name, dim
        self.identity = {"name": name, "sha256": sha, "dim": dim}


def test_model_identity_is_recorded_and_checked(tmp_path):
    enc = StandInEncoder("mpnn", 7, "ab" * 32)
    s = Searcher(encoder=enc)
    assert s.dim == 7
    s.add(data(0, 3, 7))
    path = tmp_path / "i.lkx"
    s.save(path)
    header = json.loads(path.read_bytes().split(b"\n", 1)[0][len(MAGIC) :])
    assert header["model"] == enc.identity
    assert Searcher.load(path).encoder is None
    assert Searcher.load(path, encoder=StandInEncoder("mpnn", 7, "ab" * 32)).encoder is not None
    with pytest.raises(ModelError, match=r"built with model .*'ab.*but the encoder given is .*'cd"):
        Searcher.load(path, encoder=StandInEncoder("mpnn", 7, "cd" * 32))
    with pytest.raises(InputError, match="dim 5 does not match the encoder's dim 7"):
        Searcher(5, encoder=enc)
    with pytest.raises(InputError, match="no image encoder attached"):
        Searcher(7).search_images([np.zeros((8, 8, 3), np.uint8)], 1)


# -- concurrency -----------------------------------------------------------------------------------


def test_concurrent_searches_during_adds_and_removes():
    """4 threads search while 1 thread adds and removes vectors that can never enter the probes' top k
    (they point the other way), moving stored rows around and growing the storage. Every answer must
    equal the oracle's answer over the fixed base vectors (up to float32 near-ties)."""
    rng = np.random.default_rng(0)
    d, k = 64, 10
    nbase = 20_000  # big enough that a batch of 64 probes runs over two blocks of stored rows
    base = np.hstack([np.ones((nbase, 1)), 0.1 * rng.standard_normal((nbase, d - 1))]).astype(np.float32)
    probes = np.hstack([np.ones((64, 1)), 0.1 * rng.standard_normal((64, d - 1))]).astype(np.float32)
    far = np.hstack([-np.ones((6000, 1)), 0.1 * rng.standard_normal((6000, d - 1))]).astype(np.float32)
    nb, nq, nf = ref.normalize(base), ref.normalize(probes), ref.normalize(far)
    want_scores, want_rows = ref.topk_ip(nq, nb, k)
    assert (nf @ nq.T).max() < want_scores[:, -1].min()  # the far vectors never compete

    s = Searcher(d)
    far_ids = np.arange(10**6, 10**6 + 6000)
    s.add(far[:500], ids=far_ids[:500])  # far rows first, so removals move base rows into holes
    s.add(base, ids=np.arange(nbase))
    present = list(far_ids[:500])
    stop = threading.Event()
    failures = []
    count = [0]

    def reader(batch):
        rrng = np.random.default_rng(batch)
        while not stop.is_set():
            i0 = int(rrng.integers(0, nq.shape[0] - batch + 1))
            scores, ids = s.search(probes[i0 : i0 + batch], k)
            if not (np.array_equal(ids, want_rows[i0 : i0 + batch])
                    and np.allclose(scores, want_scores[i0 : i0 + batch], atol=1e-5, rtol=0)):
                try:  # a swap of float32 near-ties is allowed, anything else is not
                    ref.check_topk(scores, ids, nq[i0 : i0 + batch], nb, k)
                except AssertionError as e:
                    failures.append((batch, i0, str(e)))
            count[0] += 1

    def writer():
        wrng = np.random.default_rng(1)
        nxt = 500
        try:
            for _ in range(150):
                m = int(wrng.integers(1, 40))
                s.add(far[nxt : nxt + m], ids=far_ids[nxt : nxt + m])
                present.extend(far_ids[nxt : nxt + m])
                nxt += m
                drop = wrng.choice(len(present), size=min(len(present), int(wrng.integers(1, 40))), replace=False)
                gone = [present[i] for i in drop]
                assert s.remove(gone) == len(gone)
                for g in gone:
                    present.remove(g)
        except BaseException as e:  # noqa: BLE001  (a thread's exception would only be a warning)
            failures.append(("writer", repr(e)))
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(b,)) for b in (1, 7, 17, 64)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"{len(failures)} inconsistent answers, first: {failures[0][:2]}"
    assert count[0] > 0
    assert sorted(s.ids.tolist()) == sorted(list(range(nbase)) + [int(p) for p in present])


# -- format 2: per-vector meta and file stamps ---------------------------------------------------------------


def write_index_v2(path, ids, vectors, *, meta=None, stamps=None, offsets=None, flags=None, blob=None,
                   next_id=None, fields=None):
    """A version-2 index file laid out as the module docstring says, written independently of ``save``, with a
    correct sha256 over whatever it is given: ``offsets`` / ``flags`` / ``blob`` replace the meta section's
    parts computed from ``meta`` (crafted files that only the contents checks can refuse)."""
    import struct

    ids = np.asarray(ids, dtype="<i8")
    vectors = np.asarray(vectors, dtype="<f4").reshape(len(ids), -1)
    body = ids.tobytes() + vectors.tobytes()
    if stamps is not None:
        for st in stamps:
            body += struct.pack("<qq", -1, 0) + bytes(32) if st is None else struct.pack("<qq", st[0], st[1]) + st[2]
    meta_bytes = None
    if meta is not None or blob is not None:
        parts = [b"" if t is None else t.encode() for t in (meta or [])]
        if blob is None:
            blob = b"".join(parts)
        if offsets is None:
            offsets = [0, *np.cumsum([len(p) for p in parts]).tolist()]
        if flags is None:
            flags = [t is not None for t in meta]
        body += np.asarray(offsets, "<u8").tobytes() + np.asarray(flags, "u1").tobytes() + blob
        meta_bytes = len(blob)
    header = {"format_version": 2, "dim": vectors.shape[1], "metric": "cosine", "count": len(ids),
              "next_id": (int(ids.max()) + 1 if len(ids) else 0) if next_id is None else next_id, "model": None,
              "model_path": None, "stamps": stamps is not None, "meta_bytes": meta_bytes}
    header.update(fields or {})
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + body)
    path.write_bytes(MAGIC + json.dumps({**header, "sha256": digest.hexdigest()}, sort_keys=True).encode() + b"\n"
                     + body)
    return path


def write_index_v3(path, ids, vectors, *, meta=None, stamps=None, next_id=None, fields=None, digests=None):
    """A version-3 index file laid out as the module docstring says, written independently of ``save``: the
    sections of ``write_index_v2``, each with its sha256 in the header (``digests`` overrides some), the
    header's sha256 over its other fields, the line padded with spaces to a multiple of 64 bytes."""
    ids = np.asarray(ids, dtype="<i8")
    vectors = np.asarray(vectors, dtype="<f4").reshape(len(ids), -1)
    import struct

    sections = {"ids": ids.tobytes(), "vectors": vectors.tobytes(), "stamps": None, "meta": None}
    if stamps is not None:
        sections["stamps"] = b"".join(struct.pack("<qq", -1, 0) + bytes(32) if st is None
                                      else struct.pack("<qq", st[0], st[1]) + st[2] for st in stamps)
    meta_bytes = None
    if meta is not None:
        parts = [b"" if t is None else t.encode() for t in meta]
        offsets = [0, *np.cumsum([len(p) for p in parts]).tolist()]
        sections["meta"] = (np.asarray(offsets, "<u8").tobytes()
                            + np.asarray([t is not None for t in meta], "u1").tobytes() + b"".join(parts))
        meta_bytes = sum(len(p) for p in parts)
    header = {"format_version": 3, "dim": vectors.shape[1], "metric": "cosine", "count": len(ids),
              "next_id": (int(ids.max()) + 1 if len(ids) else 0) if next_id is None else next_id, "model": None,
              "model_path": None, "stamps": stamps is not None, "meta_bytes": meta_bytes,
              "section_sha256": {k: None if v is None else hashlib.sha256(v).hexdigest() for k, v in sections.items()}}
    header["section_sha256"].update(digests or {})
    header.update(fields or {})
    line = MAGIC + json.dumps({**header, "sha256": hashlib.sha256(json.dumps(header, sort_keys=True).encode())
                               .hexdigest()}, sort_keys=True).encode()
    line += b" " * (-(len(line) + 1) % 64) + b"\n"
    path.write_bytes(line + b"".join(v for v in sections.values() if v is not None))
    return path


def test_meta_and_stamps_round_trip_through_remove_and_save(tmp_path):
    s = Searcher(6)
    x = data(0, 8, 6)
    meta = ["photos/a.jpg", None, "", "é ✓ 写真/b.png", "x" * MAX_META_BYTES, "n\nl", None, "last"]
    stamps = [FileStamp(i * 100, 1_700_000_000_000_000_000 + i, bytes([i]) * 32) if i % 3 else None
              for i in range(8)]
    ids = s.add(x, ids=np.arange(10, 18), meta=meta, stamps=stamps)
    assert s.meta(ids) == meta and s.stamps(ids) == stamps
    assert s.meta([13, 10]) == [meta[3], meta[0]]
    assert s.remove([11, 10]) == 2  # the last rows move into the holes: meta and stamps move with them
    keep = [12, 13, 14, 15, 16, 17]
    want_meta = {10 + i: m for i, m in enumerate(meta)}
    want_stamps = {10 + i: st for i, st in enumerate(stamps)}
    assert s.meta(keep) == [want_meta[i] for i in keep]
    assert s.stamps(keep) == [want_stamps[i] for i in keep]
    assert s.meta() == [want_meta[i] for i in s.ids.tolist()]
    s.add(data(1, 2, 6))  # no meta: None
    path = tmp_path / "i.lkx"
    s.save(path)
    header = json.loads(path.read_bytes().split(b"\n", 1)[0][len(MAGIC):])
    assert header["format_version"] == 3 == FORMAT_VERSION and header["stamps"] is True
    t = Searcher.load(path)
    np.testing.assert_array_equal(t.ids, s.ids)
    np.testing.assert_array_equal(t.get(t.ids), s.get(s.ids))
    assert t.meta(t.ids) == s.meta(s.ids) and t.stamps(t.ids) == s.stamps(s.ids)
    assert t.meta([18, 19]) == [None, None]
    with pytest.raises(KeyError, match="id 10 is not in the index"):
        t.meta([10])


def test_an_index_without_meta_writes_no_meta_sections(tmp_path):
    """No meta and no stamps: the payload is the ids and the vectors only (version 1's size)."""
    s = Searcher(5)
    s.add(np.eye(3, 5))
    path = tmp_path / "i.lkx"
    s.save(path)
    line, body = path.read_bytes().split(b"\n", 1)
    header = json.loads(line[len(MAGIC):])
    assert (header["meta_bytes"], header["stamps"], len(body)) == (None, False, 3 * 8 + 15 * 4)
    assert Searcher.load(path).meta() == [None] * 3


@pytest.mark.parametrize("meta, message", [
    ("a.jpg", "meta must be a list of strings"),
    (["a", "b", "c"], "got 2 vectors but 3 meta strings"),
    (["a", 7], r"meta\[1\] must be a string or None, got int"),
    (["a", "caf\udce9.jpg"], r"meta\[1\] cannot be encoded as UTF-8 .*lone surrogate"),
    (["a", "é" * (MAX_META_BYTES // 2 + 1)], rf"meta\[1\] is {MAX_META_BYTES + 2} bytes as UTF-8, more than"),
])
def test_bad_meta_is_refused_and_nothing_is_added(meta, message):
    s = Searcher(3)
    with pytest.raises(InputError, match=message):
        s.add(data(0, 2, 3), meta=meta)
    assert len(s) == 0 and s.meta() == []
    with pytest.raises(InputError, match=r"stamps\[0\] must be a FileStamp"):
        s.add(data(0, 1, 3), stamps=[(1, 2, b"short")])
    assert s.add(data(0, 1, 3)).tolist() == [0]


def test_meta_text_escapes_bytes_that_are_not_utf8():
    import os

    assert meta_text(os.fsdecode(b"dir/caf\xe9.jpg")) == "dir/caf\\xe9.jpg"
    assert meta_text(b"caf\xc3\xa9.jpg") == "café.jpg"
    assert meta_text("plain/é.jpg") == "plain/é.jpg"


def test_version1_files_still_load_and_save_as_version2(tmp_path):
    x = unit_rows(3, 4, 6)
    old = write_index(tmp_path / "v1.lkx", [5, 1, 9, 2], x, next_id=12)
    s = Searcher.load(old)
    assert s.meta() == [None] * 4 and s.model_path is None
    assert s.add(unit_rows(4, 1, 6), meta=["new"]).tolist() == [12]
    s.save(tmp_path / "v2.lkx")
    t = Searcher.load(tmp_path / "v2.lkx")
    assert t.meta() == [None] * 4 + ["new"] and t.ids.tolist() == [5, 1, 9, 2, 12]


def crafted_meta(tmp_path, **kwargs):
    ids, x = [0, 1, 2], unit_rows(5, 3, 4)
    return write_index_v2(tmp_path / "m.lkx", ids, x, **kwargs)


@pytest.mark.parametrize("case, message", [
    ("offset beyond the blob", r"meta offsets must run from 0 to the blob's 7 bytes, got 0 \.\. 900"),
    ("first offset not 0", r"meta offsets must run from 0 .* got 2 \.\. 7"),
    ("offsets decrease", r"meta offsets decrease at rows \[1\] \(1 in all\)"),
    ("bad UTF-8", r"the meta string of row 1 is not valid UTF-8 \(invalid start byte at byte 0\)"),
    ("flag 2", r"meta flags must be 0 or 1, rows \[2\] \(1 in all\) are not"),
    ("absent meta with bytes", r"rows \[0\] \(1 in all\) have no meta but a span of meta bytes"),
    ("span too long", rf"meta strings longer than {MAX_META_BYTES} bytes in rows \[0\]"),
    ("stamp size -2", r"stamps must have a size >= 0, or -1 with every other field zero; rows \[1\]"),
    ("stamp -1 with a digest", r"stamps must have .* rows \[0\] .* \(row 0: size -1, mtime_ns 5\)"),
])
def test_a_v2_file_with_a_correct_checksum_but_impossible_meta_is_refused(tmp_path, case, message):
    meta = ["ab", "cde", "fg"]
    kw = {"meta": meta}
    if case == "offset beyond the blob":
        kw["offsets"] = [0, 2, 5, 900]
    elif case == "first offset not 0":
        kw["offsets"] = [2, 2, 5, 7]
    elif case == "offsets decrease":
        kw["offsets"] = [0, 4, 3, 7]
    elif case == "bad UTF-8":
        kw["blob"] = b"ab\xff\xfeefg"
    elif case == "flag 2":
        kw["flags"] = [1, 1, 2]
    elif case == "absent meta with bytes":
        kw["flags"] = [0, 1, 1]
    elif case == "span too long":
        kw["meta"] = None
        kw["blob"] = b"x" * (MAX_META_BYTES + 1)
        kw["offsets"], kw["flags"] = [0, MAX_META_BYTES + 1] * 1 + [MAX_META_BYTES + 1] * 2, [1, 0, 0]
    elif case == "stamp size -2":
        kw["stamps"] = [None, (-2, 0, bytes(32)), None]
    elif case == "stamp -1 with a digest":
        kw["stamps"] = [(-1, 5, bytes(32)), None, None]
    path = crafted_meta(tmp_path, **kw)
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index: {message}"):
        Searcher.load(path)


def test_a_truncated_or_altered_v2_file_is_refused(tmp_path):
    s = Searcher(4)
    s.add(unit_rows(6, 3, 4), meta=["one", "twö", None], stamps=[FileStamp(1, 2, bytes(32))] * 3)
    path = tmp_path / "i.lkx"
    s.save(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])  # the blob cut short
    with pytest.raises(IndexFileError, match=rf"{path}: truncated or damaged index: payload is \d+ bytes, header "
                                             rf"says \d+"):
        Searcher.load(path)
    for at in (-2, -(6 + 3 + 4 * 8) - 1, -(6 + 3 + 4 * 8) - 40):  # a blob byte, a flag, a stamp's digest
        damaged = bytearray(raw)
        damaged[at] ^= 0x20
        path.write_bytes(bytes(damaged))
        with pytest.raises(IndexFileError, match=rf"{path}: checksum mismatch"):
            Searcher.load(path)
    line, body = raw.split(b"\n", 1)
    header = json.loads(line[len(MAGIC):])
    assert header["meta_bytes"] == 7  # "one" + "twö"
    header["meta_bytes"] = 10**15  # a header promising a petabyte of meta: refused by size, nothing read
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + body)
    with pytest.raises(IndexFileError, match=rf"payload is {len(body)} bytes, header says {len(body) - 7 + 10**15}"):
        Searcher.load(path)


@pytest.mark.parametrize("field, value", [("meta_bytes", -1), ("meta_bytes", 2.0), ("stamps", 1),
                                          ("model_path", 7)])
def test_v2_header_fields_of_the_wrong_type_are_refused(tmp_path, field, value):
    path = crafted_meta(tmp_path, meta=["a", "b", "c"], fields={field: value})
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index header \(.*{field}={value!r}"):
        Searcher.load(path)


def test_concurrent_meta_reads_during_removes():
    """Readers of meta never see a vector's meta paired with another vector's id."""
    s = Searcher(2)
    n = 3000
    s.add(data(0, n, 2), meta=[f"m{i}" for i in range(n)])
    stop = threading.Event()
    bad = []

    def reader():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            ids = s.ids
            pick = ids[rng.integers(0, len(ids), 16)] if len(ids) else ids
            try:
                got = s.meta(pick)
            except KeyError:  # removed between the two calls
                continue
            if got != [f"m{i}" for i in pick.tolist()]:
                bad.append((pick.tolist(), got))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(0, n - 10, 7):
            s.remove(np.arange(i, i + 5))
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:1]
    assert s.meta() == [f"m{i}" for i in s.ids.tolist()]
