"""Export trained encoders to ONNX (``python -m export all``); see ``export.onnx`` and ``export.verify``."""
