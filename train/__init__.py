"""PyTorch trainers for lookalike's encoders (``python -m train.la``, ``train.mpnn``, ``train.ae``, ``train.siamese``).

torch and numba (the memory bank's and k-means' kernels) each run an OpenMP runtime whose worker threads keep
spinning after a parallel region. In one training process the two pools take the same cores from each other:
40 LA steps on CIFAR-10 took 13.8-14.8 s with active waiting and 4.0 s with passive waiting (2-core Zen 4, load
2-4; BENCHMARKS.md "Model quality"), with the same loss. So the trainers wait passively unless the user set
``OMP_WAIT_POLICY``. It must be set before torch or numba loads its runtime, which is why it lives here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
