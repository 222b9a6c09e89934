"""Per-frame inference cost of the MPNN encoder (torch and onnxruntime CPU), by input size, levels and batch.

Run from the repo root:  NUMBA_CACHE_DIR=.numba_cache .venv/bin/python benchmarks/mpnn_cost.py
The machine is shared, so each round runs every setting once (interleaved) and the medians are reported,
both wall time and this process's CPU time (process_time; for one thread, close to an idle machine's wall).
"""
import io
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, ".")
from train.models.mpnn import MPNNEncoder  # noqa: E402

ROUNDS = 5


def macs(levels, size):
    total, side, cin = 0, size, 3
    for _ in range(levels):
        total += side * side * (cin * 64 * 25 + 64 * 16)
        side //= 2
        cin = 16
    return total


def onnx_session(enc, size, threads):
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(enc, torch.zeros(1, 3, size, size), buf, input_names=["images"], output_names=["embeddings"],
                      dynamic_axes={"images": {0: "n"}, "embeddings": {0: "n"}}, opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def main():
    import warnings

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    configs = [(224, 5), (224, 3), (160, 4), (112, 4)]
    runners = {}
    for size, L in configs:
        enc = MPNNEncoder(levels=L, size=size).eval()
        for b in ((1, 8, 32) if (size, L) == (224, 5) else (32,)):
            x = torch.randn(b, 3, size, size)
            xn = x.numpy()
            for t in (1, 2):
                runners[f"torch  {size}px L={L} batch {b:2d} threads {t}"] = (b, t, lambda enc=enc, x=x: enc(x))
            sess = onnx_session(enc, size, 1)
            with torch.no_grad():
                err = np.abs(sess.run(None, {"images": xn})[0] - enc(x).numpy()).max()
            assert err < 1e-4, err
            runners[f"onnxrt {size}px L={L} batch {b:2d} threads 1"] = (b, None, lambda s=sess, xn=xn: s.run(None, {"images": xn}))
            if b == 32:
                s2 = onnx_session(enc, size, 2)
                runners[f"onnxrt {size}px L={L} batch {b:2d} threads 2"] = (b, None, lambda s=s2, xn=xn: s.run(None, {"images": xn}))
    wall = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for name, (b, t, fn) in runners.items():
                if t is not None:
                    torch.set_num_threads(t)
                fn()  # warm
                w, c = time.perf_counter(), time.process_time()
                fn()
                wall[name].append((time.perf_counter() - w) / b * 1000)
                cpu[name].append((time.process_time() - c) / b * 1000)
    for size, L in configs:
        print(f"{size}px, {L} levels: {macs(L, size) / 1e6:.0f} MMAC/frame, dim {MPNNEncoder(levels=L, size=size).dim}")
    for name in runners:
        print(f"{name}: wall {statistics.median(wall[name]):7.2f} ms/frame, cpu {statistics.median(cpu[name]):7.2f} ms/frame")


if __name__ == "__main__":
    main()
