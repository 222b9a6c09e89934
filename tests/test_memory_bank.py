"""engine.memory_bank.MemoryBank: each method against the numpy oracles in tests/bank_reference.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from bank_reference import check_knn, inertia_ref, set_ref, update_ref
from engine.errors import IndexFileError, InputError
from engine.memory_bank import MemoryBank


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("dim", [1, 3, 97, 256])
def test_init_unit_rows_seeded(dim):
    bank = MemoryBank(50, dim, mixing_rate=0.3, seed=4)
    assert len(bank) == 50 and bank.dim == dim and bank.mixing_rate == 0.3
    v = bank.vectors
    assert v.shape == (50, dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    g = np.random.default_rng(4).standard_normal((50, dim), dtype=np.float32).astype(np.float64)
    np.testing.assert_allclose(v, g / np.linalg.norm(g, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(v, MemoryBank(50, dim, mixing_rate=0.3, seed=4).vectors)
    assert not np.array_equal(v, MemoryBank(50, dim, seed=5).vectors)


def test_init_is_roughly_uniform_on_the_sphere():
    v = MemoryBank(20000, 3, seed=0).vectors.astype(np.float64)
    np.testing.assert_allclose(v.mean(axis=0), 0.0, atol=0.02)  # E[v] = 0
    np.testing.assert_allclose(v.T @ v / len(v), np.eye(3) / 3, atol=0.01)  # E[v v^T] = I / dim


def test_vectors_view_is_read_only():
    bank = MemoryBank(5, 3)
    with pytest.raises(ValueError):
        bank.vectors[0, 0] = 1.0


@pytest.mark.parametrize(
    "args,kwargs,words",
    [
        ((0, 3), {}, "n (number of bank rows) must be >= 1, got 0"),
        ((5, 0), {}, "dim must be >= 1, got 0"),
        ((5.0, 3), {}, "must be an integer, got 5.0"),
        ((5, 3), {"mixing_rate": 0.0}, "mixing_rate must be a number in (0, 1], got 0.0"),
        ((5, 3), {"mixing_rate": 1.5}, "got 1.5"),
        ((5, 3), {"mixing_rate": float("nan")}, "got nan"),
    ],
)
def test_bad_construction(args, kwargs, words):
    with pytest.raises(InputError) as e:
        MemoryBank(*args, **kwargs)
    assert words in str(e.value)
    assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------- set / fill / update
def test_set_and_fill_normalise_and_last_repeat_wins():
    rng = np.random.default_rng(1)
    bank = MemoryBank(10, 97, seed=1)
    before = bank.vectors.copy()
    idx = np.array([3, 9, 3])
    new = rng.standard_normal((3, 97)) * 4  # float64 input is accepted and converted
    bank.set(idx, new)
    np.testing.assert_allclose(bank.vectors, set_ref(before, idx, new.astype(np.float32)), atol=1e-6)
    full = rng.standard_normal((10, 97)).astype(np.float32) * 0.01
    bank.fill(full)
    np.testing.assert_allclose(bank.vectors, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("dim", [1, 3, 97, 256])
@pytest.mark.parametrize("batch", [1, 7, 1024, 4099])  # dim 256 x 4099 rows: checked, then 2 slices
def test_update_matches_loop_oracle(dim, batch):
    rng = np.random.default_rng(dim + batch)
    bank = MemoryBank(200, dim, mixing_rate=0.4, seed=2)
    before = bank.vectors.copy()
    idx = rng.integers(200, size=batch)  # repeats whenever batch > 1 is large
    new = unit(rng, batch, dim)
    bank.update(idx, new)
    np.testing.assert_allclose(bank.vectors, update_ref(before, idx, new, 0.4), atol=3e-6)


def test_update_coerces_lists_and_float64():
    bank = MemoryBank(4, 3, seed=3)
    before = bank.vectors.copy()
    bank.update([2, 2], [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    new = np.array([[1.0, 0, 0], [0, 2.0, 0]], np.float32)
    np.testing.assert_allclose(bank.vectors, update_ref(before, [2, 2], new, 0.5), atol=1e-6)


def _fast_path_batch(case):
    """(idx int64, new float32) C arrays (the update's fast path) with one problem each, or none."""
    rng = np.random.default_rng(7)
    idx = rng.integers(10, size=6)
    new = unit(rng, 6, 5)
    if case == "index out of range":
        idx[4] = 10
    elif case == "NaN in the last row":  # found after five rows were mixed: they must be undone
        new[5, 2] = np.nan
    elif case == "|new| = 1e20 (float32 squares overflow)":
        new[3] *= np.float32(1e20)
    elif case == "2-D indices":
        idx = idx[:, None]
    elif case == "read-only vectors":
        new.flags.writeable = False
    elif case == "strided vectors":
        new = np.repeat(new, 2, axis=1)[:, ::2]
    return idx, new


@pytest.mark.parametrize(
    "case,error",
    [
        ("none", None),
        ("index out of range", "indices must lie in [0, 10) (the bank has 10 rows), got indices[4] = 10"),
        ("NaN in the last row", "vectors rows [5] (1 of 6) hold NaN or inf"),
        ("2-D indices", "indices must be a 1-D array of row numbers, got shape (6, 1)"),
        ("|new| = 1e20 (float32 squares overflow)", None),
        ("read-only vectors", None),
        ("strided vectors", None),
    ],
)
def test_update_fast_path_inputs(case, error):
    bank = MemoryBank(10, 5, seed=6)
    before = bank.vectors.copy()
    idx, new = _fast_path_batch(case)
    if error is None:
        bank.update(idx, new)
        np.testing.assert_allclose(bank.vectors, update_ref(before, idx, new, 0.5), atol=1e-6)
    else:
        with pytest.raises(InputError) as e:
            bank.update(idx, new)
        assert error in str(e.value), str(e.value)
        np.testing.assert_array_equal(bank.vectors, before)  # nothing written on refusal


def test_update_cancelling_mix_keeps_row():
    bank = MemoryBank(4, 8, mixing_rate=0.5, seed=3)
    before = bank.vectors.copy()
    bank.update(np.array([1]), -before[[1]])
    np.testing.assert_array_equal(bank.vectors, before)


@pytest.mark.parametrize("method", ["set", "update"])
def test_write_validation_names_the_problem(method):
    bank = MemoryBank(10, 3, seed=0)
    before = bank.vectors.copy()
    ok = np.ones((2, 3), np.float32)
    write = getattr(bank, method)
    cases = [
        (([1, 10], ok), "indices must lie in [0, 10) (the bank has 10 rows), got indices[1] = 10"),
        (([-1, 2], ok), "got indices[0] = -1"),
        (([1.0, 2.0], ok), "indices must hold integers, got dtype float64"),
        (([[1, 2]], ok), "indices must be a 1-D array of row numbers, got shape (1, 2)"),
        (([1, 2], np.ones((2, 4))), "vectors must have shape (2, 3), got (2, 4)"),
        (([1, 2, 3], ok), "vectors must have shape (3, 3), got (2, 3)"),
        (([1, 2], np.array([["a"] * 3] * 2)), "vectors must be real numbers"),
        (([1, 2], np.array([[1, 2, 3], [np.nan, 1, 1]])), "vectors rows [1] (1 of 2) hold NaN or inf"),
        (([1, 2], np.array([[np.inf, 2, 3], [0, 1, 1]])), "vectors rows [0] (1 of 2) hold NaN or inf"),
    ]
    for (idx, vecs), words in cases:
        with pytest.raises(InputError) as e:
            write(idx, vecs)
        assert words in str(e.value), str(e.value)
        np.testing.assert_array_equal(bank.vectors, before)  # nothing written on refusal


def test_set_and_fill_refuse_zero_vectors():
    bank = MemoryBank(3, 2)
    with pytest.raises(InputError, match=r"vectors rows \[1\] \(1 of 2\) are zero"):
        bank.set([0, 1], [[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(InputError, match=r"vectors rows \[0, 2\] \(2 of 3\) are zero"):
        bank.fill(np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(InputError, match=r"vectors must have shape \(3, 2\), got \(2, 2\)"):
        bank.fill(np.ones((2, 2)))


# ---------------------------------------------------------------- neighbours
@pytest.mark.parametrize("dim", [1, 3, 97, 256])
@pytest.mark.parametrize("m", [1, 7, 1024])
def test_neighbours_matches_oracle(dim, m):
    rng = np.random.default_rng(dim * m)
    bank = MemoryBank(257, dim, seed=dim)
    q = rng.standard_normal((m, dim)).astype(np.float32) * 3  # cosine: the query's length does not matter
    s, i = bank.neighbours(q, 5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    check_knn(bank.vectors, qn, 5, None, s, i)


def test_neighbours_of_excludes_self_by_default():
    rng = np.random.default_rng(3)
    bank = MemoryBank(100, 16, seed=3)
    rows = rng.integers(100, size=7)
    s, i = bank.neighbours_of(rows, 4)
    check_knn(bank.vectors, bank.vectors[rows], 4, rows, s, i)
    assert not (i == rows[:, None]).any()
    s2, i2 = bank.neighbours_of(rows, 4, exclude_self=False)
    np.testing.assert_array_equal(i2[:, 0], rows)
    np.testing.assert_allclose(s2[:, 0], 1.0, atol=1e-6)
    np.testing.assert_array_equal(i2[:, 1:], i[:, :3])


def test_neighbours_edge_cases():
    bank = MemoryBank(3, 4, seed=0)
    s, i = bank.neighbours_of([0, 2], 5)  # k > n - 1: padded
    np.testing.assert_array_equal(i[:, 2:], -1)
    assert np.isneginf(s[:, 2:]).all()
    s, i = bank.neighbours(np.zeros((1, 4)), 2)  # a zero query: cosine 0 with every row
    np.testing.assert_array_equal(s, [[0.0, 0.0]])
    np.testing.assert_array_equal(i, [[0, 1]])
    s, i = bank.neighbours(np.zeros((0, 4)), 2)
    assert s.shape == i.shape == (0, 2)
    with pytest.raises(InputError, match=r"queries rows \[1\] \(1 of 2\) hold NaN or inf"):
        bank.neighbours(np.array([[1, 0, 0, 0], [np.nan, 0, 0, 0]]), 1)
    with pytest.raises(InputError, match=r"queries must have shape \(m, 4\), got \(4,\)"):
        bank.neighbours(np.ones(4), 1)
    with pytest.raises(InputError, match="k must be >= 1, got 0"):
        bank.neighbours(np.ones((1, 4)), 0)
    with pytest.raises(InputError, match=r"rows must lie in \[0, 3\).*got rows\[0\] = 3"):
        bank.neighbours_of([3], 1)
    for k in (10**13, 2**63 - 1):  # answered with the bank's rows, padded to 1024 columns (answer_columns)
        s, i = bank.neighbours_of([0], k)
        check_knn(bank.vectors, bank.vectors[[0]], 1024, np.array([0]), s, i)
        s, i = bank.neighbours(bank.vectors[[1, 2]], k)
        check_knn(bank.vectors, bank.vectors[[1, 2]], 1024, None, s, i)


# ---------------------------------------------------------------- cluster
def test_cluster_repeats_labels_and_centroids():
    rng = np.random.default_rng(5)
    centres = unit(rng, 6, 24).astype(np.float64)
    x = centres[np.repeat(np.arange(6), 40)] + 0.05 * rng.standard_normal((240, 24))
    bank = MemoryBank(240, 24)
    bank.fill(x)
    labels = bank.cluster(6, repeats=3, iterations=10, restarts=2, seed=1)
    assert len(labels) == 3 and len(bank.centroids) == 3 and len(bank.clusterings) == 3
    for lab, c, res in zip(labels, bank.centroids, bank.clusterings):
        assert lab.shape == (240,) and lab.dtype == np.int64 and c.shape == (6, 24)
        assert res.inertia == pytest.approx(inertia_ref(bank.vectors, c, lab), rel=1e-5)
        assert len(set(zip(lab.tolist(), np.repeat(np.arange(6), 40).tolist()))) == 6  # planted partition
    again = bank.cluster(6, repeats=3, iterations=10, restarts=2, seed=1)
    for a, b in zip(labels, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match=r"n_clusters must be in \[1, 240\], got 241"):
        bank.cluster(241)
    with pytest.raises(InputError, match="repeats must be >= 1, got 0"):
        bank.cluster(3, repeats=0)


# ---------------------------------------------------------------- persistence
def test_save_load_roundtrip(tmp_path):
    bank = MemoryBank(33, 7, mixing_rate=0.25, seed=9)
    bank.update(np.arange(5), unit(np.random.default_rng(0), 5, 7))
    path = tmp_path / "sub" / "bank.lmb"
    digest = bank.save(path)
    assert len(digest) == 64
    back = MemoryBank.load(path)
    np.testing.assert_array_equal(back.vectors, bank.vectors)
    assert back.mixing_rate == 0.25 and len(back) == 33 and back.dim == 7
    assert [p.name for p in path.parent.iterdir()] == ["bank.lmb"]  # no temporary left behind
    bank.save(path)  # overwrite in place
    np.testing.assert_array_equal(MemoryBank.load(path).vectors, bank.vectors)


def test_load_refuses_damaged_files(tmp_path):
    path = tmp_path / "bank.lmb"
    MemoryBank(10, 4, seed=0).save(path)
    raw = path.read_bytes()
    nl = raw.index(b"\n")
    header = json.loads(raw[len(b"LOOKALIKE-MEMORYBANK ") : nl])

    def damaged(data, words):
        bad = tmp_path / "bad.lmb"
        bad.write_bytes(data)
        with pytest.raises(IndexFileError) as e:
            MemoryBank.load(bad)
        assert str(bad) in str(e.value) and words in str(e.value), str(e.value)

    flipped = bytearray(raw)
    flipped[-3] ^= 0x40
    damaged(bytes(flipped), "sha256 does not match")
    damaged(raw[:-4], "truncated or damaged")
    damaged(b"PK\x03\x04" + raw[4:], "is not a lookalike memory-bank file")
    damaged(raw[: len(b"LOOKALIKE-MEMORYBANK ")] + b"{oops" + raw[nl:], "damaged memory-bank header")
    other = dict(header, version=99)
    damaged(b"LOOKALIKE-MEMORYBANK " + json.dumps(other).encode() + raw[nl:], "format version 99")
    # the header's fields are checksummed too: an edited mixing rate or shape is refused, not loaded
    for edit in ({"mixing_rate": 0.9}, {"n": -4, "dim": -10}, {"n": 4, "dim": 10}):
        damaged(b"LOOKALIKE-MEMORYBANK " + json.dumps(dict(header, **edit)).encode() + raw[nl:],
                "its header (memory-bank metadata) does not match the header's sha256")
    old = {k: v for k, v in dict(header, version=1).items() if k != "header_sha256"}  # a version 1 file
    damaged(b"LOOKALIKE-MEMORYBANK " + json.dumps(old).encode() + raw[nl:], "format version 1; this lookalike reads")
    with pytest.raises(IndexFileError, match="no memory-bank file at"):
        MemoryBank.load(tmp_path / "missing.lmb")
    with pytest.raises(IndexFileError, match=rf"cannot read memory-bank file {tmp_path}: "):
        MemoryBank.load(tmp_path)
    if Path("/dev/zero").exists():  # read up to its magic only
        with pytest.raises(IndexFileError, match=r"/dev/zero is not a lookalike memory-bank file"):
            MemoryBank.load("/dev/zero")


def test_state_dict_roundtrip_and_refusals():
    bank = MemoryBank(12, 5, mixing_rate=0.7, seed=1)
    state = bank.state_dict()
    assert isinstance(state["vectors"], np.ndarray) and state["vectors"].shape == (12, 5)
    back = MemoryBank.from_state_dict(state)
    np.testing.assert_array_equal(back.vectors, bank.vectors)
    assert back.mixing_rate == 0.7
    state["vectors"][0] = 0  # the state is a copy: the bank is untouched
    assert np.linalg.norm(bank.vectors[0]) == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"state\['vectors'\] rows \[0\] \(1 of 12\) do not"):
        MemoryBank.from_state_dict(state)
    with pytest.raises(InputError, match="expected a dict from MemoryBank.state_dict"):
        MemoryBank.from_state_dict({"vectors": bank.vectors})
    with pytest.raises(InputError, match="mixing_rate"):
        MemoryBank.from_state_dict(dict(bank.state_dict(), mixing_rate=2.0))


def test_public_name_and_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from engine import MemoryBank; MemoryBank(3, 2).neighbours_of([0], 1); "
        "assert 'torch' not in sys.modules, 'engine.memory_bank imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
