"""Thread and BLAS control shared by the engine's searches: where its worker threads come from and how many
threads numpy's BLAS uses meanwhile.

- ``worker_pool(threads)``: the process-wide pool of ``threads`` worker threads (created once, shared by the
  top-k search and k-means; a forked child starts with none);
- ``blas_single_thread()``: BLAS at one thread per call while any caller is inside (threadpoolctl), the
  original count restored after the last; ``blas_controllable()`` says whether threadpoolctl reaches the BLAS;
- ``numba_parallel_guard()``: serialises numba parallel calls where its "workqueue" threading layer would
  abort on concurrent ones;
- ``default_threads()``: the cores numba would use.

Imports nothing else of the project; numba and threadpoolctl load when first needed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

_pools = {}  # threads -> ThreadPoolExecutor
_pool_lock = threading.Lock()
_workqueue_lock = threading.Lock()


def _reset_after_fork():
    global _pools, _blas_limiter, _blas_users
    _pools, _blas_limiter, _blas_users = {}, None, 0


os.register_at_fork(after_in_child=_reset_after_fork)  # a child has no worker threads


def worker_pool(threads: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``threads`` worker threads (created once; the k-means kernels share it)."""
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lookalike-topk")
        return _pools[threads]


def numba_parallel_guard():
    """numba's "workqueue" threading layer aborts on concurrent parallel calls: serialise them there."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return _workqueue_lock
    return _workqueue_lock if layer == "workqueue" else contextlib.nullcontext()


_blas_controller = None  # threadpoolctl controller of the loaded BLAS libraries, False if none
_blas_seen_modules = -1  # len(sys.modules) when the controller was built
_blas_lock = threading.Lock()
_blas_limiter = None
_blas_users = 0


def _blas():
    """The controller of every BLAS loaded now. A BLAS loads with an import (scipy brings its own OpenBLAS
    beside numpy's), so the libraries are scanned again whenever the set of imported modules has grown; between
    imports the scan is cached (it costs milliseconds, a search call microseconds)."""
    global _blas_controller, _blas_seen_modules
    if _blas_controller is None or (_blas_users == 0 and len(sys.modules) != _blas_seen_modules):
        _blas_seen_modules = len(sys.modules)
        try:
            from threadpoolctl import ThreadpoolController

            ctl = ThreadpoolController().select(user_api="blas")
            _blas_controller = ctl if ctl.lib_controllers else False
        except Exception:  # threadpoolctl missing or unable to read the libraries
            _blas_controller = False
    return _blas_controller


def blas_controllable() -> bool:
    """Whether the BLAS thread count can be set (threadpoolctl found numpy's BLAS)."""
    return bool(_blas())


@contextlib.contextmanager
def blas_single_thread():
    """BLAS at one thread per call while any caller is inside; the original count comes back after the last.
    Does nothing when threadpoolctl cannot reach the BLAS (``blas_controllable()`` is False)."""
    global _blas_limiter, _blas_users
    if not _blas():
        yield
        return
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas().limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def default_threads() -> int:
    """Cores numba would use (NUMBA_NUM_THREADS, default all cores): a natural ``threads`` for worker mode."""
    import numba

    return max(1, int(numba.config.NUMBA_NUM_THREADS))
