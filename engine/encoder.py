"""ONNX image encoders at run time: images (files or uint8 arrays) -> L2-normalised float32 embeddings.

An exported model (``python -m export``) carries in its ONNX metadata everything needed to use it: the model
name, architecture, embedding size, input size and the exact preprocessing (``engine.preprocess.Preprocess``
as JSON). ``Encoder`` reads that metadata, so nothing is guessed::

    enc = Encoder("models/la.onnx")
    x = enc.encode(["a.jpg", "b.png"])          # (2, enc.dim) float32, unit rows
    x = enc.encode(frame)                        # one (H, W, 3) uint8 RGB array -> (1, dim)

A model exported from a run that stopped before the end of its training (``lookalike.complete`` "false": a
``--max-steps`` smoke test, a run stopped by a signal, exported with ``--allow-incomplete``) loads with an
``IncompleteModelWarning`` naming the file and how far the run got; files without the key count as complete.

onnxruntime runs it on CUDA when it can (``CUDAExecutionProvider`` offered and a session really starts on it),
else on the CPU; ``enc.providers`` says which are in use. No torch here.

What the file must carry (metadata keys, format version, the ``lookalike.sha256`` seal, input and output) is
``engine.modelfile``; a damaged or edited file is refused on load (``engine.modelfile.check_file_digest``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.errors import ImageReadError, InputError, ModelError
from engine.modelfile import ModelInfo, check_file_digest, check_signature
from engine.onnxfile import refuse_external_data
from engine.preprocess import Preprocess, read_image
from engine.validate import is_int

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_ORT_QUIET = 4  # onnxruntime logger severity while a session starts: fatal only (hides failed-CUDA noise)
_ORT_DEFAULT = 2  # onnxruntime's own default (warnings)
_DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))  # threads decoding and resizing the images of a batch


class IncompleteModelWarning(UserWarning):
    """An exported model comes from a training run that stopped before the end (``--max-steps``, a signal)."""


# -- onnxruntime sessions ------------------------------------------------------------------------------------

_dlls_preloaded = False


def _preload_cuda_libraries(ort) -> None:
    """Let onnxruntime find CUDA / cuDNN from the nvidia pip packages (torch is never imported here)."""
    global _dlls_preloaded
    if _dlls_preloaded or not hasattr(ort, "preload_dlls"):
        return
    _dlls_preloaded = True
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            ort.preload_dlls()
        except Exception:  # missing libraries: the session below simply falls back to the CPU
            pass


def default_providers() -> list[str]:
    """CUDA then CPU when this onnxruntime offers CUDA, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [CUDA, CPU] if CUDA in available else [CPU]


def make_session(model: bytes, *, providers=None, threads: int | None = None, where: str = "model"):
    """An onnxruntime InferenceSession; a provider that cannot start (CUDA without a GPU) is dropped quietly.

    Returns ``(session, providers_in_use)``. When the caller named providers explicitly and one of them could
    not start, a ``RuntimeWarning`` says so. A model that keeps any tensor in an external file is refused
    (``engine.onnxfile.refuse_external_data``): onnxruntime would read that file, wherever it points.
    """
    import onnxruntime as ort

    refuse_external_data(model, where)  # before onnxruntime could read another file into the weights
    asked = providers is not None
    providers = list(providers) if asked else default_providers()
    if not providers:
        raise InputError("providers must name at least one onnxruntime execution provider, got an empty list")
    available = ort.get_available_providers()
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    unknown = [p for p in names if p not in available]
    if unknown:
        raise InputError(f"execution providers {unknown} are not offered by this onnxruntime; available: {available}")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise InputError(f"threads must be a positive int or None, got {threads!r}")
    accelerated = any(n != CPU for n in names)
    if accelerated:
        _preload_cuda_libraries(ort)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    try:
        session = _start(ort, model, opts, providers, quiet=accelerated)
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
        kind = type(e).__name__
        if kind in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile") or "protobuf" in str(e).lower():
            raise ModelError(f"{where} is not a valid ONNX model ({kind}: {str(e).strip()[:300]})") from None
        if accelerated and not asked:  # the default CUDA could not start at all: the CPU then
            try:
                session = _start(ort, model, opts, [CPU], quiet=False)
            except Exception as e2:  # noqa: BLE001
                e, kind = e2, type(e2).__name__
                session = None
        else:
            session = None
        if session is None:
            raise ModelError(f"onnxruntime could not load {where} ({kind}: {str(e).strip()[:300]})") from None
    in_use = list(session.get_providers())
    dropped = [n for n in names if n not in in_use]
    if asked and dropped:
        warnings.warn(f"execution providers {dropped} could not start for {where}; running on {in_use}",
                      RuntimeWarning, stacklevel=3)
    return session, in_use


def _start(ort, model: bytes, opts, providers: list, *, quiet: bool):
    """Create the session; with ``quiet`` onnxruntime's messages about providers that fail to load are hidden."""
    if not quiet:
        return ort.InferenceSession(model, sess_options=opts, providers=providers)
    ort.set_default_logger_severity(_ORT_QUIET)
    try:
        with _quiet_native_stderr():
            return ort.InferenceSession(model, sess_options=opts, providers=providers)
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 (onnxruntime's failed-provider messages)."""
    try:
        fd = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(fd, 2)
    finally:
        os.close(fd)


# -- the encoder ---------------------------------------------------------------------------------------------

class Encoder:
    """An exported lookalike encoder: ``encode(images) -> (n, dim)`` float32 L2-normalised rows.

    ``providers`` default to CUDA when onnxruntime can start on it, then CPU; ``batch_size`` images go
    through the network at a time; ``threads`` caps onnxruntime's intra-op threads (None: its default).
    """

    def __init__(self, path, *, providers=None, batch_size: int = 32, threads: int | None = None):
        if not is_int(batch_size) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.path = Path(path)
        if not self.path.is_file():
            why = "it is a folder" if self.path.is_dir() else "no such file"
            raise ModelError(f"model file not found: {self.path} ({why}); export one with `python -m export NAME`")
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.session, self.providers = make_session(data, providers=providers, threads=threads, where=str(self.path))
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.info = ModelInfo.from_metadata(meta, str(self.path))
        check_file_digest(data, meta, str(self.path))
        if not self.info.complete:
            warnings.warn(f"{self.path} was exported from an incomplete training run "
                          f"({self.info.progress or 'progress not recorded'}); its embeddings may be far from what "
                          f"the finished run would give. Finish the run and export it again",
                          IncompleteModelWarning, stacklevel=2)
        self.batch_size = int(batch_size)
        self.input_name, self.output_name = check_signature(self.session.get_inputs(), self.session.get_outputs(),
                                                            self.info, str(self.path))

    # -- what the model is -----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def similar(self) -> str:
        """What "similar" meant to the model's trainer ("copies", "content"; "" when its file does not say)."""
        return self.info.similar

    @property
    def describe(self) -> str:
        """Name, embedding size and (when recorded) what similar means: "la, dim 128, similar: copies"."""
        return f"{self.name}, dim {self.dim}" + (f", similar: {self.similar}" if self.similar else "")

    @property
    def preprocess(self) -> Preprocess:
        return self.info.preprocess

    @property
    def identity(self) -> dict:
        """What an index records to refuse embeddings of another model: name, sha256 of this file, dim, ..."""
        return {
            "model": self.info.name,
            "arch": self.info.arch,
            "dim": self.info.dim,
            "precision": self.info.precision,
            "sha256": self.sha256,
            "checkpoint_sha256": self.info.checkpoint_sha256,
        }

    def __repr__(self) -> str:
        return (f"Encoder({str(self.path)!r}, name={self.name!r}, dim={self.dim}, precision={self.info.precision!r}, "
                f"providers={self.providers})")

    # -- encoding ------------------------------------------------------------------------------------------
    def encode(self, images, *, progress: bool = False) -> np.ndarray:
        """Images -> ``(n, dim)`` float32 unit rows (a zero embedding stays zero).

        ``images``: a path, a list of paths, one (H, W[, C]) uint8 RGB array, a list of arrays (paths and arrays
        may mix), or an (n, H, W, C) uint8 array; C is 1 (grey), 3 (RGB) or 4 (RGBA).
        """
        items = _as_items(images)
        n = len(items)
        out = np.empty((n, self.dim), np.float32)
        if n == 0:
            return out
        starts = list(range(0, n, self.batch_size))
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"encode ({self.name})", unit="img", leave=False, dynamic_ncols=True)
        try:
            # One helper thread prepares the next batch while the network runs the current one; it spreads
            # the batch's images over a few decoding threads (OpenCV releases the GIL).
            workers = min(_DECODE_WORKERS, len(items))
            with ThreadPoolExecutor(max_workers=1) as ahead, ThreadPoolExecutor(max_workers=workers) as decode:
                pending = ahead.submit(self._prepare, items[0 : self.batch_size], decode)
                for i, s in enumerate(starts):
                    x = pending.result()
                    if i + 1 < len(starts):
                        nxt = starts[i + 1]
                        pending = ahead.submit(self._prepare, items[nxt : nxt + self.batch_size], decode)
                    out[s : s + len(x)] = self._run(x)
                    if bar is not None:
                        bar.update(len(x))
        finally:
            if bar is not None:
                bar.close()
        return out

    def _prepare(self, items: list, pool=None) -> np.ndarray:
        """Decode paths and preprocess: a list of paths / arrays -> (b, 3, h, w) float32 (= ``preprocess``)."""
        pre = self.preprocess
        floor = pre.min_decode_size()  # a huge JPEG is decoded no larger than this needs (read_image)

        def one(it):
            return pre.resize_crop(read_image(it, min_size=floor) if isinstance(it, (str, os.PathLike)) else it)

        crops = list(pool.map(one, items)) if pool is not None and len(items) > 1 else [one(it) for it in items]
        return pre.normalise(np.stack(crops))

    def _run(self, x: np.ndarray) -> np.ndarray:
        """(b, 3, h, w) float32 network input -> (b, dim) float32 unit rows."""
        y = self.session.run([self.output_name], {self.input_name: x})[0]
        if y.ndim != 2 or y.shape != (len(x), self.dim):
            raise ModelError(f"{self.path}: the network returned shape {y.shape}, expected ({len(x)}, {self.dim})")
        y = y.astype(np.float32, copy=False)
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return y / np.maximum(norms, np.float32(1e-12))

    def encode_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """Already preprocessed ``(n, 3, h, w)`` float32 input -> ``(n, dim)`` unit rows (in batches)."""
        x = np.asarray(x)
        h, w = self.info.input_size
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise InputError(f"preprocessed images must have shape (n, 3, {h}, {w}), got {x.shape}")
        if x.dtype != np.float32:
            raise InputError(f"preprocessed images must be float32, got {x.dtype}")
        x = np.ascontiguousarray(x)
        out = np.empty((len(x), self.dim), np.float32)
        for s in range(0, len(x), self.batch_size):
            out[s : s + self.batch_size] = self._run(x[s : s + self.batch_size])
        return out


def _as_items(images) -> list:
    """Normalise the accepted input forms to a list of paths and validated uint8 arrays."""
    if isinstance(images, (str, os.PathLike)):
        items = [images]
    elif isinstance(images, np.ndarray):
        if images.ndim == 4:
            _check_array(images, "images")
            items = list(images)
        elif images.ndim in (2, 3):
            items = [images]
        else:
            raise InputError(f"an image array must have shape (H, W), (H, W, C) or (n, H, W, C), got {images.shape}")
    elif isinstance(images, (bytes, bytearray)):
        raise InputError("images must be paths or uint8 arrays, got raw bytes (decode them, or pass the file path)")
    else:
        try:
            items = list(images)
        except TypeError:
            raise InputError(f"images must be a path, a list of paths / arrays or an array, "
                             f"got {type(images).__name__}") from None
    missing = []
    for i, it in enumerate(items):
        if isinstance(it, (str, os.PathLike)):
            if not Path(it).is_file():
                missing.append(str(it))
        elif isinstance(it, np.ndarray):
            if it.ndim not in (2, 3):
                raise InputError(f"image {i} must have shape (H, W) or (H, W, 1|3|4), got {it.shape}")
            _check_array(it, f"image {i}")
        else:
            raise InputError(f"image {i} must be a file path or a uint8 array, got {type(it).__name__}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ImageReadError(f"image file not found: {missing[0]}{more}")
    return items


def _check_array(a: np.ndarray, what: str) -> None:
    """One image (H, W[, C]) or a batch (n, H, W, C): uint8, C in 1, 3, 4, sides >= 1."""
    if a.dtype != np.uint8:
        raise InputError(f"{what} must be uint8 RGB (0..255), got dtype {a.dtype} with shape {a.shape}; "
                         f"convert with (x * 255).clip(0, 255).astype(np.uint8) if it is float in [0, 1]")
    img = a.shape[1:] if a.ndim == 4 else a.shape
    ok = len(img) == 2 or (len(img) == 3 and img[2] in (1, 3, 4))
    if not ok or min(img[:2]) < 1:
        raise InputError(f"{what} must have shape (H, W), (H, W, 1|3|4) or (n, H, W, 1|3|4) with H, W >= 1, "
                         f"got {a.shape}")
