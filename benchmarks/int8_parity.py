"""int8 / fp16 parity on this CPU: exported variants against their float32 file, with onnxruntime's CPU provider.

For every ``NAME.onnx`` in ``--models`` that has a ``NAME.int8.onnx`` and/or ``NAME.fp16.onnx`` beside it (as
``python -m export ... --fp16 --int8`` writes them), on real images preprocessed as the file's metadata says:

- min / mean cosine of the int8 and fp16 embeddings against float32 (the accuracy a user of this CPU gets);
- for int8, the same for the file's own arithmetic run unfused (``export.verify.qdq_reference_session``: what a
  CPU whose int8 kernels do not saturate gives, e.g. one with VNNI), and min cosine of onnxruntime's int8 kernels
  on this CPU against it;
- with ``--compare RUN.npz`` (embeddings saved by another run with ``--save``), min cosine of every embedding
  against that run's: 1.0 up to rounding when both CPUs compute the same thing;
- with ``--speed ROUNDS``, milliseconds per call at batch 1 and 32 (``--threads`` threads), every file timed in
  each round in turn (float32, fp16, int8, and the int8 file of ``--baseline DIR`` when given, e.g. an export by
  older code), medians over the rounds: on a shared machine the load then falls on all of them alike.

The images are the held-out half the export measures on (the odd positions of ``export.verify.real_images``).
``--save-inputs`` / ``--inputs`` keep the preprocessed batch in an .npz, so a run on an emulated CPU needs only
numpy and onnxruntime and sees the very same input bytes::

    .venv/bin/python -m export all --runs runs --out /tmp/m --fp16 --int8
    PYTHONPATH=. .venv/bin/python benchmarks/int8_parity.py --models /tmp/m --save-inputs /tmp/x.npz --save /tmp/native.npz
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int8_parity.py --models /tmp/m --inputs /tmp/x.npz \\
        --compare /tmp/native.npz

(qemu's TCG emulates x86 up to AVX2: no AVX-512, no VNNI.) The CPU line comes from numpy's runtime dispatch
(cpuid), which an emulator answers for the CPU it emulates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("fp16", "int8")
FEATURES = ("SSE41", "AVX", "F16C", "FMA3", "AVX2", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512FP16")


def cpu_line() -> str:
    """The x86 features numpy's dispatcher found (cpuid) that decide onnxruntime's kernels."""
    try:
        found = np._core._multiarray_umath.__cpu_features__  # numpy >= 2
    except AttributeError:
        found = np.core._multiarray_umath.__cpu_features__
    have = [f for f in FEATURES if found.get(f)]
    return "cpu features: " + (" ".join(have) or "none of " + " ".join(FEATURES))


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (unit(a) * unit(b)).sum(1)


def models_in(folder: Path) -> dict[str, dict[str, Path]]:
    """{name: {"float32": path, "fp16": path, "int8": path}} for the float32 files that have a variant."""
    out = {}
    for f32 in sorted(folder.glob("*.onnx")):
        if f32.name.endswith((".fp16.onnx", ".int8.onnx")):
            continue
        name = f32.name[: -len(".onnx")]
        files = {"float32": f32, **{v: folder / f"{name}.{v}.onnx" for v in VARIANTS}}
        files = {k: p for k, p in files.items() if p.is_file()}
        if len(files) > 1:
            out[name] = files
    return out


def session(path: Path, threads: int, *, reference: bool = False):
    import onnxruntime as ort

    if reference:
        from export.verify import qdq_reference_session

        return qdq_reference_session(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embed(sess, x: np.ndarray, batch: int = 8) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def seconds_per_call(sess, x: np.ndarray, min_seconds: float = 0.25) -> float:
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up
    calls, start = 0, time.perf_counter()
    while True:
        sess.run(None, {name: x})
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def speed(models: dict, inputs: dict, baseline: Path | None, rounds: int, threads: int) -> None:
    print(f"\nms per call, onnxruntime CPU, {threads} thread(s), median of {rounds} interleaved rounds "
          f"(speed-up vs float32 in brackets)")
    labels = ["float32", *VARIANTS] + (["baseline int8"] if baseline else [])
    print("| model | batch | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name, files in models.items():
        files = dict(files)
        if baseline and (baseline / f"{name}.int8.onnx").is_file():
            files["baseline int8"] = baseline / f"{name}.int8.onnx"
        sessions = {k: session(files[k], threads) for k in labels if k in files}
        for batch in (1, 32):
            x = np.ascontiguousarray(np.resize(inputs[name], (batch, *inputs[name].shape[1:])))
            times = {k: [] for k in sessions}
            for _ in range(rounds):
                for k, sess in sessions.items():
                    times[k].append(seconds_per_call(sess, x))
            med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
            cells = [f"{med[k]:.3f}" + ("" if k == "float32" else f" ({med['float32'] / med[k]:.2f}x)")
                     if k in med else "-" for k in labels]
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)


def prepare_inputs(models: dict, count: int) -> dict[str, np.ndarray]:
    """The held-out half of ``2 * count`` real images, preprocessed as each model's metadata says."""
    import onnx

    from engine.preprocess import Preprocess
    from export.verify import real_images

    images = real_images(2 * count)[0][1::2]
    out = {}
    for name, files in models.items():
        meta = {p.key: p.value for p in onnx.load(str(files["float32"]), load_external_data=False).metadata_props}
        out[name] = Preprocess.from_json(meta["lookalike.preprocess"])(images)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, type=Path, help="folder with NAME.onnx and NAME.{fp16,int8}.onnx")
    p.add_argument("--images", type=int, default=32, help="real images to measure on (default 32)")
    p.add_argument("--names", nargs="*", help="only these models")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--inputs", type=Path, help="preprocessed inputs saved by --save-inputs (no preprocessing here)")
    p.add_argument("--save-inputs", type=Path, help="write the preprocessed inputs to this .npz")
    p.add_argument("--save", type=Path, help="write every embedding to this .npz, for --compare elsewhere")
    p.add_argument("--compare", type=Path, help="embeddings saved by --save on another CPU: compare with them")
    p.add_argument("--speed", type=int, default=0, metavar="ROUNDS", help="also time every file (interleaved rounds)")
    p.add_argument("--baseline", type=Path, help="with --speed: also time DIR/NAME.int8.onnx (e.g. older code's)")
    args = p.parse_args(argv)

    models = models_in(args.models)
    if args.names:
        models = {n: f for n, f in models.items() if n in args.names}
    if not models:
        print(f"error: no NAME.onnx with a NAME.fp16.onnx or NAME.int8.onnx beside it in {args.models}/",
              file=sys.stderr)
        return 2
    if args.inputs:
        with np.load(args.inputs) as z:
            inputs = {n: z[n] for n in models if n in z.files}
        missing = sorted(set(models) - set(inputs))
        if missing:
            print(f"error: {args.inputs} has no inputs for {missing}", file=sys.stderr)
            return 2
    else:
        inputs = prepare_inputs(models, args.images)
    if args.save_inputs:
        np.savez(args.save_inputs, **inputs)
    other = dict(np.load(args.compare)) if args.compare else {}

    print(cpu_line())
    print(f"| model | variant | images | min / mean cos vs float32 | unfused: min / mean cos vs float32 | "
          f"min cos kernels vs unfused |{' min cos vs --compare |' if other else ''}")
    print(f"|---|---|---|---|---|---|{'---|' if other else ''}")
    saved = {}
    for name, files in models.items():
        x = inputs[name]
        ref = embed(session(files["float32"], args.threads), x)
        saved[f"{name}/float32"] = ref
        rows = [("float32", ref, None)]
        for v in VARIANTS:
            if v in files:
                got = embed(session(files[v], args.threads), x)
                saved[f"{name}/{v}"] = got
                unfused = None
                if v == "int8":
                    unfused = embed(session(files[v], args.threads, reference=True), x)
                rows.append((v, got, unfused))
        for v, got, unfused in rows:
            if v == "float32" and not other:
                continue
            cos = cosines(got, ref)
            cells = [name, v, str(len(x)), f"{cos.min():.5f} / {cos.mean():.5f}", "-", "-"]
            if unfused is not None:
                exact = cosines(unfused, ref)
                cells[4:] = [f"{exact.min():.5f} / {exact.mean():.5f}", f"{cosines(got, unfused).min():.6f}"]
            if other:
                key = f"{name}/{v}"
                cells.append(f"{cosines(got, other[key]).min():.7f}" if key in other else "-")
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.save:
        np.savez(args.save, **saved)
    if args.speed:
        speed(models, inputs, args.baseline, args.speed, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
