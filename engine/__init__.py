"""lookalike's runtime: exact similarity search, memory bank, ONNX encoders and streaming comparison.

Imports no torch. The public names load lazily, so ``import engine`` stays cheap::

    from engine import Searcher
"""

from importlib import import_module

_PUBLIC = {
    "Searcher": "engine.searcher",
    "IVFSearcher": "engine.ivf",
    "MemoryBank": "engine.memory_bank",
    "Encoder": "engine.encoder",
    "StreamComparator": "engine.stream",
    "StreamOptions": "engine.stream",
    "Event": "engine.stream",
    "Transition": "engine.stream",
    "Shot": "engine.stream",
    "FrameScore": "engine.stream",
    "detect": "engine.stream",
    "Preprocess": "engine.preprocess",
    "VideoReader": "engine.video",
    "LookalikeError": "engine.errors",
    "InputError": "engine.errors",
    "IndexFileError": "engine.errors",
    "ModelError": "engine.errors",
    "ImageReadError": "engine.errors",
    "VideoOpenError": "engine.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__():
    return __all__
