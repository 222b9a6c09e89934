"""Encoders: onnxruntime (engine.Encoder's session) against torch eager, and Encoder.encode end to end.

For every registered model (train.registry.MODEL_NAMES): the checkpoint in runs/<name>/ when there is one
(else a 1-step run of its trainer at the trainer's default input size: speed does not depend on the weights),
exported with export.onnx.export_run. Both runtimes get the same preprocessed real photos (the fungi photos
of ../shared/data, else the embedded photographs) and their default thread counts.

1. network only, batch 1 and 32, images/s: torch eager (eval, inference_mode) vs onnxruntime, both with
   1 thread and with their default thread counts; the ratio comes from an interleaved loop (torch, ort,
   torch, ort, ..., best round of each) that shares the machine's load evenly. On a machine shared with
   other work, the 1-thread figures are the stable ones (multi-threaded fork/join suffers most from
   preemption). Target: onnxruntime >= 1.5x torch eager.
2. ``Encoder.encode(paths)`` end to end from image files (decode + resize + normalise + network, batch 32),
   images/s, and the share of preprocessing: decode+resize+normalise alone and the network alone are timed
   on the same files.

    NUMBA_CACHE_DIR=.numba_cache .venv/bin/python -m pytest benchmarks/bench_encoder.py -q -s \
        --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

The last test prints every figure as a table.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from train.registry import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
RUNS = Path(os.environ.get("LOOKALIKE_RUNS", ROOT / "runs"))
# model name -> its trainer and options for a 1-step run at the trainer's default input size
RECIPES = {
    "mpnn": ("train.mpnn", ["--data", "photos"]),
    "ae-conv": ("train.ae", ["--arch", "conv", "--data", "photos"]),
    "ae-vgg16bn": ("train.ae", ["--arch", "vgg16bn", "--data", "photos"]),
    "la": ("train.la", ["--data", "photos"]),
    "siamese": ("train.siamese", ["--data", "digits"]),
}
ONE_STEP = ["--limit", "16", "--max-steps", "1", "--epochs", "1", "--no-progress", "--device", "cpu"]
N_FILES = 64  # image files for the end-to-end figure
MIN_SECONDS = 0.5  # each timed side runs at least this long per round
ROUNDS = 4  # interleaved rounds for the ratio (the best round of each side counts)
_figures: dict = {}


def _run_folder(name: str, scratch: Path) -> tuple[Path, str]:
    if (RUNS / name / "checkpoint.pt").is_file():
        return RUNS / name, f"trained run {RUNS / name}"
    module, argv = RECIPES[name]
    out = scratch / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    importlib.import_module(module).main([*argv, *ONE_STEP, "--out", str(out)])
    return out, "1-step run at the trainer's default size"


@pytest.fixture(scope="module")
def photos():
    from export.verify import real_images, shared_data_dir
    from train.data import photo_files

    images, source = real_images(32)
    fungi = shared_data_dir() / "fungi-sample" / "images"
    files = sorted(fungi.glob("*.jpg")) if fungi.is_dir() else photo_files()
    files = [str(files[i % len(files)]) for i in range(N_FILES)]
    return images, source, files


@pytest.fixture(scope="module")
def models(tmp_path_factory, photos):
    """name -> (Encoder, torch model, preprocessed 32 real images, where the weights came from)."""
    import torch

    from engine.encoder import Encoder
    from export.onnx import export_run
    from train.registry import load_encoder

    scratch = tmp_path_factory.mktemp("bench_encoder")
    threads0 = torch.get_num_threads()  # trainers may change it; eager inference gets the default back
    images, source, _ = photos
    out = {}
    for name in MODEL_NAMES:
        if name not in RECIPES:
            pytest.fail(f"benchmarks/bench_encoder.py has no recipe for model {name!r}; add one to RECIPES")
        try:
            run, origin = _run_folder(name, scratch)
            torch.set_num_threads(threads0)
            export_run(run, scratch / "models", name=name, images=images[:8], image_source=source,
                       allow_incomplete=True, log=lambda *_: None)
            model, info = load_encoder(run)
        except Exception as e:  # noqa: BLE001  (one broken model must not hide the others' figures)
            out[name] = f"{name} could not be trained / exported: {type(e).__name__}: {e}"
            continue
        path = scratch / "models" / f"{name}.onnx"
        enc = Encoder(path, providers=["CPUExecutionProvider"])
        enc1 = Encoder(path, providers=["CPUExecutionProvider"], threads=1)
        out[name] = ({"default": enc, 1: enc1}, model, info.preprocess(images), origin)
    torch.use_deterministic_algorithms(False)  # the trainers switch it on; eager inference runs without it
    _figures["threads"] = (f"torch {torch.get_num_threads()} threads, onnxruntime default intra-op threads, "
                           f"{os.cpu_count()} CPUs")
    return out


def _get(models, name):
    got = models[name]
    if isinstance(got, str):
        pytest.skip(got)
    return got


def _torch_fn(model, x):
    import torch

    t = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            model(t)

    return run


def _ort_fn(enc, x):
    name_in, name_out = enc.input_name, enc.output_name

    def run():
        enc.session.run([name_out], {name_in: x})

    return run


def _repeat(fn) -> int:
    """How many calls make MIN_SECONDS: one warm-up call, then calls for at least 0.2 s (2 calls at least)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if n >= 2 and dt >= 0.2:
            return max(2, math.ceil(MIN_SECONDS * n / dt))


def _per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _batch(x: np.ndarray, b: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))  # repeats the images when b > len(x)


# -- 1. network only -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(threads):
    import torch

    before = torch.get_num_threads()
    if threads != "default":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_network_onnxruntime_1thread(benchmark, models, name, batch):
    encs, _, x, _ = _get(models, name)
    fn = _ort_fn(encs[1], _batch(x, batch))
    benchmark.group = f"{name} batch {batch}, 1 thread"
    benchmark.pedantic(fn, rounds=_repeat(fn), warmup_rounds=1)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_network_torch_eager_1thread(benchmark, models, name, batch):
    _, model, x, _ = _get(models, name)
    fn = _torch_fn(model, _batch(x, batch))
    benchmark.group = f"{name} batch {batch}, 1 thread"
    with torch_threads(1):
        benchmark.pedantic(fn, rounds=_repeat(fn), warmup_rounds=1)


@pytest.mark.parametrize("threads", [1, "default"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_network_ratio(models, name, batch, threads):
    encs, model, x, origin = _get(models, name)
    enc = encs[threads]
    xb = _batch(x, batch)
    ours, ref = _ort_fn(enc, xb), _torch_fn(model, xb)
    with torch_threads(threads):
        n_ours, n_ref = _repeat(ours), _repeat(ref)
        t_ours, t_ref = [], []
        for _ in range(ROUNDS):
            t_ref.append(_per_call(ref, n_ref))
            t_ours.append(_per_call(ours, n_ours))
    ips_ours, ips_ref = batch / min(t_ours), batch / min(t_ref)
    _figures[(name, batch, threads)] = {"ort": ips_ours, "torch": ips_ref, "ratio": ips_ours / ips_ref,
                                        "size": enc.preprocess.size, "dim": enc.dim, "origin": origin}


# -- 2. Encoder.encode end to end -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_encode_end_to_end(benchmark, models, photos, name):
    from engine.preprocess import read_image

    enc = _get(models, name)[0]["default"]
    files = photos[2]
    enc.encode(files[:4])  # warm-up
    benchmark.group = f"encode {len(files)} files"
    benchmark.pedantic(lambda: enc.encode(files), rounds=3, warmup_rounds=0)
    # the parts, each alone on the same files
    t_e2e, t_pre, t_dec, t_net = [], [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        arrays = [read_image(p) for p in files]
        t1 = time.perf_counter()
        x = enc.preprocess(arrays)
        t2 = time.perf_counter()
        enc.encode_preprocessed(x)
        t3 = time.perf_counter()
        enc.encode(files)
        t4 = time.perf_counter()
        t_dec.append(t1 - t0)
        t_pre.append(t2 - t0)
        t_net.append(t3 - t2)
        t_e2e.append(t4 - t3)
    pre, net = min(t_pre), min(t_net)
    _figures[("e2e", name)] = {"ips": len(files) / min(t_e2e), "pre_share": pre / (pre + net),
                               "decode_s": min(t_dec), "pre_s": pre, "net_s": net, "n": len(files)}


def test_print_figures(capsys):
    rows = [k for k in _figures if isinstance(k, tuple) and k[0] != "e2e"]
    order = {1: 0, "default": 1}
    with capsys.disabled():
        print(f"\n\nnetwork only, images/s, interleaved, best of {ROUNDS} rounds ({_figures.get('threads', '')}):")
        print(f"{'model':<11} {'input':>7} {'dim':>6} {'batch':>5} {'threads':>7} {'torch eager':>12} "
              f"{'onnxruntime':>12} {'ratio':>7}")
        for name, batch, threads in sorted(rows, key=lambda k: (order[k[2]], MODEL_NAMES.index(k[0]), k[1])):
            f = _figures[(name, batch, threads)]
            size = f"{f['size'][0]}x{f['size'][1]}"
            print(f"{name:<11} {size:>7} {f['dim']:>6} {batch:>5} {threads!s:>7} {f['torch']:>12.1f} "
                  f"{f['ort']:>12.1f} {f['ratio']:>6.2f}x")
        print("\nEncoder.encode from image files (batch 32, default threads), images/s; "
              "preprocessing = decode + resize + normalise:")
        print(f"{'model':<11} {'end to end':>10} {'decode s':>9} {'preproc s':>9} {'network s':>9} {'preproc share':>13}")
        for name in MODEL_NAMES:
            f = _figures.get(("e2e", name))
            if f:
                print(f"{name:<11} {f['ips']:>10.1f} {f['decode_s']:>9.3f} {f['pre_s']:>9.3f} {f['net_s']:>9.3f} "
                      f"{100 * f['pre_share']:>12.1f}%")
        origins = {(_figures[k]['origin']) for k in rows}
        print(f"\nweights: {', '.join(sorted(origins))}\n")
