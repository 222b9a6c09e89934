"""engine.kernels.bank against the slow numpy oracles in tests/bank_reference.py."""

import numpy as np
import pytest

from engine.kernels import bank as K
from bank_reference import check_knn, normalise_ref, set_ref, update_ref

DIMS = [1, 3, 97, 256]
BATCHES = [1, 7, 1024]


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def sliced(bank, idx, new, r):
    """K.update with room for 5 old rows: longer batches are checked first and updated in slices."""
    return K.update(bank, idx, new, r, log_bytes=5 * 4 * bank.shape[1])


METHODS = [K.update, sliced]


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("r", [0.5, 0.3, 1.0])
def test_update_matches_loop_oracle(dim, batch, r):
    rng = np.random.default_rng(dim * 1000 + batch)
    n = 50  # batch 1024 over 50 rows: every row repeats many times
    bank = unit(rng, n, dim)
    idx = rng.integers(n, size=batch)
    new = (rng.standard_normal((batch, dim)) * 3).astype(np.float32)  # not unit: the rule does not need it
    want = update_ref(bank, idx, new, r)
    for kernel in METHODS:
        got = bank.copy()
        assert kernel(got, idx, new, r) == K.OK
        np.testing.assert_allclose(got, want, atol=2e-6)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_sliced_update_is_bit_identical_with_repeats_across_slices():
    # ~67 repeats per row, scattered through the batch and so across the 5-row slices: batch order must hold.
    rng = np.random.default_rng(1)
    bank = unit(rng, 300, 97)
    idx = rng.integers(300, size=20000)
    new = rng.standard_normal((20000, 97)).astype(np.float32)
    a, b = bank.copy(), bank.copy()
    assert K.update(a, idx, new, 0.37) == sliced(b, idx, new, 0.37) == K.OK
    np.testing.assert_array_equal(b, a)
    np.testing.assert_allclose(a, update_ref(bank, idx, new, 0.37), rtol=0, atol=2e-6)


def test_repeats_apply_in_batch_order():
    # Row 0 mixed with e1 then e2 differs from e2 then e1: the batch order decides.
    bank = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    new = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    x = 0.5 * np.array([0.0, 1.0, 0.0]) + 0.5 * np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    x = 0.5 * np.array([0.0, 0.0, 1.0]) + 0.5 * x
    for kernel in METHODS:
        got = bank.copy()
        kernel(got, np.array([0, 0]), new, 0.5)
        np.testing.assert_allclose(got[0], x / np.linalg.norm(x), atol=1e-7)


@pytest.mark.parametrize("r", [0.5, 0.25, 0.8])
def test_cancelling_mix_keeps_old_row(r):
    rng = np.random.default_rng(2)
    bank = unit(rng, 4, 97)
    new = (-(1 - r) / r * bank[[1, 2]]).astype(np.float32)  # r*new + (1-r)*old == 0 up to rounding
    for kernel in METHODS:
        got = bank.copy()
        assert kernel(got, np.array([1, 2]), new, r) == K.OK
        np.testing.assert_array_equal(got, bank)
    np.testing.assert_array_equal(update_ref(bank, np.array([1, 2]), new, r), bank)


def test_zero_new_vector_shrinks_to_old_direction():
    rng = np.random.default_rng(3)
    bank = unit(rng, 3, 7)
    got = bank.copy()
    K.update(got, np.array([2]), np.zeros((1, 7), np.float32), 0.5)
    np.testing.assert_allclose(got, bank, atol=1e-7)


@pytest.mark.parametrize("kernel", METHODS)
def test_update_refuses_bad_batch_without_writing(kernel):
    rng = np.random.default_rng(4)
    bank = unit(rng, 10, 3)
    new = unit(rng, 3, 3)
    for idx in (np.array([0, 10, 1]), np.array([0, -1, 1])):
        got = bank.copy()
        assert kernel(got, idx, new, 0.5) == K.BAD_INDEX
        np.testing.assert_array_equal(got, bank)
    for bad in (np.nan, np.inf, -np.inf):
        nan = new.copy()
        nan[2, 1] = bad
        got = bank.copy()
        assert kernel(got, np.array([0, 1, 2]), nan, 0.5) == K.NOT_FINITE
        np.testing.assert_array_equal(got, bank)


@pytest.mark.parametrize("kernel", METHODS)
def test_update_undoes_rows_written_before_a_late_bad_row(kernel):
    # One pass with an undo log: rows 1 and 4 are written (row 1 twice) before row 6's NaN is seen; the log is
    # replayed newest first, so the repeated row ends at its original value, not at an intermediate one.
    # (Sliced, the batch is checked before any slice is written.)
    rng = np.random.default_rng(6)
    bank = unit(rng, 8, 128)
    idx = np.array([1, 4, 1, 6, 4, 1, 2])
    new = unit(rng, 7, 128)
    new[6, 100] = np.nan
    got = bank.copy()
    assert kernel(got, idx, new, 0.5) == K.NOT_FINITE
    np.testing.assert_array_equal(got, bank)


@pytest.mark.parametrize("kernel", METHODS)
@pytest.mark.parametrize("r", [0.5, 1.0])
def test_update_rows_beyond_float32_squares_match_the_float64_oracle(kernel, r):
    # |new| ~ 1e25 overflows a float32 sum of squares and |new| ~ 1e-25 underflows it; such rows are decided
    # in float64, in batch order with the ordinary rows around them.
    rng = np.random.default_rng(7)
    bank = unit(rng, 20, 97)
    idx = np.array([3, 5, 3, 7, 9, 5])
    new = rng.standard_normal((6, 97)).astype(np.float32)
    new[1] *= np.float32(1e25)
    new[3] *= np.float32(1e-25)
    want = update_ref(bank, idx, new, r)
    got = bank.copy()
    assert kernel(got, idx, new, r) == K.OK
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got[[5, 7]], axis=1), 1.0, atol=1e-6)


def test_update_kernel_compiles_per_dimension():
    assert K.update_kernel(97) is K.update_kernel(97)
    assert K.update_kernel(97) is not K.update_kernel(98)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match="dim must be a positive int"):
            K.update_kernel(bad)


def test_set_rows_last_repeat_wins():
    rng = np.random.default_rng(5)
    bank = unit(rng, 6, 97)
    idx = np.array([4, 1, 4])
    new = (rng.standard_normal((3, 97)) * 5).astype(np.float32)
    got = bank.copy()
    K.set_rows(got, idx, new)
    np.testing.assert_allclose(got, set_ref(bank, idx, new), atol=1e-7)
    np.testing.assert_allclose(got[4], new[2] / np.linalg.norm(new[2].astype(np.float64)), atol=1e-7)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kernel", [K._normalise_rows_serial, K._normalise_rows_parallel], ids=["serial", "parallel"])
def test_normalise_rows_zero_row_stays_zero(dim, kernel):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((7, dim)).astype(np.float32) * 10
    x[3] = 0
    out = np.empty_like(x)
    kernel(x, out)
    np.testing.assert_allclose(out, normalise_ref(x), atol=1e-7)
    assert not out[3].any()


@pytest.mark.parametrize("extra", [-1, 0], ids=["below", "at"])
def test_normalise_rows_either_side_of_the_parallel_threshold(extra):
    """The public function gives the oracle's rows whichever kernel its size picks."""
    dim = 128
    rows = K.PARALLEL_NORMALISE_FLOATS // dim + extra
    x = np.random.default_rng(rows).standard_normal((rows, dim)).astype(np.float32)
    x[rows // 2] = 0
    out = np.empty_like(x)
    K.normalise_rows(x, out)
    np.testing.assert_allclose(out, normalise_ref(x), atol=1e-7)
    assert not out[rows // 2].any()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("m", BATCHES)
def test_knn_matches_oracle(dim, m):
    rng = np.random.default_rng(10 * dim + m)
    n = 300
    bank = unit(rng, n, dim)
    rows = rng.integers(n, size=m)
    q = np.ascontiguousarray(bank[rows])
    for k, exclude in ((1, rows), (10, rows), (10, np.full(m, -1, np.int64))):
        # both search methods; small BLAS blocks exercise the block merge
        for blocks in ({"method": "gemm", "block_rows": 37}, {"method": "fused"}, {}):
            s, i = K.knn(bank, q, k, exclude, **blocks)
            check_knn(bank, q, k, exclude, s, i)
    s, i = K.knn(bank, q, 1, np.full(m, -1, np.int64))
    if dim > 1:  # (in dim 1 every row is +-1, so many rows tie with the query itself)
        np.testing.assert_array_equal(i[:, 0], rows)


def test_knn_ties_keep_lower_index_first_across_blocks():
    rng = np.random.default_rng(11)
    base = unit(rng, 4, 16)
    bank = np.ascontiguousarray(base[[0, 1, 2, 1, 3, 1, 1, 0]])  # row 1 at 1, 3, 5, 6; row 0 at 0, 7
    q = base[[1, 0]]
    for blocks in ({"method": "gemm", "block_rows": 3}, {"method": "fused"}):
        s, i = K.knn(bank, q, 5, np.array([-1, 7]), **blocks)
        np.testing.assert_array_equal(i[0, :4], [1, 3, 5, 6])
        np.testing.assert_array_equal(s[0, :4], np.full(4, s[0, 0]))
        assert i[1, 0] == 0 and i[1, 1] != 7
        check_knn(bank, q, 5, np.array([-1, 7]), s, i)


def test_knn_pads_when_k_exceeds_rows():
    rng = np.random.default_rng(12)
    bank = unit(rng, 3, 5)
    s, i = K.knn(bank, bank.copy(), 5, np.arange(3))
    np.testing.assert_array_equal(i[:, 2:], -1)
    assert np.isneginf(s[:, 2:]).all()
    check_knn(bank, bank, 5, np.arange(3), s, i)


def test_knn_zero_query_scores_zero_lowest_indices_first():
    rng = np.random.default_rng(13)
    bank = unit(rng, 9, 4)
    s, i = K.knn(bank, np.zeros((1, 4), np.float32), 3, np.array([-1]))
    np.testing.assert_array_equal(s, 0)
    np.testing.assert_array_equal(i, [[0, 1, 2]])


def test_knn_exclusion_when_self_is_not_in_the_top():
    # Row 4 duplicates rows 0..3 exactly; with k = 2 its own entry is not among the top 3 (lower rows win the
    # tie), so the last of the k + 1 is dropped instead.
    v = np.zeros((6, 3), np.float32)
    v[:5, 0] = 1
    v[5, 1] = 1
    s, i = K.knn(v, v[[4]], 2, np.array([4]))
    np.testing.assert_array_equal(i, [[0, 1]])
    np.testing.assert_array_equal(s, [[1, 1]])
    check_knn(v, v[[4]], 2, np.array([4]), s, i)


def test_knn_mixed_exclusions():
    rng = np.random.default_rng(14)
    bank = unit(rng, 40, 5)
    exclude = np.array([3, -1, 39, -1])
    q = np.ascontiguousarray(bank[[3, 3, 39, 0]])
    for k in (1, 4, 40, 45):
        s, i = K.knn(bank, q, k, exclude)
        check_knn(bank, q, k, exclude, s, i)
