"""numba kernels: plain functions over contiguous arrays; the glue (validation, allocation) lives in the
classes that call them. Of the project this package imports only ``engine.threads`` (worker threads, BLAS thread
count) and ``engine.result_size`` (how large an answer is).

- ``topk``: exact blocked top-k by inner product (cosine on unit vectors)
- ``bank``: memory-bank update and kNN of bank rows against the bank
- ``kmeans``: k-means on unit vectors with restarts
- ``quant``: float16 / int8 codes and exact top-k over them (int8 summed in int32)
"""
