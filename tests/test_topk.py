"""engine.kernels.topk against the float64 brute-force oracle in tests/reference.py."""

import threading

import numpy as np
import pytest

from engine.kernels import topk
from engine.threads import blas_controllable
import reference as ref

# every way topk_ip can run: the fused numba pass; BLAS blocks in the calling thread (the default); BLAS
# blocks in worker threads over several parts of the rows (merged at the end)
METHODS = {
    "fused": {"method": "fused"},
    "gemm-1": {"method": "gemm", "threads": 1},
    "gemm-parts": {"method": "gemm", "threads": 2, "parts": 5},
}


def unit(rng, n, d):
    return ref.normalize(rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("d", [1, 3, 97, 256])
@pytest.mark.parametrize("nq", [1, 7, 1024])
def test_matches_oracle_odd_sizes(method, d, nq):
    rng = np.random.default_rng(d * 1000 + nq)
    n = 1500
    x = unit(rng, n + 5, d)  # rows past n must be ignored
    q = unit(rng, nq, d)
    k = 10
    scores, rows = topk.topk_ip(q, x, n, k, **METHODS[method], block_rows=256)
    ref.check_topk(scores, rows, q, x[:n], k)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("n", [1, 3, 4, 5, 63, 64, 65, 255, 256, 257, 4095, 4096, 4097, 8193, 16385])
def test_block_and_chunk_boundaries(method, n):
    """Blocks of 256 rows (gemm), chunks of n // 4096 (fused), groups of 64 and 4 rows: all edges."""
    rng = np.random.default_rng(n)
    d = 5
    x = unit(rng, n, d)
    q = unit(rng, 3, d)
    k = 7
    scores, rows = topk.topk_ip(q, x, n, k, **METHODS[method], block_rows=256)
    ref.check_topk(scores, rows, q, x, k)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("k", [1, 2, 5, 64])
def test_ties_go_to_the_lower_row(method, k):
    """Small integer data: every product is exact, so the answer must equal the oracle, order included."""
    rng = np.random.default_rng(k)
    n, d = 3000, 4
    x = rng.integers(-1, 2, size=(n, d)).astype(np.float32)  # 81 distinct vectors: heavy ties
    q = rng.integers(-2, 3, size=(9, d)).astype(np.float32)
    scores, rows = topk.topk_ip(q, x, n, k, **METHODS[method], block_rows=100)
    want_scores, want_rows = ref.topk_ip(q, x, k)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores.astype(np.float32))


@pytest.mark.parametrize("method", list(METHODS))
def test_all_equal_scores_keep_row_order(method):
    n, d, k = 5000, 8, 20
    x = np.ones((n, d), dtype=np.float32)
    q = np.ones((2, d), dtype=np.float32)
    scores, rows = topk.topk_ip(q, x, n, k, **METHODS[method], block_rows=333)
    np.testing.assert_array_equal(rows, np.tile(np.arange(k), (2, 1)))
    np.testing.assert_array_equal(scores, np.full((2, k), 8.0, dtype=np.float32))


@pytest.mark.parametrize("method", list(METHODS))
def test_zero_vectors_score_zero(method):
    rng = np.random.default_rng(3)
    d = 16
    x = unit(rng, 50, d)
    x[[4, 9, 20]] = 0.0
    q = np.vstack([np.zeros((1, d), np.float32), unit(rng, 2, d)])
    scores, rows = topk.topk_ip(q, x, 50, 50, **METHODS[method])
    ref.check_topk(scores, rows, q, x, 50)
    np.testing.assert_array_equal(scores[0], np.zeros(50, np.float32))  # zero query: all 0, row order
    np.testing.assert_array_equal(rows[0], np.arange(50))
    for i in (1, 2):
        zero_at = np.isin(rows[i], [4, 9, 20])
        np.testing.assert_array_equal(scores[i][zero_at], np.zeros(3, np.float32))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("n", [0, 1, 6])
def test_k_beyond_n_is_padded(method, n):
    rng = np.random.default_rng(n)
    x = unit(rng, 10, 3)  # only the first n rows count
    q = unit(rng, 4, 3)
    scores, rows = topk.topk_ip(q, x, n, 8, **METHODS[method])
    ref.check_topk(scores, rows, q, x[:n], 8)
    assert (rows[:, n:] == -1).all() and np.isneginf(scores[:, n:]).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_more_queries_than_one_tile(method):
    rng = np.random.default_rng(8)
    nq = topk.GEMM_MAX_QUERIES + 5
    x = unit(rng, 700, 3)
    q = unit(rng, nq, 3)
    scores, rows = topk.topk_ip(q, x, 700, 4, **METHODS[method])
    ref.check_topk(scores, rows, q, x, 4)


def test_no_queries():
    x = np.ones((5, 3), np.float32)
    scores, rows = topk.topk_ip(np.zeros((0, 3), np.float32), x, 5, 2)
    assert scores.shape == (0, 2) and rows.shape == (0, 2)


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_every_method_gives_the_same_answer(threads):
    rng = np.random.default_rng(11)
    x = unit(rng, 20000, 32)
    for nq in (16, 17):
        q = unit(rng, nq, 32)
        a = topk.topk_ip(q, x, 20000, 10, threads=threads)  # "auto"
        ref.check_topk(*a, q, x, 10)
        for method in METHODS:
            b = topk.topk_ip(q, x, 20000, 10, **METHODS[method])
            np.testing.assert_array_equal(a[1], b[1])


def test_blas_thread_count_comes_back_after_concurrent_searches():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not blas_controllable():
        pytest.skip("threadpoolctl finds no BLAS library to control")
    rng = np.random.default_rng(2)
    x = unit(rng, 40000, 16)
    q = unit(rng, 33, 16)
    want = topk.topk_ip(q, x, 40000, 5, threads=1)
    topk.topk_ip(q, x, 40000, 5, method="gemm", threads=2, parts=4)
    # read after a first search of each kind: numba's kernels load scipy's own OpenBLAS on first use
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    before = [c.num_threads for c in blas.lib_controllers]
    got = []

    def search():
        for _ in range(5):
            got.append(topk.topk_ip(q, x, 40000, 5, method="gemm", threads=2, parts=4))

    threads = [threading.Thread(target=search) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 15 and all(np.array_equal(g[1], want[1]) for g in got)
    after = [c.num_threads for c in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers]
    assert after == before


def test_merge_block_serial_keeps_the_best_across_blocks():
    """Blocks merged one by one, with ties across blocks: the lower row wins, as in the oracle."""
    rng = np.random.default_rng(5)
    nq, n, k, block = 9, 3000, 12, 700
    s = rng.integers(0, 50, size=(nq, n)).astype(np.float32)
    hs, hr = topk.heap_init(nq, k)
    for r0 in range(0, n, block):
        blk = np.ascontiguousarray(s[:, r0 : r0 + block])
        topk.merge_block_serial(blk, blk.shape[1], r0, hs, hr)
    topk.heap_sort(hs, hr)
    order = np.lexsort((np.tile(np.arange(n), (nq, 1)), -s), axis=1)[:, :k]
    np.testing.assert_array_equal(hr, order)
    np.testing.assert_array_equal(hs, np.take_along_axis(s, order, axis=1))


def test_merge_heaps_keeps_the_best_of_both():
    a_s, a_r = topk.heap_init(1, 3)
    b_s, b_r = topk.heap_init(1, 3)
    for s, r in [(0.5, 10), (0.2, 11)]:
        topk._push(a_s[0], a_r[0], np.float32(s), r)
    for s, r in [(0.5, 3), (0.9, 4), (0.1, 5)]:
        topk._push(b_s[0], b_r[0], np.float32(s), r)
    topk.merge_heaps(b_s, b_r, a_s, a_r)
    topk.heap_sort(a_s, a_r)
    assert a_r.tolist() == [[4, 3, 10]]
    np.testing.assert_array_equal(a_s, np.array([[0.9, 0.5, 0.5]], np.float32))


def test_heap_sort_orders_partial_heaps():
    hs, hr = topk.heap_init(1, 6)
    for s, r in [(0.5, 3), (0.9, 7), (0.5, 1)]:
        topk._push(hs[0], hr[0], np.float32(s), r)
    topk.heap_sort(hs, hr)
    np.testing.assert_array_equal(hr[0], [7, 1, 3, -1, -1, -1])
    np.testing.assert_array_equal(hs[0], np.array([0.9, 0.5, 0.5, -np.inf, -np.inf, -np.inf], np.float32))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be"):
        topk.topk_ip(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), 3, 1, method="magic")


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_thread_count_is_refused(threads):
    with pytest.raises(ValueError, match=f"threads must be None or a positive int, got {threads!r}"):
        topk.topk_ip(np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), 3, 1, threads=threads)


def test_no_full_score_matrix_is_allocated():
    """Memory stays bounded: a search's numpy allocations are its buffers and heaps, not (nq, n) scores."""
    import tracemalloc

    rng = np.random.default_rng(4)
    n, nq = 200_000, 64
    x = unit(rng, n, 8)
    q = unit(rng, nq, 8)
    topk.topk_ip(q, x, n, 10)  # warm up
    tracemalloc.start()
    topk.topk_ip(q, x, n, 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < nq * n * 4 / 4, peak  # (nq, n) float32 would be 51 MB
