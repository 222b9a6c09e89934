"""The models that ship inside the engine, so that search and streaming work before anyone trains anything.

    from engine.default_models import default_model
    default_model("video")   # Path of the packaged MPNN (engine/models/mpnn.onnx)
    default_model("image")   # Path of the packaged image encoder (engine/models/image.onnx)

Both are exported by the project's own trainers from the embedded data (``scripts/build_default_models.py``
rebuilds them and records the command, the training configuration and the metrics in each file's metadata;
``python -m engine.default_models`` prints them). Commands that take ``--model`` use these when it is absent
and say so.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.errors import ModelError

FOLDER = Path(__file__).resolve().parent / "models"
FILES = {"video": "mpnn.onnx", "image": "image.onnx"}
KINDS = tuple(FILES)


def default_model(kind: str) -> Path:
    """The packaged model file for ``kind`` ("video" or "image"); ``ModelError`` when it is missing."""
    if kind not in FILES:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    path = FOLDER / FILES[kind]
    if not path.is_file():
        raise ModelError(
            f"the default {kind} model {path} is not installed (a source checkout rebuilds it with "
            f"`python scripts/build_default_models.py`); pass --model with an exported .onnx file instead")
    return path


def describe(kind: str) -> str:
    """One line naming the default model for ``kind``: its file, name, architecture and embedding size."""
    from engine.encoder import Encoder

    path = default_model(kind)
    info = Encoder(path).info
    return (f"default {kind} model {path} ({info.name}, {info.arch}, dim {info.dim}, {info.precision}"
            + (f", similar: {info.similar})" if info.similar else ")"))


def main() -> int:
    for kind in KINDS:
        try:
            print(describe(kind))
        except ModelError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
