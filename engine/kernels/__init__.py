"""numba kernels: plain functions over contiguous arrays; the glue (validation, allocation) lives in the
classes that call them. This package imports nothing else of the project.

- ``topk``: exact blocked top-k by inner product (cosine on unit vectors)
- ``bank``: memory-bank update and kNN of bank rows against the bank
- ``kmeans``: k-means on unit vectors with restarts
"""
