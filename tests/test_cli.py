"""The `lookalike` command (engine/cli.py) and the --help of every command line.

Oracles: each `lookalike SUB` prints what its `python -m` twin prints (help, results, errors) and exits with the
same status; `--help` is read before the heavy libraries load, checked by listing the modules a help run imported
(sys.modules), not by timing it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trained_models import ModelCache

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "numba", "cv2", "matplotlib")
TRAINERS = ("la", "ae", "mpnn", "siamese")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
       "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))}

# A help run in a fresh interpreter: the entry point with its arguments, then the heavy modules it imported.
PROBE = """
import runpy, sys
kind, target, *argv = sys.argv[1:]
try:
    if kind == "module":  # exactly what `python -m target argv...` does
        sys.argv = [target, *argv]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    else:
        from engine.cli import main
        code = main(argv)
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print("\\n@@exit", code, "@@heavy", sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in %r}))
""" % (HEAVY,)


def probe(kind: str, target: str, *argv: str) -> tuple[str, str, object, list[str]]:
    """(stdout, stderr, exit status, heavy modules imported) of one command run in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", PROBE, kind, target, *argv], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out, tail = r.stdout.rsplit("\n@@exit ", 1)
    code, heavy = tail.split(" @@heavy ")
    return out, r.stderr, (int(code) if code.strip().lstrip("-").isdigit() else code.strip()), eval(heavy)


def search_has(sub: str) -> bool:
    from engine.search_cli import build_parser

    return sub in build_parser()._subparsers._group_actions[0].choices


# (lookalike arguments, python -m twin, its arguments, words its help must show)
TWINS = [
    *[(["train", t], f"train.{t}", [], f"usage: train.{t}") for t in TRAINERS],
    (["export"], "export", [], "usage: python -m export"),
    (["index"], "engine.search", ["index"], "usage: python -m engine.search index"),
    (["query"], "engine.search", ["query"], "usage: python -m engine.search query"),
    (["dups"], "engine.search", ["dups"], "usage: python -m engine.search dups"),
    (["stream"], "engine.stream", [], "usage: python -m engine.stream"),
    (["scale"], "engine.scale", [], "usage: python -m engine.scale"),
    (["scale", "index"], "engine.scale", ["index"], "usage: python -m engine.scale index"),
    (["scale", "shard"], "engine.scale", ["shard"], "usage: python -m engine.scale shard"),
]


@pytest.mark.parametrize("sub,twin,twin_args,usage", TWINS, ids=[" ".join(t[0]) for t in TWINS])
def test_help_is_the_twins_and_loads_nothing_heavy(sub, twin, twin_args, usage):
    if twin == "engine.search" and not search_has(twin_args[0]):
        pytest.skip(f"engine.search_cli has no {twin_args[0]!r} subcommand on this branch yet")
    out, err, code, heavy = probe("module", twin, *twin_args, "--help")
    assert code == 0, err
    assert out.startswith(usage) and "--help" in out, out[:300]
    l_out, l_err, l_code, l_heavy = probe("lookalike", "", *sub, "--help")
    assert (l_out, l_code) == (out, 0), l_err
    assert heavy == [], f"python -m {twin} {' '.join(twin_args)} --help imported {heavy}"
    assert l_heavy == [], f"lookalike {' '.join(sub)} --help imported {l_heavy}"


def test_search_overview_help_loads_nothing_heavy():
    out, err, code, heavy = probe("module", "engine.search", "--help")
    assert code == 0 and out.startswith("usage: python -m engine.search"), err
    assert heavy == []


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["train", "--help"]])
def test_overview_lists_every_command_and_loads_nothing_heavy(argv):
    from engine.cli import COMMANDS

    out, err, code, heavy = probe("lookalike", "", *argv)
    assert code == 0 and err == ""
    assert heavy == []
    if argv == ["train", "--help"]:
        assert all(f"  {t} " in out for t in TRAINERS) and "lookalike train MODEL --help" in out
        return
    assert out.startswith("usage: lookalike COMMAND")
    listed = [line.split()[0] for line in out.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    assert listed == list(COMMANDS) == ["index", "query", "dups", "stream", "train", "export", "scale"]
    assert "pip install 'lookalike[train]'" in out


def test_python_m_engine_and_the_console_script_run_the_dispatcher():
    r = subprocess.run([sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("usage: lookalike COMMAND")
    script = Path(sys.executable).parent / "lookalike"
    if not script.is_file():
        pytest.skip(f"no console script at {script} (this environment was installed before engine.cli existed)")
    r2 = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert (r2.returncode, r2.stdout) == (0, r.stdout)


@pytest.mark.parametrize("argv,words", [
    (["nosuch"], "lookalike: error: unknown command 'nosuch'; expected one of index, query, dups, stream, train, "
                 "export, scale"),
    ([], "lookalike: error: expected a command: index, query, dups, stream, train, export, scale"),
    (["train", "nosuch"], "lookalike: error: unknown model 'nosuch' for train; expected one of la, ae, mpnn, siamese"),
    (["train"], "lookalike: error: expected a model to train: la, ae, mpnn, siamese"),
])
def test_unknown_or_missing_commands_are_clear_errors(argv, words):
    out, err, code, heavy = probe("lookalike", "", *argv)
    assert code == 2
    assert err.rstrip().endswith(words) and "Traceback" not in err
    assert heavy == []


@pytest.mark.parametrize("sub,twin,args", [
    (["train", "la"], "train.la", ["--epochs", "0"]),
    (["train", "siamese"], "train.siamese", ["--loss", "nosuch"]),
    (["export"], "export", []),
    (["query"], "engine.search", ["query", "x.jpg", "--index", "no-such.idx"]),
    (["stream"], "engine.stream", []),
])
def test_errors_and_exit_statuses_pass_through(sub, twin, args, tmp_path):
    """The same refusal, word for word, with the same status, from `lookalike` and its twin."""
    twin_args = args
    lk_args = [*sub, *(args[1:] if twin == "engine.search" else args)]
    r_twin = subprocess.run([sys.executable, "-m", twin, *twin_args], capture_output=True, text=True, env=ENV,
                            cwd=tmp_path, timeout=120)
    r_lk = subprocess.run([sys.executable, "-m", "engine", *lk_args], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=120)
    assert r_twin.returncode == 2 and "Traceback" not in r_twin.stderr, r_twin.stderr
    assert (r_lk.returncode, r_lk.stdout, r_lk.stderr) == (r_twin.returncode, r_twin.stdout, r_twin.stderr)


# -- real subcommands -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(request) -> Path:
    """An exported image encoder: the packaged default when the checkout has it, else a tiny real run's export."""
    packaged = ROOT / "engine" / "models" / "image.onnx"
    if packaged.is_file():
        return packaged
    return ModelCache(request.config.cache.mkdir("lookalike-tiny-models")).onnx("mpnn")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from train.data import photo_files

    folder = tmp_path_factory.mktemp("photos")
    for f in photo_files()[:9]:
        shutil.copy(f, folder / f.name)
    return folder


def test_index_and_query_match_python_m_engine_search(model, photos, tmp_path, capsys):
    """`lookalike index` writes the index `python -m engine.search index` writes; `lookalike query` on it prints
    what `python -m engine.search query` prints, and each indexed photo is left out of its own results."""
    from engine.cli import main as lookalike
    from engine.search_cli import main as search_main

    queries = sorted(str(p) for p in photos.iterdir())[:3]
    runs = {}
    for who, run in (("twin", search_main), ("lookalike", lookalike)):
        idx = tmp_path / who / "photos.idx"
        idx.parent.mkdir()
        assert run(["index", str(photos), "--model", str(model), "--index", str(idx), "--no-progress"]) == 0
        capsys.readouterr()
        assert run(["query", *queries, "--index", str(idx), "-k", "3"]) == 0
        runs[who] = (idx.read_bytes(), capsys.readouterr().out)
    assert runs["lookalike"] == runs["twin"]
    lines = runs["lookalike"][1].strip().split("\n")
    for i, query in enumerate(queries):
        head, results = lines[4 * i], lines[4 * i + 1 : 4 * i + 4]
        assert head.endswith(Path(query).name)
        scores = [float(r.split()[1]) for r in results]
        assert scores == sorted(scores, reverse=True) and len(results) == 3
        assert not any(r.endswith(Path(query).name) for r in results), results
