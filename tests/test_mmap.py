"""Memory-mapped loads: ``Searcher.load(path, mmap=True)`` and ``IVFSearcher.load(path, mmap=True)``.

A mapped load must answer exactly what a plain load answers (and the numpy oracle), refuse at open every
damaged or crafted part it reads there (header, sizes against the file, ids, stamps, meta), leave the
vectors to ``verify()``, copy them into memory before the first write, and survive a save over its own file.
The large-file figures (10M x 128) are in benchmarks/bench_mmap.py, not here.
"""

import gzip
import hashlib
import json
import os
import tracemalloc

import numpy as np
import pytest
import reference as ref
from conftest import need
from test_ivf import clustered, small_index, write_ivf
from test_searcher import unit_rows, write_index, write_index_v2, write_index_v3

from engine.errors import IndexFileError, InputError
from engine.ivf import IVFSearcher
from engine.searcher import MAGIC, FileStamp, Searcher


def mnist_vectors(shared_data, n=3000):
    """Real vectors: the first ``n`` MNIST test digits, 4x4-pooled to 7x7 = 49 pixel sums (float64). Pooled
    digits repeat exactly now and then, and we add exact copies below: ties are real."""
    path = need(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return raw.reshape(n, 7, 4, 7, 4).sum(axis=(2, 4)).reshape(n, 49).astype(np.float64)


def same_answers(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def rss_file_kib() -> int | None:
    """Resident file-backed pages of this process (kB, Linux), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# -- Searcher: same answers as a plain load and the oracle ----------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_mapped_load_answers_as_plain_load_and_oracle_on_real_data(tmp_path, shared_data, metric):
    x = mnist_vectors(shared_data)
    x = np.vstack([x, x[:40]]) / 4080.0  # pixel sums at most 16 * 255: scores of order 1; exact duplicates
    # under other ids: tied scores, ordered by row
    rng = np.random.default_rng(0)
    ids = rng.permutation(10**6)[: len(x)]
    s = Searcher(49, metric=metric)
    s.add(x, ids=ids, meta=[f"digit{i}.png" for i in range(len(x))])
    s.remove(ids[rng.choice(len(x), 300, replace=False)])  # holes filled by the last rows: ids not increasing
    path = tmp_path / "mnist.lkx"
    s.save(path)
    plain, mapped = Searcher.load(path), Searcher.load(path, mmap=True)
    assert mapped.mapped and not plain.mapped and len(mapped) == len(s) == len(x) - 300
    assert not mapped._vectors.flags.writeable and not mapped._vectors.flags.owndata  # the file's pages
    q = np.vstack([mnist_vectors(shared_data, 3100)[3000:] / 4080.0, x[:3]])  # unseen digits, stored ones (ties)
    for k in (1, 10, 57):
        same_answers(mapped.search(q, k), plain.search(q, k))
        scores, got = mapped.search(q, k)
        stored = s.get(s.ids)
        ref.check_topk(scores, got, s._coerce(q, "q", allow_1d=False), stored, k, vector_ids=s.ids)
    np.testing.assert_array_equal(mapped.ids, plain.ids)
    some = s.ids[::97]
    np.testing.assert_array_equal(mapped.get(some), plain.get(some))
    assert mapped.meta(some) == plain.meta(some) and some[0] in mapped and -5 not in mapped
    mapped.verify()  # the vectors as saved


def test_a_small_mapped_index_pads_with_minus_one_and_minus_inf(tmp_path):
    s = Searcher(5)
    s.add(unit_rows(0, 3, 5), ids=[7, 3, 9])
    s.save(tmp_path / "i.lkx")
    m = Searcher.load(tmp_path / "i.lkx", mmap=True)
    scores, got = m.search(unit_rows(1, 2, 5), 6)
    assert (got[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    ref.check_topk(scores, got, unit_rows(1, 2, 5), s.get([7, 3, 9]), 6, vector_ids=[7, 3, 9])
    Searcher(5).save(tmp_path / "empty.lkx")
    e = Searcher.load(tmp_path / "empty.lkx", mmap="verify")
    assert len(e) == 0 and e.search(unit_rows(2, 1, 5), 2)[1].tolist() == [[-1, -1]]


def test_opening_maps_without_reading_and_a_search_copies_nothing_whole(tmp_path):
    """200k x 64 (51 MB): opening touches none of the vectors' pages (resident file pages grow by far less than
    the file) and a search allocates its buffers and heaps, not a copy of the vectors."""
    n, d = 200_000, 64
    x = np.random.default_rng(3).standard_normal((n, d), dtype=np.float32)
    s = Searcher(d, metric="ip")
    s.add(x)
    path = tmp_path / "big.lkx"
    s.save(path)
    del s
    size = path.stat().st_size
    before = rss_file_kib()
    m = Searcher.load(path, mmap=True)
    after = rss_file_kib()
    if before is not None:
        assert (after - before) * 1024 < size / 8, (before, after, size)
    tracemalloc.start()
    try:
        scores, got = m.search(x[:2], 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 2, (peak, size)  # the 4-16 MiB score buffer, never the 51 MB of vectors
    assert got[:, 0].tolist() == [0, 1]
    ref.check_topk(scores, got, x[:2], x, 5, atol=1e-3)


# -- Searcher: damaged and crafted files ---------------------------------------------------------------------


def saved_with_meta(tmp_path):
    s = Searcher(4)
    s.add(unit_rows(6, 5, 4), ids=[4, 8, 15, 16, 23], meta=["a", None, "cé", "d", "e"],
          stamps=[FileStamp(1, 2, bytes(32))] + [None] * 4)
    path = tmp_path / "i.lkx"
    s.save(path)
    return s, path


def test_damaged_parts_read_at_open_are_refused_at_open(tmp_path):
    s, path = saved_with_meta(tmp_path)
    raw = path.read_bytes()
    start = raw.index(b"\n") + 1
    assert start % 64 == 0 and (start + 5 * 8) % 8 == 0  # the vectors sit 8-aligned
    meta_at = start + 5 * 8 + 5 * 16 + 5 * 48
    cases = [
        ("truncated", raw[:-3], rf"{path}: truncated or damaged index: payload is {len(raw) - start - 3} bytes, "
                                rf"header says {len(raw) - start}"),
        ("appended", raw + b"\0", r"truncated or damaged index: payload is \d+ bytes"),
        ("header only", raw[:start], r"payload is 0 bytes"),
        ("edited header", raw.replace(b'"metric": "cosine"', b'"metric": "ip"    '),
         rf"{path}: checksum mismatch in the header"),
        ("id byte", raw[: start + 9] + bytes([raw[start + 9] ^ 1]) + raw[start + 10 :],
         r"checksum mismatch in the ids section"),
        ("stamp byte", raw[: start + 5 * 24] + b"\x07" + raw[start + 5 * 24 + 1 :],
         r"checksum mismatch in the stamps section"),
        ("meta byte", raw[:-1] + b"x", r"checksum mismatch in the meta section"),
        ("meta offset", raw[:meta_at] + b"\x01" + raw[meta_at + 1 :], r"checksum mismatch in the meta section"),
        ("not an index", b"\x89PNG\r\n\x1a\n" + raw[8:], r"is not a lookalike index file"),
    ]
    for name, bad, message in cases:
        path.write_bytes(bad)
        for mmap in (True, False):
            with pytest.raises(IndexFileError, match=message):
                Searcher.load(path, mmap=mmap)


def test_damaged_vectors_open_mapped_and_are_refused_by_verify(tmp_path):
    s, path = saved_with_meta(tmp_path)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\n") + 1
    raw[start + 5 * 8 + 17] ^= 0x40  # a byte of the vectors
    path.write_bytes(bytes(raw))
    m = Searcher.load(path, mmap=True)  # opening does not read the vectors
    with pytest.raises(IndexFileError, match=rf"{path}: checksum mismatch in the vectors section"):
        m.verify()
    with pytest.raises(IndexFileError, match=r"checksum mismatch in the vectors section"):
        Searcher.load(path, mmap="verify")
    with pytest.raises(IndexFileError, match=r"checksum mismatch in the vectors section"):
        Searcher.load(path)
    for write in (lambda: m.add(unit_rows(0, 1, 4)), lambda: m.remove([4]), lambda: m.save(tmp_path / "o.lkx")):
        with pytest.raises(IndexFileError, match=r"checksum mismatch in the vectors section"):
            write()  # damaged vectors never reach memory or a new file under a fresh checksum
    assert m.mapped and len(m) == 5 and not (tmp_path / "o.lkx").exists()


@pytest.mark.parametrize("case, message", [
    ("duplicate id", r"id 3 is stored 2 times \(1 ids repeated\)"),
    ("negative id", r"ids must be >= 0, found -5 \(row 1\)"),
    ("next_id", r"next_id 9 is not above the largest id 9"),
    ("increasing ids, next_id", r"next_id 5 is not above the largest id 9"),
    ("bad meta", r"the meta string of row 1 is not valid UTF-8"),
    ("bad stamp", r"stamps must have a size >= 0, or -1 with every other field zero; rows \[2\]"),
])
def test_crafted_files_with_right_digests_are_refused_at_open(tmp_path, case, message):
    ids, next_id, meta, stamps = [0, 9, 3], None, None, None
    if case == "duplicate id":
        ids = [3, 9, 3]
    elif case == "negative id":
        ids = [0, -5, 3]
    elif case == "next_id":
        next_id = 9
    elif case == "increasing ids, next_id":
        ids, next_id = [0, 3, 9], 5
    elif case == "bad meta":
        meta = ["a", "\udcff", "c"]
    elif case == "bad stamp":
        stamps = [None, None, (-3, 0, bytes(32))]
    if meta is not None:  # not UTF-8: written by hand, as no str encodes to it
        path = write_index_v3(tmp_path / "i.lkx", ids, unit_rows(0, 3, 5), meta=["a", "b", "c"])
        raw = path.read_bytes()
        line, body = raw.split(b"\n", 1)
        header = json.loads(line[len(MAGIC):])
        body = body[:-2] + b"\xff" + body[-1:]
        header["section_sha256"]["meta"] = hashlib.sha256(body[3 * 8 + 3 * 20 :]).hexdigest()
        del header["sha256"]
        path = write_raw_v3(path, header, body)
    else:
        path = write_index_v3(tmp_path / "i.lkx", ids, unit_rows(0, 3, 5), next_id=next_id, stamps=stamps)
    for mmap in (True, False):
        with pytest.raises(IndexFileError, match=rf"{path}: damaged index: {message}"):
            Searcher.load(path, mmap=mmap)


def write_raw_v3(path, header, body):
    line = MAGIC + json.dumps({**header, "sha256": hashlib.sha256(json.dumps(header, sort_keys=True).encode())
                               .hexdigest()}, sort_keys=True).encode()
    path.write_bytes(line + b" " * (-(len(line) + 1) % 64) + b"\n" + body)
    return path


def test_crafted_vectors_with_right_digests_open_and_fail_verify(tmp_path):
    x = unit_rows(0, 3, 5)
    x[1, 2] = np.nan
    path = write_index_v3(tmp_path / "i.lkx", [0, 1, 2], x)
    m = Searcher.load(path, mmap=True)
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index: vectors hold NaN or inf in rows \[1\]"):
        m.verify()
    with pytest.raises(IndexFileError, match=r"damaged index: vectors hold NaN"):
        Searcher.load(path)


@pytest.mark.parametrize("fields, message", [
    # (8 + 4 * 5) bytes a vector: refused by its size, nothing read
    ({"count": 10**15}, r"payload is \d+ bytes, header says 28000000000000000"),
    ({"dim": 2**40}, r"payload is \d+ bytes, header says"),
    ({"section_sha256": None}, r"damaged index header \(section_sha256=None"),
    ({"section_sha256": {"ids": "0", "vectors": "0"}}, r"damaged index header \(section_sha256="),
    ({"meta_bytes": 3}, r"damaged index header \(section_sha256=.*null for the others"),
])
def test_crafted_headers_are_refused_at_open(tmp_path, fields, message):
    path = write_index_v3(tmp_path / "i.lkx", [0, 1, 2], unit_rows(0, 3, 5), fields=fields)
    for mmap in (True, False):
        with pytest.raises(IndexFileError, match=message):
            Searcher.load(path, mmap=mmap)


def test_an_unaligned_version3_file_is_refused_by_mmap_but_reads_whole(tmp_path):
    path = write_index_v3(tmp_path / "i.lkx", [0, 1, 2], unit_rows(0, 3, 5))
    raw = path.read_bytes()
    line, body = raw.split(b"\n", 1)
    line = line.rstrip(b" ")
    line += b" " * next(k for k in range(4) if (len(line) + k + 1) % 4 == 1)  # JSON and digests unchanged
    path.write_bytes(line + b"\n" + body)  # the payload starts 1 byte past a multiple of 4
    with pytest.raises(IndexFileError, match=rf"{path}: damaged index: the vectors start at byte \d+, not a "
                                             rf"multiple of 4 \(save aligns them\)"):
        Searcher.load(path, mmap=True)
    assert Searcher.load(path).ids.tolist() == [0, 1, 2]


def test_mmap_argument_is_checked(tmp_path):
    Searcher(3).save(tmp_path / "i.lkx")
    with pytest.raises(InputError, match=r"mmap must be False, True or 'verify', got 'yes'"):
        Searcher.load(tmp_path / "i.lkx", mmap="yes")


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_are_read_whole_with_a_warning(tmp_path, version):
    x = unit_rows(4, 6, 5)
    ids = [5, 1, 9, 2, 0, 7]
    path = (write_index if version == 1 else write_index_v2)(tmp_path / "old.lkx", ids, x)
    with pytest.warns(UserWarning, match=rf"{path}: index format version {version} cannot be memory-mapped .* "
                                         rf"read whole instead; save it again"):
        s = Searcher.load(path, mmap=True)
    assert not s.mapped and s.ids.tolist() == ids
    s.save(path)
    m = Searcher.load(path, mmap=True)
    assert m.mapped
    same_answers(m.search(x, 4), s.search(x, 4))


# -- Searcher: writes -----------------------------------------------------------------------------------------


def test_add_and_remove_copy_into_memory_first_and_leave_the_file_alone(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 16))
    s = Searcher(16)
    s.add(x, meta=[str(i) for i in range(500)])
    path = tmp_path / "i.lkx"
    s.save(path)
    raw = path.read_bytes()
    for op in ("add", "remove", "remove unknown"):
        m, twin = Searcher.load(path, mmap=True), Searcher.load(path)
        if op == "add":
            y = rng.standard_normal((7, 16))
            got = m.add(y, meta=["new"] * 7)
            assert got.tolist() == twin.add(y, meta=["new"] * 7).tolist() == list(range(500, 507))
            assert not m.mapped
        elif op == "remove":
            assert m.remove([3, 499, 10**9]) == twin.remove([3, 499, 10**9]) == 2
            assert not m.mapped and m._vectors.flags.writeable
        else:
            assert m.remove([10**9]) == 0 and m.mapped  # nothing to change: still mapped
        q = rng.standard_normal((9, 16))
        same_answers(m.search(q, 11), twin.search(q, 11))
        assert m.meta() == twin.meta() and np.array_equal(m.ids, twin.ids)
        assert path.read_bytes() == raw  # never written through the mapping


def test_a_mapped_index_without_meta_reads_and_writes_meta_like_a_plain_one(tmp_path):
    s = Searcher(6)
    s.add(unit_rows(8, 40, 6), ids=np.arange(10, 50))
    path = tmp_path / "i.lkx"
    s.save(path)
    for op in ("read", "add", "remove"):
        m, twin = Searcher.load(path, mmap=True), Searcher.load(path)
        assert m.meta() == twin.meta() == [None] * 40 and m.stamps() == [None] * 40
        assert m.meta([12, 49]) == [None, None] and m.stamps([11]) == [None]
        with pytest.raises(KeyError, match="id 5 is not in the index"):
            m.meta([5])
        if op == "add":
            for t in (m, twin):
                t.add(unit_rows(9, 2, 6), meta=["x", None], stamps=[FileStamp(3, 4, bytes(32)), None])
        elif op == "remove":
            assert m.remove([10, 33]) == twin.remove([10, 33]) == 2
        assert m.meta() == twin.meta() and m.stamps() == twin.stamps()
        m.save(tmp_path / "m.lkx")
        twin.save(tmp_path / "t.lkx")
        assert (tmp_path / "m.lkx").read_bytes() == (tmp_path / "t.lkx").read_bytes()


def test_saving_over_the_mapped_file_keeps_the_mapping_valid(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 8))
    s = Searcher(8)
    s.add(x, meta=[f"m{i}" for i in range(300)])
    path = tmp_path / "i.lkx"
    s.save(path)
    q = rng.standard_normal((5, 8))
    m = Searcher.load(path, mmap=True)
    want = m.search(q, 7)
    m.save(path)  # the very file it maps: a new file renamed over it
    assert m.mapped
    same_answers(m.search(q, 7), want)
    same_answers(Searcher.load(path, mmap="verify").search(q, 7), want)
    other = Searcher(8)
    other.add(-x[:10])
    other.save(path)  # another index over the mapped file: the mapping keeps the old data
    same_answers(m.search(q, 7), want)
    m.verify()
    m.remove([0, 1])  # copied into memory, then saved over the file again
    m.save(path)
    t = Searcher.load(path, mmap=True)
    assert len(t) == 298 and 0 not in t and t.meta([2]) == ["m2"]
    same_answers(t.search(q, 7), m.search(q, 7))
    assert [p.name for p in tmp_path.iterdir()] == ["i.lkx"]  # no temporary file left


# -- IVFSearcher ----------------------------------------------------------------------------------------------


def trained_ivf(tmp_path, metric="cosine"):
    x = clustered(3, 4000, 16)
    s = IVFSearcher(16, metric=metric, nlist=16, nprobe=4)
    s.add(x)
    assert s.is_trained
    s.remove(np.arange(0, 4000, 7))
    path = tmp_path / "i.lkv"
    s.save(path)
    return s, x, path


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_ivf_mapped_load_answers_as_plain_load_and_oracle(tmp_path, metric):
    s, x, path = trained_ivf(tmp_path, metric)
    plain, m = IVFSearcher.load(path), IVFSearcher.load(path, mmap=True)
    assert m.mapped and not plain.mapped and len(m) == len(s)
    q = clustered(4, 40, 16)
    for nprobe in (1, 4, 16):
        for k in (1, 10):
            same_answers(m.search(q, k, nprobe=nprobe), plain.search(q, k, nprobe=nprobe))
    scores, got = m.search(q, 10, nprobe=16)  # every list: exact
    ids = m.ids
    ref.check_topk(scores, got, m._coerce(q, "q", allow_1d=False), m.get(ids), 10, vector_ids=ids)
    np.testing.assert_array_equal(np.sort(m.ids), np.sort(plain.ids))
    np.testing.assert_array_equal(m.get(ids[:50]), plain.get(ids[:50]))
    np.testing.assert_array_equal(m.list_sizes, plain.list_sizes)
    m.verify()


def test_ivf_damaged_files_are_refused_at_open_and_by_verify(tmp_path):
    arrays = small_index()
    path = write_ivf(tmp_path / "i.lkv", **arrays)
    raw = path.read_bytes()
    start = raw.index(b"\n") + 1
    assert start % 64 == 0
    for bad, message in [
        (raw[:-4], r"truncated or damaged index: payload is \d+ bytes, header says \d+"),
        (raw.replace(b'"nprobe": 2', b'"nprobe": 3'), r"checksum mismatch in the header"),
        (raw[: start + 3] + bytes([raw[start + 3] ^ 1]) + raw[start + 4 :], r"checksum mismatch in the centroids"),
        (raw[: start + 32 + 9] + b"\x05" + raw[start + 32 + 10 :], r"checksum mismatch in the offsets"),
        (raw[: start + 32 + 24 + 1] + b"\x05" + raw[start + 32 + 24 + 2 :], r"checksum mismatch in the ids"),
    ]:
        path.write_bytes(bad)
        with pytest.raises(IndexFileError, match=message):
            IVFSearcher.load(path, mmap=True)
    path.write_bytes(raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:])  # a vector byte
    m = IVFSearcher.load(path, mmap=True)
    with pytest.raises(IndexFileError, match=rf"{path}: checksum mismatch in the vectors section"):
        m.verify()
    with pytest.raises(IndexFileError, match=r"checksum mismatch in the vectors section"):
        m.add(arrays["vectors"][:1])
    with pytest.raises(IndexFileError, match=r"checksum mismatch in the vectors section"):
        IVFSearcher.load(path)
    crafted = dict(arrays, ids=[4, 9, 1, 0, 9, 3])
    path = write_ivf(tmp_path / "c.lkv", **crafted)
    with pytest.raises(IndexFileError, match=r"damaged index: id 9 is stored 2 times"):
        IVFSearcher.load(path, mmap=True)
    path = write_ivf(tmp_path / "c.lkv", **dict(arrays, offsets=[0, 4, 3]))
    with pytest.raises(IndexFileError, match=r"damaged index: list offsets must rise from 0 to count 6"):
        IVFSearcher.load(path, mmap=True)
    path = write_ivf(tmp_path / "c.lkv", **arrays, digests={"ids": None})
    with pytest.raises(IndexFileError, match=r"damaged index header \(section_sha256="):
        IVFSearcher.load(path, mmap=True)
    with pytest.warns(UserWarning, match=r"IVF index format version 1 cannot be memory-mapped"):
        old = IVFSearcher.load(write_ivf(tmp_path / "v1.lkv", version=1, **arrays), mmap=True)
    assert not old.mapped and len(old) == 6


def test_ivf_writes_copy_into_memory_and_save_over_the_mapped_file(tmp_path):
    s, x, path = trained_ivf(tmp_path)
    raw = path.read_bytes()
    q = clustered(5, 20, 16)
    for op in ("add", "remove", "train"):
        m, twin = IVFSearcher.load(path, mmap=True), IVFSearcher.load(path)
        if op == "add":
            assert np.array_equal(m.add(x[:30]), twin.add(x[:30]))
        elif op == "remove":
            assert m.remove(np.arange(1, 100)) == twin.remove(np.arange(1, 100))
        else:
            m.train(x[:800])
            twin.train(x[:800])
        assert not m.mapped
        same_answers(m.search(q, 10), twin.search(q, 10))
        assert path.read_bytes() == raw
    m = IVFSearcher.load(path, mmap=True)
    want = m.search(q, 10, nprobe=3)
    m.save(path)  # over the file it maps
    assert m.mapped
    same_answers(m.search(q, 10, nprobe=3), want)
    assert path.read_bytes() == raw  # the same index writes the same bytes
    IVFSearcher(16, nlist=4).save(path)  # another index over it: the mapping keeps the old data
    same_answers(m.search(q, 10, nprobe=3), want)
    m.verify()
    assert os.listdir(tmp_path) == ["i.lkv"]
