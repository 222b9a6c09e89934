"""Memory follows what a file or an index holds, never what a header or ``k`` claims: ``/dev/zero``, a 4 GiB
sparse file and a header promising petabytes are refused after reading the header only, and a huge ``k``
costs no more than the stored rows.

Each case runs in a fresh interpreter whose address space is capped at 1 GiB above what it uses once its
kernels are loaded (so a regression fails with MemoryError instead of exhausting the machine) and reports,
as JSON, what it raised or returned and the peak of Python's traced allocations (numpy's included).
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
from bank_reference import check_knn

from engine.memory_bank import MAGIC as BANK_MAGIC
from engine.memory_bank import MemoryBank
from engine.searcher import MAGIC as INDEX_MAGIC
from engine.searcher import Searcher

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero and sparse files")

PEAK_LIMIT = 100 * 2**20  # what any case here may allocate at its peak
SPARSE = 4 * 2**30  # a 4 GiB file, sparse: it costs no disk

CHILD = r"""
import json, resource, sys, tracemalloc
import numpy as np
from engine.fileio import read_framed
from engine.memory_bank import MemoryBank
from engine.searcher import Searcher

Searcher(2).search(np.ones((1, 2)), 1)  # load the kernels before measuring
MemoryBank(2, 2).neighbours(np.ones((1, 2)), 1)
try:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, hard))
except (OSError, StopIteration, ValueError):  # no /proc, or a lower hard limit: tracemalloc alone
    pass
reports = {}
for name, setup, expression in json.loads(sys.argv[1]):
    space = dict(globals())
    exec(setup, space)
    tracemalloc.start()
    out = {"raised": None}
    try:
        got = eval(expression, space)
        out["arrays"] = [got[0].tolist(), got[1].tolist()]
    except Exception as e:
        out["raised"], out["message"] = type(e).__name__, str(e)
    out["peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del space
    reports[name] = out
print(json.dumps(reports))
"""

X6 = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)  # the k = 10**9 cases' index
Q1 = np.random.default_rng(1).standard_normal((1, 4)).astype(np.float32)


def sparse_tail(path, size=SPARSE):
    """Extend ``path`` to ``size`` bytes with a hole (no disk blocks)."""
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def framed_header(magic, fields):
    """A framed header line with a correct header_sha256 (computed as engine.fileio documents it)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    full = {**fields, "sha256": "0" * 64, "header_sha256": hashlib.sha256(canonical).hexdigest()}
    return magic + json.dumps(full).encode() + b"\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The crafted files, each with the length of its header line."""
    folder = tmp_path_factory.mktemp("bounded")
    made = {}
    path = folder / "grown.lkx"  # a valid index of 3 x 5 vectors (84 payload bytes), then a 4 GiB hole
    s = Searcher(5)
    s.add(np.eye(3, 5))
    s.save(path)
    made["grown index"] = (path, path.read_bytes().index(b"\n") + 1)
    sparse_tail(path)
    path = folder / "huge.lkx"  # a header promising 10**12 vectors
    header = {"format_version": 1, "dim": 128, "metric": "cosine", "count": 10**12, "next_id": 10**12,
              "model": None, "sha256": "0" * 64}
    line = INDEX_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    path.write_bytes(line)
    made["huge index"] = (sparse_tail(path), len(line))
    path = folder / "grown.lmb"  # a valid bank of 4 x 3 rows (48 payload bytes), then a 4 GiB hole
    MemoryBank(4, 3).save(path)
    made["grown bank"] = (path, path.read_bytes().index(b"\n") + 1)
    sparse_tail(path)
    path = folder / "huge.lmb"  # a framed header (its digest correct) promising a petabyte
    line = framed_header(BANK_MAGIC, {"version": 2, "n": 10**12, "dim": 256, "mixing_rate": 0.5, "dtype": "<f4",
                                      "nbytes": 10**15})
    path.write_bytes(line)
    made["huge bank"] = (sparse_tail(path), len(line))
    return made


@pytest.fixture(scope="module")
def reports(files):
    """What each case raised or returned, and its peak allocation, from one bounded interpreter."""
    searcher = f"s = Searcher(4); s.add(np.array({X6.tolist()}, np.float32)); q = np.array({Q1.tolist()}, np.float32)"
    cases = [
        ("index /dev/zero", "", "Searcher.load('/dev/zero')"),
        ("framed /dev/zero", "",
         "read_framed('/dev/zero', b'LOOKALIKE-CHECKPOINT ', 1, what='checkpoint', error=ValueError)"),
        *[(name, "", f"{'Searcher' if 'index' in name else 'MemoryBank'}.load({str(path)!r})")
          for name, (path, _) in files.items()],
        ("search k 1e9", searcher, "s.search(q, 10**9)"),
        ("neighbours k 1e9", "bank = MemoryBank(6, 4, seed=3)", "bank.neighbours_of(np.array([2]), 10**9)"),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def report(reports, name) -> dict:
    out = reports[name]
    assert out["peak"] < PEAK_LIMIT, f"{name}: peak allocation {out['peak'] / 2**20:.0f} MiB: {out}"
    return out


def test_searcher_load_of_dev_zero_reads_only_the_magic(reports):
    out = report(reports, "index /dev/zero")
    assert out["raised"] == "IndexFileError", out
    assert out["message"] == "/dev/zero is not a lookalike index file (no 'LOOKALIKE-INDEX' header line)"


def test_read_framed_of_dev_zero_reads_only_the_magic(reports):
    out = report(reports, "framed /dev/zero")
    assert out["raised"] == "ValueError", out
    assert out["message"] == ("/dev/zero is not a lookalike checkpoint file (it does not start with "
                              "b'LOOKALIKE-CHECKPOINT ')")


def test_an_index_grown_to_4_gib_is_refused_without_reading_it(reports, files):
    path, header_len = files["grown index"]
    out = report(reports, "grown index")
    assert out["raised"] == "IndexFileError", out
    assert out["message"] == (f"{path}: truncated or damaged index: payload is {SPARSE - header_len} bytes, "
                              f"header says 84")


def test_an_index_header_claiming_a_huge_count_is_refused_without_reading(reports, files):
    path, header_len = files["huge index"]
    out = report(reports, "huge index")
    assert out["raised"] == "IndexFileError", out
    assert out["message"] == (f"{path}: truncated or damaged index: payload is {SPARSE - header_len} bytes, "
                              f"header says {10**12 * (8 + 128 * 4)}")


def test_a_memory_bank_grown_to_4_gib_is_refused_without_reading_it(reports, files):
    path, header_len = files["grown bank"]
    out = report(reports, "grown bank")
    assert out["raised"] == "IndexFileError", out
    assert out["message"] == (f"{path} is truncated or damaged: header says 48 payload bytes, "
                              f"found {SPARSE - header_len}")


def test_a_framed_header_promising_a_petabyte_is_refused_without_reading(reports, files):
    path, header_len = files["huge bank"]
    out = report(reports, "huge bank")
    assert out["raised"] == "IndexFileError", out
    assert out["message"] == (f"{path} is truncated or damaged: header says {10**15} payload bytes, "
                              f"found {SPARSE - header_len}")


def test_search_with_k_a_billion_on_6_vectors_answers_the_6_within_bounded_memory(reports):
    """(1, 10**9) answers took 12 GB: now every stored vector, then padding to 1024 columns."""
    out = report(reports, "search k 1e9")
    assert out["raised"] is None, out
    scores, ids = np.array(out["arrays"][0], np.float32), np.array(out["arrays"][1], np.int64)
    ref.check_topk(scores, ids, ref.normalize(Q1), ref.normalize(X6), 1024)
    assert sorted(ids[0, :6].tolist()) == list(range(6))


def test_memory_bank_neighbours_with_k_a_billion_within_bounded_memory(reports):
    out = report(reports, "neighbours k 1e9")
    assert out["raised"] is None, out
    scores, ids = np.array(out["arrays"][0], np.float32), np.array(out["arrays"][1], np.int64)
    bank = MemoryBank(6, 4, seed=3)
    check_knn(bank.vectors, bank.vectors[[2]], 1024, np.array([2]), scores, ids)
    assert sorted(ids[0, :5].tolist()) == [0, 1, 3, 4, 5]
