"""Image preprocessing shared by training, export and the engine (numpy + OpenCV, no torch).

One `Preprocess` describes exactly how an RGB uint8 image becomes the network's float32 input. Trainers
record it in their checkpoint, export writes it into the ONNX file's metadata, and the engine reads it
back, so the same code path runs in training, in the export parity check and in production.

Steps, in order:
1. colour: grey (H, W) and RGBA (H, W, 4) inputs become RGB; with ``grayscale=True`` the image is
   converted to one grey channel (ITU-R 601 luma, OpenCV's) and replicated to three.
2. resize:
   - ``"shorter"``: scale so the shorter side is ``resize_to`` (aspect kept), then crop to ``size``;
   - ``"exact"``: resize straight to ``size`` (aspect not kept), no crop.
   Shrinking to half or less (along either axis) uses ``cv2.INTER_AREA``; milder shrinking and enlarging use
   ``cv2.INTER_LINEAR`` (below 2x the two differ by < 1 grey level on average, and bilinear is ~6x cheaper:
   0.06 vs 0.36 ms for a 272 x 272 video window to 224 x 224).
3. crop: ``"center"`` takes the central ``size`` window (only with ``resize="shorter"``). It is done
   before the resize, in source pixels: the central window of the source that the scaled crop covers
   (``source_window``), resized once to ``size``. The same picture as scaling the whole image and then
   cropping (the window's edges are rounded to whole source pixels), at a fraction of the cost on wide
   video frames (640 x 272 -> 224 x 224 resizes 272 x 272 source pixels, not 640 x 272).
4. scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel (given in RGB order), computed as
   ``x * (1 / (255 std)) - mean / std`` in float32.
5. channel order ``color`` ("RGB" or "BGR") and layout NCHW float32 (steps 4 and 5 are one numba pass).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from numba import njit

from engine.errors import InputError

RESIZE_POLICIES = ("shorter", "exact")
CROP_POLICIES = ("center", "none")
COLOR_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int]  # (height, width) of the network input
    resize: str = "shorter"  # "shorter" (keep aspect, then crop) or "exact" (stretch to size)
    resize_to: int | None = None  # shorter side before the crop; None means min(size)
    crop: str = "center"  # "center" or "none"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per RGB channel, on the [0, 1] scale
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    color: str = "RGB"  # channel order the network expects
    grayscale: bool = False  # convert to grey and replicate to 3 channels (digits)
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes, kept in metadata

    def __post_init__(self):
        if not _positive_ints(self.size, 2):
            raise InputError(f"size must be (height, width) with positive ints, got {self.size!r}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if self.resize_to is not None and not _positive_ints([self.resize_to], 1):
            raise InputError(f"resize_to must be a positive int (the shorter side) or None, got {self.resize_to!r}")
        try:
            mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        except (TypeError, ValueError):
            raise InputError(f"mean and std must be 3 numbers each, got {self.mean!r}, {self.std!r}") from None
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.resize not in RESIZE_POLICIES:
            raise InputError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if self.crop not in CROP_POLICIES:
            raise InputError(f"crop must be one of {CROP_POLICIES}, got {self.crop!r}")
        if self.color not in COLOR_ORDERS:
            raise InputError(f"color must be one of {COLOR_ORDERS}, got {self.color!r}")
        if len(mean) != 3 or len(std) != 3 or not np.isfinite(mean + std).all() or min(std) <= 0:
            raise InputError(f"mean and std must be 3 finite values with std > 0, got {self.mean}, {self.std}")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown preprocessing keys {sorted(unknown)}; expected some of {sorted(known)}")
        if "size" not in d:
            raise InputError(f"preprocessing needs 'size' (height, width), got only {sorted(d)}")
        d = dict(d)
        d["size"] = tuple(d["size"]) if isinstance(d["size"], (list, tuple)) else d["size"]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Preprocess":
        return cls.from_dict(json.loads(s))

    # -- application ---------------------------------------------------------------------------
    def resize_crop(self, image: np.ndarray) -> np.ndarray:
        """One image (H, W), (H, W, 3) or (H, W, 4) uint8 RGB(A) -> (h, w, 3) uint8 RGB at ``size``."""
        img = to_rgb(image)
        if self.grayscale:
            g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            img = np.repeat(g[:, :, None], 3, axis=2)
        h_out, w_out = self.size
        if self.resize == "exact":
            return np.ascontiguousarray(_resize(img, w_out, h_out))
        y0, x0, hs, ws = self.source_window(*img.shape[:2])
        img = img[y0 : y0 + hs, x0 : x0 + ws]
        if (hs, ws) != (h_out, w_out):
            img = _resize(img, w_out, h_out)
        return np.ascontiguousarray(img)

    def source_window(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the source pixels an (h, w) image contributes to the network input.

        ``"shorter"`` scales by ``s = resize_to / min(h, w)`` to (max(h_out, round(h s)), max(w_out, round(w s)));
        with ``crop="center"`` the central ``size`` window of that is the window ``size / s`` (rounded to whole
        pixels) at the centre of the source; without a crop it is the whole image. ``"exact"``: the whole image.
        """
        h_out, w_out = self.size
        if self.resize == "exact" or self.crop != "center":
            return 0, 0, h, w
        target = int(self.resize_to or min(self.size))
        scale = target / min(h, w)
        nh, nw = max(h_out, round(h * scale)), max(w_out, round(w * scale))
        hs = min(h, max(1, round(h_out * h / nh)))
        ws = min(w, max(1, round(w_out * w / nw)))
        return (h - hs) // 2, (w - ws) // 2, hs, ws

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        """(n, h, w, 3) uint8 RGB at ``size`` -> (n, 3, h, w) float32 network input, in one pass."""
        b = np.asarray(batch)
        if b.dtype != np.uint8 or b.ndim != 4 or b.shape[3] != 3:
            raise InputError(f"normalise takes an (n, h, w, 3) uint8 batch, got {b.dtype} {b.shape}")
        std = np.asarray(self.std, np.float32)
        scale = np.float32(1.0 / 255.0) / std
        shift = -np.asarray(self.mean, np.float32) / std
        out = np.empty((b.shape[0], 3, b.shape[1], b.shape[2]), np.float32)
        _normalise(np.ascontiguousarray(b), scale, shift, self.color == "BGR", out)
        return out

    def __call__(self, images) -> np.ndarray:
        """A list of images or an (n, H, W, 3) array -> (n, 3, h, w) float32."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        elif isinstance(images, np.ndarray) and images.ndim in (2, 3):
            items = [images]
        else:
            items = list(images)
        if not items:
            return np.zeros((0, 3, *self.size), np.float32)
        batch = np.stack([self.resize_crop(im) for im in items])
        return self.normalise(batch)


def _positive_ints(values, count: int) -> bool:
    """True if ``values`` is a sequence of ``count`` ints (Python or numpy, not bool) >= 1."""
    try:
        items = list(values)
    except TypeError:
        return False
    return len(items) == count and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in items
    )


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey (H, W) / (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4) uint8 -> (H, W, 3) uint8 RGB."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise InputError(f"images must be uint8 (0..255), got dtype {a.dtype}")
    if a.ndim in (2, 3) and min(a.shape[:2]) < 1:
        raise InputError(f"an image must have at least one pixel, got shape {a.shape}")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.ndim == 3 and a.shape[2] == 3:
        return a
    if a.ndim == 3 and a.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGBA2RGB)
    raise InputError(f"an image must have shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")


@njit(cache=True, nogil=True)
def _normalise(batch, scale, shift, bgr, out):
    """out[i, c, y, x] = batch[i, y, x, src] * scale[src] + shift[src], src = c (RGB) or 2 - c (BGR)."""
    n, h, w, _ = batch.shape
    for i in range(n):
        for c in range(3):
            src = 2 - c if bgr else c
            a = scale[src]
            b = shift[src]
            for y in range(h):
                for x in range(w):
                    out[i, c, y, x] = np.float32(batch[i, y, x, src]) * a + b


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    halved = 2 * w <= img.shape[1] or 2 * h <= img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if halved else cv2.INTER_LINEAR)


def read_image(path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; grey and RGBA files (OpenCV decodes grey + alpha as RGBA) are
    converted, 16-bit ones keep their top 8 bits. Anything else (float or signed pixels, other channel counts, no pixels) is
    refused with ImageReadError naming the file, so an image search indexing a folder skips it."""
    from pathlib import Path

    from engine.errors import ImageReadError

    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"image file not found: {p}")
    data = np.fromfile(str(p), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageReadError(f"not a readable image (OpenCV could not decode it): {p}")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"{p} has {img.dtype} pixels; lookalike reads 8- and 16-bit unsigned images")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 1 or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ImageReadError(f"{p} decodes to shape {img.shape}; expected (H, W) grey, (H, W, 3) or (H, W, 4)")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
