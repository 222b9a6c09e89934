"""Exceptions raised by the engine. Every message names what was expected and what came."""


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""


class InputError(LookalikeError, ValueError):
    """An argument has the wrong shape, dtype, value or contents."""


class IndexFileError(LookalikeError, OSError):
    """An index file is missing, truncated, altered, or of another format version."""


class ModelError(LookalikeError, ValueError):
    """A model file is missing, not ONNX, lacks lookalike metadata, or does not match."""


class ImageReadError(LookalikeError, OSError):
    """An image file could not be read or decoded; the message names the file."""


class VideoOpenError(LookalikeError, OSError):
    """A video file or camera could not be opened; the message names the source."""
