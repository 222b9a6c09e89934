"""Tiny real trainer runs and their ONNX exports, shared by the export, encoder and image-search tests.

Each registered model name is trained for 2 steps on 16 embedded images by its real trainer (``main(argv)``),
then exported with ``export.onnx.export_run``. Results are cached under pytest's cache folder: runs keyed by
the sha256 of the training sources, exports by that and the export / encoder sources, so a test session
trains each model at most once and an unchanged tree reuses them. --max-steps 2 leaves some runs incomplete, so
they are exported with ``allow_incomplete``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# model name -> (trainer module, the options that make its run tiny and fast). Every name in
# train.registry.MODEL_NAMES needs an entry; the tests say so when one is missing.
TINY = {
    "mpnn": ("train.mpnn", ["--data", "photos", "--size", "64", "--levels", "3"]),
    "ae-conv": ("train.ae", ["--arch", "conv", "--data", "photos"]),
    "ae-vgg16bn": ("train.ae", ["--arch", "vgg16bn", "--data", "photos", "--image-size", "32", "--batch-size", "4"]),
    "la": ("train.la", ["--data", "photos", "--image-size", "32", "--train-side", "32"]),
    "siamese": ("train.siamese", ["--data", "digits"]),
}
COMMON = ["--limit", "16", "--max-steps", "2", "--epochs", "1", "--no-progress", "--device", "cpu", "--seed", "0"]
CHECK_IMAGES = 24  # real images the export checks use in tests (12 calibrate int8, 12 evaluate)


def _digest(files, extra) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(ROOT).as_posix().encode())
        h.update(f.read_bytes())
    h.update(json.dumps(extra).encode())
    return h.hexdigest()[:16]


def train_key() -> str:
    """sha256 over what decides a tiny run: the training sources, the preprocessing, the recipes."""
    return _digest([*ROOT.glob("train/**/*.py"), ROOT / "engine" / "preprocess.py"], [TINY, COMMON])


def export_key() -> str:
    """sha256 over what decides an export of a given run: the export sources and the engine's metadata."""
    return _digest([*ROOT.glob("export/*.py"), ROOT / "engine" / "encoder.py"], [CHECK_IMAGES])


def digest_by_onnx(path) -> str:
    """Oracle for an exported file's lookalike.sha256: the sha256 of the model re-serialised by onnx with that
    value as 64 zeros."""
    import onnx

    proto = onnx.load(str(path))
    (entry,) = [p for p in proto.metadata_props if p.key == "lookalike.sha256"]
    entry.value = "0" * 64
    return hashlib.sha256(proto.SerializeToString()).hexdigest()


class ModelCache:
    """``runs/<name>/checkpoint.pt`` and ``models/<name>.onnx`` for tiny runs, built on first use."""

    def __init__(self, base: Path):
        self.dir = Path(base) / train_key()
        self.runs = self.dir / "runs"
        self.models = self.dir / f"models-{export_key()}"
        self._images = None
        if Path(base).is_dir():  # drop the caches of older sources
            for old in Path(base).iterdir():
                if old.is_dir() and old.name != self.dir.name:
                    shutil.rmtree(old, ignore_errors=True)
        for old in self.dir.glob("models-*"):  # exports by older export code
            if old != self.models:
                shutil.rmtree(old, ignore_errors=True)

    def run(self, name: str) -> Path:
        """The run folder of a tiny training of ``name`` (trained now when absent)."""
        if name not in TINY:
            raise KeyError(f"tests/trained_models.py has no tiny training recipe for model {name!r}; add one to TINY")
        folder = self.runs / name
        if not (folder / "checkpoint.pt").is_file():
            module, argv = TINY[name]
            tmp = self.runs / f".{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            importlib.import_module(module).main([*argv, *COMMON, "--out", str(tmp)])
            if not (tmp / "checkpoint.pt").is_file():
                raise RuntimeError(f"{module} --out {tmp} wrote no checkpoint.pt")
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        return folder

    def images(self):
        from export.verify import real_images

        if self._images is None:
            self._images = real_images(CHECK_IMAGES)
        return self._images

    def onnx(self, name: str) -> Path:
        """``models/<name>.onnx`` exported from the tiny run (exported now when absent)."""
        path = self.models / f"{name}.onnx"
        if not path.is_file():
            from export.onnx import export_run

            images, source = self.images()
            export_run(self.run(name), self.models, name=name, images=images, image_source=source,
                       allow_incomplete=True, log=lambda *_: None)
        return path
