"""Compressed storage: ``Searcher(dim, storage="float16" | "int8")`` and its kernels (engine.kernels.quant).

Every answer is checked against a numpy oracle: the kernels against the inner products with the dequantised
vectors (and, for int8, against the exact integer sums: the same bits on any CPU and for any number of
queries), the re-ranked answer against the exact float32 index (recall@10 >= 0.99 on clustered vectors and
on real MNIST digits), and the files against an independent writer of format 4 and crafted damage.
"""

import hashlib
import json
import math

import numpy as np
import pytest
from test_ivf import clustered
from test_mmap import mnist_vectors

from engine.errors import IndexFileError, InputError
from engine.ivf import MAGIC as IVF_MAGIC
from engine.ivf import IVFSearcher
from engine.kernels.quant import (decode, encode_float16, encode_int8, int8_params, int8_queries, int8_range, levels,
                                  topk_codes)
from engine.searcher import MAGIC, FileStamp, Searcher

STORAGES = ("float16", "int8")


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n == 0, 1, n)).astype(np.float32)


def recall(want_ids, got_ids, k=10):
    return float(np.mean([len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(want_ids, got_ids)]))


def int8_oracle(queries, codes, scale, offset):
    """The int8 scores the module notes define, from numpy alone: the integer sums in int64 (exact), then the
    same float64 steps. Also the dequantised inner products in float64 and the bound between the two."""
    q = queries.astype(np.float64)
    qp = q * scale.astype(np.float64)
    step = np.abs(qp).max(axis=1) / levels(q.shape[1])
    qi = np.rint(qp / np.where(step > 0, step, 1)[:, None]).astype(np.int64)
    const = np.array([math.fsum(r) for r in (q * offset.astype(np.float64)).tolist()])
    acc = qi @ codes.astype(np.int64).T  # (nq, n) exact
    exact = (const[:, None] + step[:, None] * acc.astype(np.float64)).astype(np.float32)
    dequant = q @ (offset.astype(np.float64) + scale.astype(np.float64) * codes.astype(np.float64)).T
    bound = 0.5 * step[:, None] * codes.astype(np.float64).sum(axis=1)[None, :]
    return exact, dequant, bound


def oracle_topk(scores, k):
    """Best k by (-score, row), padded with -inf / -1."""
    nq, n = scores.shape
    rows = np.full((nq, k), -1, dtype=np.int64)
    out = np.full((nq, k), -np.inf, dtype=np.float32)
    for i in range(nq):
        order = np.lexsort((np.arange(n), -scores[i]))[:k]
        rows[i, : order.size] = order
        out[i, : order.size] = scores[i, order]
    return out, rows


# -- kernels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, 97, 256])
def test_int8_kernel_is_the_exact_integer_oracle_for_few_and_many_queries(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((3001, d)).astype(np.float32) * rng.uniform(0.1, 3, d).astype(np.float32)
    scale, offset = int8_params(*int8_range(x))
    codes = encode_int8(x, scale, offset)
    q = rng.standard_normal((20, d)).astype(np.float32)
    exact, dequant, bound = int8_oracle(q, codes, scale, offset)
    assert (np.abs(exact.astype(np.float64) - dequant) <= bound + 1e-5 * np.abs(dequant) + 1e-6).all()
    want_s, want_r = oracle_topk(exact, 25)
    many_s, many_r = topk_codes(q, codes, codes.shape[0], 25, scale=scale, offset=offset)  # BLAS in float64
    np.testing.assert_array_equal(many_s, want_s)
    np.testing.assert_array_equal(many_r, want_r)
    for nq in (1, 3):  # the numba int32 kernel: the same bits
        few_s, few_r = topk_codes(q[:nq], codes, codes.shape[0], 25, scale=scale, offset=offset, threads=2)
        np.testing.assert_array_equal(few_s, want_s[:nq])
        np.testing.assert_array_equal(few_r, want_r[:nq])


def test_int8_kernel_cannot_saturate_at_the_extremes():
    """Every code 255 and query components at the rounding limit: the int32 sum reaches its largest value
    (dim * 255 * levels < 2**31) and stays exact (an int16 accumulator would saturate at 32767)."""
    d = 384
    codes = np.full((70, d), 255, dtype=np.uint8)
    codes[1::2] = 0
    scale, offset = np.ones(d, np.float32), np.zeros(d, np.float32)
    q = np.ones((2, d), np.float32)
    q[1] = -1
    qi, step, const = int8_queries(q, scale, offset)
    assert int(np.abs(qi).max()) == levels(d) and d * 255 * levels(d) < 2**31
    for nq in (1, 2):
        s, r = topk_codes(q[:nq], codes, 70, 70, scale=scale, offset=offset)
        assert s[0, 0] == np.float32(255.0 * d) and r[0, 0] == 0
        assert s[0, -1] == 0
    assert s[1, 0] == 0 and s[1, -1] == np.float32(-255.0 * d)


SATURATING = ("pmaddubsw", "vpdpbusds", "vpdpwssds", "paddsw", "paddsb", "paddusw", "paddusb", "packsswb")


def test_int8_kernels_compile_without_saturating_instructions():
    """The int8 kernels compiled for this CPU (under ``qemu-x86_64 -cpu Haswell``: for AVX2 without VNNI) use no
    instruction that saturates: int16 x int16 pairs summed in 32 bits (``vpmaddwd``, or VNNI's ``vpdpwssd``),
    never ``vpmaddubsw`` (which saturates at 16 bits) or the saturating VNNI forms."""
    import numba

    from engine.kernels import ivf as ivf_kernels
    from engine.kernels import quant

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (300, 64), dtype=np.uint8)
    qi, step, const = int8_queries(rng.standard_normal((2, 64)).astype(np.float32), np.ones(64, np.float32),
                                   np.zeros(64, np.float32))
    block = numba.njit(nogil=True)(quant.int8_block.py_func)  # uncached copies: cached code cannot be inspected
    block(codes, 0, 300, qi, step, const, np.empty((2, 300), np.float32))
    scan = numba.njit(nogil=True)(ivf_kernels.scan_grouped_int8.py_func)
    hs, hr = np.full((2, 5), -np.inf, np.float32), np.full((2, 5), -1, np.int64)
    scan(qi, step, const, np.array([0, 1]), np.array([0, 2]), np.array([0]), codes, np.arange(300), False,
         np.array([0, 300]), np.array([300]), hs, hr)
    for kernel in (block, scan):
        asm = kernel.inspect_asm(kernel.signatures[0]).lower()
        found = [op for op in SATURATING if op in asm]
        assert not found, f"{kernel.__name__} uses saturating instructions {found}"
        assert "vpmaddwd" in asm or "vpdpwssd" in asm or "pmaddwd" in asm  # the 32-bit pair sums, vectorised


@pytest.mark.parametrize("d", [1, 7, 128])
def test_float16_kernel_matches_the_dequantised_oracle(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((2500, d)).astype(np.float32)
    x[0, 0] = 3e-7  # a float16 subnormal
    x[1, 0] = -0.0
    x[2] = 60000.0 / np.sqrt(d)
    h = encode_float16(x)
    q = rng.standard_normal((12, d)).astype(np.float32)
    dq = decode(h).astype(np.float64)
    assert dq[0, 0] != 0 and abs(dq[0, 0] - 3e-7) < 6e-8
    oracle = q.astype(np.float64) @ dq.T
    tol = 1e-5 * np.abs(q).astype(np.float64) @ np.abs(dq).T + 1e-30
    for nq in (1, 3, 12):  # numba kernel, then widened blocks + BLAS
        s, r = topk_codes(q[:nq], h, h.shape[0], 2500)
        got = np.take_along_axis(oracle[:nq], r, axis=1)
        assert (np.abs(s - got) <= np.take_along_axis(tol[:nq], r, axis=1)).all()
        assert (np.diff(got, axis=1) <= np.take_along_axis(tol[:nq], r, axis=1)[:, 1:] * 2).all()  # best first


# -- Searcher: answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_search_matches_the_oracle_on_the_stored_codes(storage, metric):
    x = clustered(1, 4000, 48)
    q = clustered(2, 9, 48)
    s = Searcher(48, metric=metric, storage=storage)
    s.add(x[:1000])
    s.add(x[1000:])  # int8: the range may widen and every row be encoded again
    stored = unit(x) if metric == "cosine" else x
    qq = unit(q) if metric == "cosine" else q
    codes = s._codes[: len(s)]
    if storage == "int8":
        scale, offset = s.quantiser
        assert (codes == encode_int8(stored, scale, offset)).all()  # every row encoded with the final range
        oracle = int8_oracle(qq, codes, scale, offset)[0]
    else:
        oracle = qq.astype(np.float64) @ decode(codes).astype(np.float64).T
    scores, ids = s.search(q, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (9, 10)
    got = np.take_along_axis(oracle, ids, axis=1)
    np.testing.assert_allclose(scores, got, rtol=1e-5, atol=1e-6)
    kth = np.sort(oracle, axis=1)[:, -10]
    assert (scores[:, -1] >= kth - 1e-5).all()


@pytest.mark.parametrize("storage", STORAGES)
def test_reranked_recall_on_clustered_vectors(storage):
    x = clustered(3, 20000, 128, centres=200, noise=0.8)
    q = clustered(4, 200, 128, centres=200, noise=0.8)
    exact = Searcher(128)
    exact.add(x)
    want_s, want = exact.search(q, 10)
    s = Searcher(128, storage=storage)
    s.add(x)
    plain = recall(want, s.search(q, 10)[1])
    scores, ids = s.search(q, 10, rerank=50)
    assert recall(want, ids) >= 0.99, (plain, recall(want, ids))
    assert plain >= (0.98 if storage == "float16" else 0.7)
    same = ids == want
    np.testing.assert_allclose(scores[same], want_s[same], rtol=1e-6, atol=1e-6)  # re-ranked: float32 scores


@pytest.mark.parametrize("storage", STORAGES)
def test_reranked_recall_on_real_digits(shared_data, storage):
    x = mnist_vectors(shared_data, n=3000) / 4080.0
    q, base = x[:100], x[100:]
    exact = Searcher(49, metric="ip")
    exact.add(base)
    want = exact.search(q, 10)[1]
    s = Searcher(49, metric="ip", storage=storage)
    s.add(base)
    assert recall(want, s.search(q, 10, rerank=40)[1]) >= 0.99


@pytest.mark.parametrize("storage", STORAGES)
def test_ids_and_padding_contract(storage):
    s = Searcher(5, storage=storage)
    for rerank in (None, 3, 100):
        scores, ids = s.search(np.ones(5), 4, rerank=rerank)  # empty: padding only
        assert ids.shape == (1, 4) and ids.dtype == np.int64 and (ids == -1).all() and np.isneginf(scores).all()
    s.add(np.eye(5)[:3], ids=[10, 20, 30])
    for rerank in (None, 2, 100):
        scores, ids = s.search(np.eye(5)[1], 6, rerank=rerank)
        assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (1, 6)
        assert ids[0, 0] == 20 and scores[0, 0] == pytest.approx(1.0, abs=1e-2)
        assert sorted(ids[0, :3].tolist()) == [10, 20, 30]
        assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert s.search(np.eye(5)[1], 6, rerank=100)[0][0, 0] == 1.0  # float32 re-rank: exact
    with pytest.raises(InputError, match="rerank"):
        s.search(np.eye(5)[1], 2, rerank=0)


def test_ties_keep_the_lower_row_after_rerank():
    s = Searcher(4, storage="int8")
    v = unit([[1, 2, 3, 4]] * 6 + [[4, 3, 2, 1]])
    s.add(v, ids=[60, 50, 40, 30, 20, 10, 0])
    scores, ids = s.search(v[0], 3, rerank=7)
    assert ids.tolist() == [[60, 50, 40]] and scores[0, 0] == scores[0, 2]


def test_bad_storage_and_float16_overflow_are_refused():
    with pytest.raises(InputError, match=r"storage must be one of \('float32', 'float16', 'int8'\), got 'int4'"):
        Searcher(4, storage="int4")
    s = Searcher(3, metric="ip", storage="float16")
    with pytest.raises(InputError, match=r"float16 storage holds values up to 65504.*rows \[1\]"):
        s.add(np.array([[1, 2, 3], [7e4, 0, 0]], np.float32))
    assert len(s) == 0


@pytest.mark.parametrize("storage", STORAGES)
def test_get_remove_and_add_keep_codes_in_step(storage):
    x = clustered(5, 600, 16)
    s = Searcher(16, storage=storage)
    s.add(x)
    assert s.remove(np.arange(0, 600, 3)) == 200
    np.testing.assert_array_equal(s.get([1, 599]), unit(x[[1, 599]]))  # float32 vectors, exact
    s.add(x[:5] * 3, ids=[1000, 1001, 1002, 1003, 1004])
    want = Searcher(16)
    want.add(s.get(s.ids), ids=s.ids)
    q = clustered(6, 20, 16)
    np.testing.assert_array_equal(s.search(q, 5, rerank=400)[1], want.search(q, 5)[1])


# -- files ---------------------------------------------------------------------------------------------


def write_index_v4(path, ids, vectors, codes, *, storage, quant=None, fields=None, digests=None, metric="cosine"):
    """A version-4 index laid out as the module docstring says, written independently of ``save``."""
    ids = np.asarray(ids, "<i8")
    sections = {"ids": ids.tobytes(), "vectors": np.asarray(vectors, "<f4").tobytes(),
                "quant": None if quant is None else np.asarray(quant, "<f4").tobytes(),
                "codes": np.asarray(codes).tobytes(), "stamps": None, "meta": None}
    header = {"format_version": 4, "storage": storage, "dim": vectors.shape[1], "metric": metric,
              "count": len(ids), "next_id": int(ids.max()) + 1 if len(ids) else 0, "model": None,
              "model_path": None, "stamps": False, "meta_bytes": None,
              "section_sha256": {k: None if v is None else hashlib.sha256(v).hexdigest() for k, v in sections.items()}}
    header["section_sha256"].update(digests or {})
    header.update(fields or {})
    line = MAGIC + json.dumps({**header, "sha256": hashlib.sha256(json.dumps(header, sort_keys=True).encode())
                               .hexdigest()}, sort_keys=True).encode()
    line += b" " * (-(len(line) + 1) % 64) + b"\n"
    path.write_bytes(line + b"".join(v for v in sections.values() if v is not None))
    return path


def parts_of(s):
    n = len(s)
    v = np.array(s._vectors[:n])
    c = np.array(s._codes[:n])
    quant = None if s.storage == "float16" else np.concatenate(s.quantiser)
    return s.ids, v, c, quant


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mmap", [False, True, "verify"])
def test_round_trip_answers_alike_and_keeps_float32_out_of_memory(tmp_path, storage, mmap):
    x = clustered(7, 3000, 32)
    q = clustered(8, 15, 32)
    s = Searcher(32, storage=storage)
    s.add(x, meta=[f"m{i}" for i in range(3000)], stamps=[FileStamp(i, i, bytes(32)) for i in range(3000)])
    s.remove([5, 6])
    path = tmp_path / "i.lkx"
    s.save(path)
    t = Searcher.load(path, mmap=mmap)
    assert t.storage == storage and len(t) == 2998 and t.mapped
    for rerank in (None, 30):
        for a, b in zip(s.search(q, 10, rerank=rerank), t.search(q, 10, rerank=rerank)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(t.get([0, 2999]), s.get([0, 2999]))
    assert t.meta([7]) == ["m7"] and t.stamps([7])[0].size == 7
    code_bytes = 2998 * 32 * (2 if storage == "float16" else 1)
    assert t.resident_bytes() == (0 if mmap else code_bytes) + (0 if storage == "float16" else 2 * 32 * 4)
    t.add(x[:2], ids=[5, 6])  # a write copies the float32 vectors into memory and saves over the mapped file
    assert not t.mapped
    t.save(path)
    u = Searcher.load(path, mmap="verify")
    np.testing.assert_array_equal(u.search(q, 10, rerank=50)[1], Searcher.load(path).search(q, 10, rerank=50)[1])


@pytest.mark.parametrize("storage", STORAGES)
def test_write_index_v4_lays_out_what_save_writes(tmp_path, storage):
    s = Searcher(7, metric="ip", storage=storage)
    s.add(clustered(11, 33, 7))
    s.remove([3])
    s.save(tmp_path / "s.lkx")
    ids, v, c, quant = parts_of(s)
    assert (write_index_v4(tmp_path / "w.lkx", ids, v, c, storage=storage, quant=quant, metric="ip").read_bytes()
            == (tmp_path / "s.lkx").read_bytes())


def test_float32_storage_still_writes_format_3_and_old_files_load(tmp_path):
    s = Searcher(8)
    s.add(clustered(9, 50, 8))
    s.save(tmp_path / "f.lkx")
    header = json.loads((tmp_path / "f.lkx").read_bytes().split(b"\n", 1)[0][len(MAGIC):])
    assert header["format_version"] == 3 and "storage" not in header
    assert set(header["section_sha256"]) == {"ids", "vectors", "stamps", "meta"}
    t = Searcher.load(tmp_path / "f.lkx")
    assert t.storage == "float32" and t._codes is None


def crafted(tmp_path, storage, **kwargs):
    x = unit(clustered(10, 40, 6))
    s = Searcher(6, storage=storage)
    s.add(x)
    ids, v, c, quant = parts_of(s)
    return write_index_v4(tmp_path / "c.lkx", ids, kwargs.pop("vectors", v), kwargs.pop("codes", c),
                          storage=storage, quant=kwargs.pop("quant", quant), **kwargs)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_wrong_storage_tag_is_refused(tmp_path, mmap):
    path = crafted(tmp_path, "int8", fields={"storage": "int4"})
    with pytest.raises(IndexFileError, match=r"storage='int4', expected 'float16' or 'int8'"):
        Searcher.load(path, mmap=mmap)
    path = crafted(tmp_path, "float16", fields={"format_version": 3})  # a v3 header does not read codes
    with pytest.raises(IndexFileError, match="section_sha256"):
        Searcher.load(path, mmap=mmap)
    path = crafted(tmp_path, "int8", fields={"storage": ["int8"]})
    with pytest.raises(IndexFileError, match=r"storage=\['int8'\], expected"):
        Searcher.load(path, mmap=mmap)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("value, message", [(0.0, "0.0"), (np.inf, "inf"), (np.nan, "nan"), (-1.0, "-1.0")])
def test_bad_scales_are_refused(tmp_path, mmap, value, message):
    s = Searcher(6, storage="int8")
    s.add(unit(clustered(10, 40, 6)))
    quant = np.concatenate(s.quantiser)
    quant[3] = value
    path = crafted(tmp_path, "int8", quant=quant)
    with pytest.raises(IndexFileError, match=rf"int8 scales must be finite and > 0, got {message} for dimension 3"):
        Searcher.load(path, mmap=mmap)
    quant = np.concatenate(s.quantiser)
    quant[6 + 2] = np.inf
    with pytest.raises(IndexFileError, match=r"int8 offsets must be finite, got inf for dimension 2"):
        Searcher.load(crafted(tmp_path, "int8", quant=quant), mmap=mmap)


@pytest.mark.parametrize("storage, dtype", [("int8", "uint8"), ("float16", "float16")])
@pytest.mark.parametrize("mmap", [False, True])
def test_codes_of_the_wrong_length_are_refused(tmp_path, storage, dtype, mmap):
    s = Searcher(6, storage=storage)
    s.add(unit(clustered(10, 40, 6)))
    codes = np.array(s._codes[:40])
    path = crafted(tmp_path, storage, codes=codes[:39])  # one row short
    short = 39 * 6 * codes.itemsize
    want = 40 * 6 * codes.itemsize
    with pytest.raises(IndexFileError, match=rf"payload is \d+ bytes, header says \d+ .*codes {want} bytes; "
                                             rf"codes: count 40 x dim 6 {dtype} for storage '{storage}'"):
        Searcher.load(path, mmap=mmap)
    assert short < want


@pytest.mark.parametrize("storage", STORAGES)
def test_codes_that_are_not_the_vectors_encoding_are_refused(tmp_path, storage):
    s = Searcher(6, storage=storage)
    s.add(unit(clustered(10, 40, 6)))
    codes = np.array(s._codes[:40])
    codes.view(np.uint8)[17, 0] ^= 0x40
    path = crafted(tmp_path, storage, codes=codes)  # digests made over the altered codes: only contents tell
    with pytest.raises(IndexFileError, match=r"codes of rows \[17\].*not the encoding of their float32 vectors"):
        Searcher.load(path)
    t = Searcher.load(path, mmap=True)  # mapped: found by verify(), and before any write
    with pytest.raises(IndexFileError, match="not the encoding"):
        t.verify()
    with pytest.raises(IndexFileError, match="not the encoding"):
        t.add(np.ones((1, 6)))
    assert len(t) == 40


def test_altered_codes_fail_their_checksum(tmp_path):
    s = Searcher(6, storage="int8")
    s.add(unit(clustered(10, 40, 6)))
    path = tmp_path / "i.lkx"
    s.save(path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1  # the last code
    path.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="checksum mismatch in the codes section"):
        Searcher.load(path)
    with pytest.raises(IndexFileError, match="checksum mismatch in the codes section"):
        Searcher.load(path, mmap="verify")


def test_an_empty_int8_index_round_trips_and_learns_its_range_at_the_first_add(tmp_path):
    s = Searcher(3, storage="int8")
    s.save(tmp_path / "e.lkx")
    t = Searcher.load(tmp_path / "e.lkx")
    assert len(t) == 0 and t.quantiser is None
    t.add(unit([[1, 0, 0], [0, 0.5, 0.5]]))
    scale, offset = t.quantiser
    np.testing.assert_allclose(offset, [0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(scale * 255, [1, np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


# -- IVFSearcher ----------------------------------------------------------------------------------------


def test_ivf_scanning_every_list_answers_as_the_exact_compressed_index():
    """nprobe >= nlist scans every list: the int8 answer is the exact compressed Searcher's, bit for bit (one
    add: the same quantiser; ids = rows: the same tie order); float16 within float32 rounding."""
    x = clustered(12, 6000, 24, centres=30)
    q = clustered(13, 40, 24, centres=30)
    for storage in STORAGES:
        ivf = IVFSearcher(24, nlist=16, nprobe=16, storage=storage)
        ivf.add(x)
        assert ivf.is_trained
        flat = Searcher(24, storage=storage)
        flat.add(x)
        (s1, i1), (s2, i2) = ivf.search(q, 10), flat.search(q, 10)
        if storage == "int8":
            np.testing.assert_array_equal(ivf.quantiser[0], flat.quantiser[0])
            np.testing.assert_array_equal(s1, s2)
            np.testing.assert_array_equal(i1, i2)
        else:
            np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
            assert recall(i2, i1) >= 0.99
        for a, b in zip(ivf.search(q, 10, rerank=40), flat.search(q, 10, rerank=40)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6) if a.dtype == np.float32 else \
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("storage", STORAGES)
def test_ivf_reranked_recall_and_padding(storage):
    x = clustered(14, 12000, 64, centres=120, noise=0.8)
    q = clustered(15, 100, 64, centres=120, noise=0.8)
    exact = Searcher(64)
    exact.add(x)
    want = exact.search(q, 10)[1]
    ivf = IVFSearcher(64, nlist=32, nprobe=32, storage=storage)
    ivf.add(x)
    assert recall(want, ivf.search(q, 10, rerank=50)[1]) >= 0.99
    small = IVFSearcher(64, nlist=4, storage=storage)
    small.add(x[:3], ids=[7, 8, 9])
    for rerank in (None, 2, 50):
        scores, ids = small.search(x[1], 5, rerank=rerank)
        assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (1, 5)
        assert ids[0, 0] == 8 and (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mmap", [False, True, "verify"])
def test_ivf_round_trip(tmp_path, storage, mmap):
    x = clustered(16, 5000, 16, centres=20)
    q = clustered(17, 20, 16, centres=20)
    s = IVFSearcher(16, nlist=8, nprobe=3, storage=storage)
    s.add(x)
    s.remove([1, 2, 3])
    s.save(tmp_path / "i.lkv")
    header = json.loads((tmp_path / "i.lkv").read_bytes().split(b"\n", 1)[0][len(IVF_MAGIC):])
    assert header["format_version"] == 3 and header["storage"] == storage
    t = IVFSearcher.load(tmp_path / "i.lkv", mmap=mmap)
    assert t.storage == storage and t.mapped and len(t) == 4997
    for rerank in (None, 30):
        for a, b in zip(s.search(q, 10, rerank=rerank), t.search(q, 10, rerank=rerank)):
            np.testing.assert_array_equal(a, b)
    assert t.resident_bytes() == (0 if mmap else t._codes.nbytes) + 8 * 16 * 4 + (0 if storage == "float16"
                                                                                   else 2 * 16 * 4)
    t.add(x[1:3], ids=[1, 2])
    assert not t.mapped
    t.save(tmp_path / "i.lkv")
    u = IVFSearcher.load(tmp_path / "i.lkv", mmap="verify")
    np.testing.assert_array_equal(u.search(q, 10, rerank=30)[1], t.search(q, 10, rerank=30)[1])
    f32 = IVFSearcher(16, nlist=8)
    f32.add(x)
    f32.save(tmp_path / "f.lkv")
    assert json.loads((tmp_path / "f.lkv").read_bytes().split(b"\n", 1)[0][len(IVF_MAGIC):])["format_version"] == 2


def resigned(path, edit):
    """The IVF file at ``path`` with its header edited by ``edit(header)`` and signed again."""
    raw = path.read_bytes()
    line, body = raw.split(b"\n", 1)
    header = json.loads(line[len(IVF_MAGIC):])
    header.pop("sha256")
    edit(header)
    text = IVF_MAGIC + json.dumps({**header, "sha256": hashlib.sha256(json.dumps(header, sort_keys=True).encode())
                                   .hexdigest()}, sort_keys=True).encode()
    text += b" " * (-(len(text) + 1) % 64) + b"\n"
    path.write_bytes(text + body)
    return path


@pytest.mark.parametrize("mmap", [False, True])
def test_ivf_crafted_files_are_refused(tmp_path, mmap):
    s = IVFSearcher(6, nlist=2, storage="int8")
    s.add(unit(clustered(18, 100, 6)))
    path = tmp_path / "i.lkv"
    s.save(path)
    good = path.read_bytes()
    resigned(path, lambda h: h.update(storage="int4"))
    with pytest.raises(IndexFileError, match=r"storage='int4', expected 'float16' or 'int8'"):
        IVFSearcher.load(path, mmap=mmap)
    path.write_bytes(good[:-6])  # codes of the wrong length
    with pytest.raises(IndexFileError, match=r"header says \d+ .*codes 600 bytes; codes: count 100 x dim 6 uint8"):
        IVFSearcher.load(path, mmap=mmap)
    body = bytearray(good.split(b"\n", 1)[1])
    sections = {"centroids": 2 * 6 * 4, "offsets": 3 * 8, "ids": 800, "vectors": 2400, "quant": 48, "codes": 600}
    at = {name: sum(list(sections.values())[:i]) for i, name in enumerate(sections)}
    for value, message in [(0.0, "got 0.0 for dimension 2"), (np.nan, "got nan for dimension 2")]:
        edited = bytearray(body)
        edited[at["quant"] + 8 : at["quant"] + 12] = np.float32(value).tobytes()
        quant_digest = hashlib.sha256(bytes(edited[at["quant"] : at["quant"] + 48])).hexdigest()
        path.write_bytes(good.split(b"\n", 1)[0] + b"\n" + bytes(edited))
        resigned(path, lambda h: h["section_sha256"].update(quant=quant_digest))
        with pytest.raises(IndexFileError, match=rf"int8 scales must be finite and > 0, {message}"):
            IVFSearcher.load(path, mmap=mmap)
    edited = bytearray(body)
    edited[at["codes"] + 7] ^= 0x21
    codes_digest = hashlib.sha256(bytes(edited[at["codes"] :])).hexdigest()
    path.write_bytes(good.split(b"\n", 1)[0] + b"\n" + bytes(edited))
    resigned(path, lambda h: h["section_sha256"].update(codes=codes_digest))
    with pytest.raises(IndexFileError, match="not the encoding of their float32 vectors"):
        IVFSearcher.load(path, mmap=mmap).verify()
