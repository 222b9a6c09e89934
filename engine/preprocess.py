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

Reading files (``read_image``): the image's size is read from its header before anything is decoded. An image
of more than ``max_pixels()`` pixels (``LOOKALIKE_MAX_PIXELS``, default 2**27, ~400 MB as 8-bit RGB) is refused
with ``ImageReadError`` naming the file, its size and the cap, so an indexer skips it instead of running out of
memory. A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg scales while decoding, in a few MB): that
is done when it brings a JPEG over the cap under it, and, given the smallest size the caller needs
(``Preprocess.min_decode_size``: twice the network input's source window, so the final resize still averages),
for JPEGs of more than ``REDUCE_ABOVE`` pixels (16 MP). Smaller images decode in full, exactly as before.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from engine.errors import InputError
from engine.validate import is_int

MAX_PIXELS = 1 << 27  # images larger than this are refused (JPEGs: after the reduction below); see max_pixels()
MAX_PIXELS_ENV = "LOOKALIKE_MAX_PIXELS"
REDUCE_ABOVE = 1 << 24  # JPEGs with more pixels may decode at 1/2, 1/4 or 1/8 when the caller needs less

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

    def min_decode_size(self) -> tuple[int, int]:
        """(height, width) an image may be decoded down to (``read_image``'s ``min_size``) and still give the
        network input it gives at full size up to a grey level or two: along each side twice what the network
        input takes from it, so the final resize still averages over at least 2 x 2 decoded pixels. Both sides
        are held to the larger need, so it holds whichever way the image is turned."""
        side = 2 * max(int(self.resize_to or min(self.size)), *self.size)
        return side, side

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
    return len(items) == count and all(is_int(v) and v >= 1 for v in items)


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


def _normalise(batch, scale, shift, bgr, out):
    """``_normalise_loop`` compiled by numba, on first use (importing numba costs about half a second of a
    process's start-up; engine.stream normalises in numpy and never needs it)."""
    global _normalise_jit
    if _normalise_jit is None:
        from numba import njit

        _normalise_jit = njit(cache=True, nogil=True)(_normalise_loop)
    return _normalise_jit(batch, scale, shift, bgr, out)


_normalise_jit = None


def _normalise_loop(batch, scale, shift, bgr, out):
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


def max_pixels() -> int:
    """The largest image (width x height) ``read_image`` decodes: ``LOOKALIKE_MAX_PIXELS`` if set, else
    ``MAX_PIXELS``."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return MAX_PIXELS
    try:
        cap = int(value)
    except ValueError:
        cap = 0
    if cap < 1:
        raise InputError(f"{MAX_PIXELS_ENV} must be a positive int (pixels), got {value!r}")
    return cap


def image_size(data) -> tuple[str, int, int, bool] | None:
    """``(format, width, height, progressive)`` from the header of an encoded image (bytes or uint8 array), or
    None when it is not a PNG, JPEG, BMP, GIF, WebP, TIFF or PNM file, or its header is damaged. Decodes nothing."""
    b = bytes(data[:64])
    try:
        if b.startswith(b"\x89PNG\r\n\x1a\n") and b[12:16] == b"IHDR":
            return "png", int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big"), False
        if b.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        if b.startswith(b"BM") and len(b) >= 26:
            if int.from_bytes(b[14:18], "little") == 12:  # OS/2 1.x header: 16-bit sides
                return "bmp", int.from_bytes(b[18:20], "little"), int.from_bytes(b[20:22], "little"), False
            width, height = (int.from_bytes(b[o : o + 4], "little", signed=True) for o in (18, 22))
            return "bmp", width, abs(height), False  # a negative height: rows stored top-down
        if b[:6] in (b"GIF87a", b"GIF89a"):
            return "gif", int.from_bytes(b[6:8], "little"), int.from_bytes(b[8:10], "little"), False
        if b.startswith(b"RIFF") and b[8:12] == b"WEBP":
            return _webp_size(b)
        if b[:4] in (b"II*\0", b"MM\0*"):
            return _tiff_size(memoryview(data).cast("B"))  # its directory may come after the pixels
        if len(b) > 2 and b[0:1] == b"P" and b[1:2] in b"123456" and b[2:3].isspace():
            fields = re.sub(rb"#[^\n]*", b"", bytes(data[2:4096])).split()  # comments may precede the size
            return "pnm", int(fields[0]), int(fields[1]), False
    except (IndexError, ValueError):
        pass
    return None


def _jpeg_size(data) -> tuple[str, int, int, bool] | None:
    """Walk the JPEG's marker segments to its frame header (SOFn)."""
    b = memoryview(data).cast("B")
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = (b[i + 2] << 8) | b[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15 but DHT, JPG, DAC
            if i + 9 > n:
                return None
            height, width = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            return ("jpeg", width, height, progressive) if height else None  # 0: height given later (DNL)
        if marker == 0xDA or length < 2:  # scan data before any frame header: damaged
            return None
        i += 2 + length
    return None


def _webp_size(b: bytes) -> tuple[str, int, int, bool] | None:
    chunk = b[12:16]
    if chunk == b"VP8X":
        return "webp", 1 + int.from_bytes(b[24:27], "little"), 1 + int.from_bytes(b[27:30], "little"), False
    if chunk == b"VP8L" and b[20] == 0x2F:
        bits = int.from_bytes(b[21:25], "little")
        return "webp", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), False
    if chunk == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":
        return ("webp", int.from_bytes(b[26:28], "little") & 0x3FFF, int.from_bytes(b[28:30], "little") & 0x3FFF,
                False)
    return None


def _tiff_size(b: memoryview) -> tuple[str, int, int, bool] | None:
    """ImageWidth (256) and ImageLength (257) of the first image of a (classic, not Big) TIFF."""
    order = "little" if b[:2] == b"II" else "big"
    at = int.from_bytes(b[4:8], order)
    if at + 2 > len(b):
        return None
    found = {}
    for e in range(int.from_bytes(b[at : at + 2], order)):
        entry = b[at + 2 + 12 * e : at + 14 + 12 * e]
        if len(entry) < 12:
            return None
        tag, kind = int.from_bytes(entry[0:2], order), int.from_bytes(entry[2:4], order)
        if tag in (256, 257):
            found[tag] = int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)  # SHORT or LONG
    return ("tiff", found[256], found[257], False) if len(found) == 2 else None


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _reduction(p, head, min_size, cap: int) -> int:
    """The factor (1, 2, 4 or 8) to decode ``p`` at; ImageReadError naming its size and the cap when too large."""
    fmt, w, h, progressive = head

    def pixels(f):
        return -(-w // f) * -(-h // f)  # libjpeg rounds the scaled size up

    def too_large(how):
        from engine.errors import ImageReadError

        return ImageReadError(f"{p} is {w} x {h} pixels ({w * h / 1e6:.0f} MP){how}, over the cap of {cap} pixels "
                              f"({cap / 1e6:.0f} MP) for one image; skipped rather than decoded (set "
                              f"{MAX_PIXELS_ENV} to allow larger images)")

    if fmt != "jpeg":  # decoded at full size, whatever is needed
        if w * h > cap:
            raise too_large(f", a {fmt.upper()}, which cannot be decoded at a reduced size")
        return 1
    f = 1
    if min_size is not None and w * h > REDUCE_ABOVE:
        mh, mw = min_size
        f = max((g for g in (2, 4, 8) if -(-h // g) >= mh and -(-w // g) >= mw), default=1)
    if progressive:  # libjpeg holds every coefficient of a progressive file at full size, whatever it outputs
        if w * h > cap:
            raise too_large(", a progressive JPEG, which is held at full size while decoding")
        return f
    while pixels(f) > cap:
        if f == 8:
            raise too_large(" (even decoded at 1/8)")
        f *= 2
    return f


def read_image(path, *, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; grey and RGBA files (OpenCV decodes grey + alpha as RGBA) are
    converted, 16-bit ones keep their top 8 bits. Anything else (float or signed pixels, other channel counts, no pixels) is
    refused with ImageReadError naming the file, so an image search indexing a folder skips it.

    Large images (see the module docstring): one of more than ``max_pixels()`` pixels is refused with
    ImageReadError naming its size and the cap, before it is decoded; a JPEG is decoded at 1/2, 1/4 or 1/8 of its
    size when that brings it under the cap, and, when ``min_size`` = (height, width) is given and it has more
    than ``REDUCE_ABOVE`` pixels, at the smallest of those that keeps both sides at least ``min_size``
    (``Preprocess.min_decode_size()``). EXIF orientation is ignored either way, as in a full decode. Formats whose
    header ``image_size`` does not read are decoded unchecked (OpenCV's own limit, 2**30 pixels, applies)."""
    from pathlib import Path

    from engine.errors import ImageReadError

    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"image file not found: {p}")
    data = np.fromfile(str(p), dtype=np.uint8)
    head = image_size(data) if data.size else None
    f = _reduction(p, head, min_size, max_pixels()) if head is not None else 1
    flags = cv2.IMREAD_UNCHANGED if f == 1 else _REDUCED[f] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as e:  # e.g. over OpenCV's own size limit
        raise ImageReadError(f"not a readable image (OpenCV: {str(e).strip().splitlines()[-1][:200]}): {p}") from None
    del data
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
