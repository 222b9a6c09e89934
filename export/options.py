"""The export's settings that its command line shows, defined without torch or onnx so that ``python -m export
--help`` answers before they load (``export.onnx`` imports them from here)."""

DEFAULT_OPSET = 17
MIN_OPSET = 17
TOLERANCE = 1e-4  # max abs difference allowed between onnxruntime and torch (float32)
EXPORTERS = ("auto", "torchscript", "dynamo")
