"""What LA adds on top of the k-means layer (``train.la --arch kmeans``), and variants measured but not adopted, on
CIFAR-10 (the first 8,000 test images train, the last 2,000 are evaluated by 1-NN against them, as ``train.la``):

- ``projections``: the frozen layer alone (7,200 standardised features), a random 128-d projection of them and
  their top 128 principal components: what a 128-d head must keep, with no training;
- ``mlp``: LA with an MLP projection head (7,200 -> HIDDEN -> batch norm -> ReLU -> 128) instead of the linear
  one; 1-NN of the 128-d output and of the hidden layer (the head dropped at export);
- ``multicrop``: LA with two extra local views per image (crops of 40-70% of the side, resized back), their losses
  averaged with the main view's; only the main view's codes update the memory bank.

    .venv/bin/python benchmarks/kmeans_variants.py projections
    .venv/bin/python benchmarks/kmeans_variants.py mlp --out /tmp/la-mlp
    .venv/bin/python benchmarks/kmeans_variants.py multicrop --out /tmp/la-multicrop

``mlp`` and ``multicrop`` run ``train.la.main`` with the variant swapped in for the linear head / the training
step (every other setting is CIFAR-10's default) and print its final evaluation; they take 3-6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LOOKALIKE_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR = SHARED / "cifar-10-batches-py"
N_TRAIN = 8000


def knn1(train: np.ndarray, test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Cosine 1-NN accuracy of the test rows against the training rows."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    return float((y_train[np.argmax(b @ a.T, axis=1)] == y_test).mean())


def projections(seed: int) -> dict:
    import torch

    from train.augment import fitted_preprocess, preprocess_all
    from train.data import load_images
    from train.models.layers import PatchKMeansBackbone

    ds = load_images("cifar10", CIFAR)
    images, y = np.asarray(ds.images), ds.labels
    pre = fitted_preprocess(images[:N_TRAIN], size=32)
    x = preprocess_all(pre, images)
    layer = PatchKMeansBackbone(image_size=32)
    t = time.perf_counter()
    layer.fit(x[:N_TRAIN], seed=seed)
    fit_s = time.perf_counter() - t
    with torch.no_grad():
        f = torch.cat([layer(x[s:s + 500]) for s in range(0, len(x), 500)]).double().numpy()
    tr, te, ytr, yte = f[:N_TRAIN], f[N_TRAIN:], y[:N_TRAIN], y[N_TRAIN:]
    _, _, vt = np.linalg.svd(tr - tr.mean(0), full_matrices=False)
    rand = np.random.default_rng(seed).standard_normal((tr.shape[1], 128))
    return {"fit_seconds": round(fit_s, 1), "layer_7200": knn1(tr, te, ytr, yte),
            "random_128": knn1(tr @ rand, te @ rand, ytr, yte),
            "pca_128": knn1(tr @ vt[:128].T, te @ vt[:128].T, ytr, yte)}


def with_mlp_head(hidden: int, out: str, extra: list[str]) -> dict:
    import torch
    import torch.nn as nn

    import train.models.la as la_models

    plain_init = la_models.LAEncoder.__init__

    def init(self, **kw):
        plain_init(self, **kw)
        d = self.head.in_features
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, self.dim))

    la_models.LAEncoder.__init__ = init
    metrics = train(out, extra)
    from train.augment import preprocess_all
    from train.data import load_images
    from train.registry import load_encoder

    model, info = load_encoder(out)
    model.eval()
    ds = load_images("cifar10", CIFAR)
    x = preprocess_all(info.preprocess, np.asarray(ds.images))
    with torch.no_grad():
        hid = torch.cat([model.head[:3](model.backbone(x[s:s + 500])) for s in range(0, len(x), 500)]).numpy()
    y = ds.labels
    return {**metrics, "hidden": hidden,
            "head_dropped_knn1": knn1(hid[:N_TRAIN], hid[N_TRAIN:], y[:N_TRAIN], y[N_TRAIN:])}


def with_multicrop(out: str, extra: list[str], seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    import train.la as la

    gen = torch.Generator().manual_seed(seed)

    def local_views(x: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
        b = x.shape[0]
        views = []
        for _ in range(n):
            side = torch.rand(b, generator=gen) * 0.3 + 0.4  # fraction of the side kept
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0] = theta[:, 1, 1] = side
            theta[:, 0, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - side)
            theta[:, 1, 2] = (torch.rand(b, generator=gen) * 2 - 1) * (1 - side)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            views.append(F.grid_sample(x, grid, mode="bilinear", align_corners=False))
        return views

    class WithLocalViews:
        """The batch's objective, with the loss averaged over the main view and its local views (each scored
        against the bank as it is); the bank is updated with the main view's codes only (``update_bank``)."""

        def __init__(self, objective, model, local):
            self.objective, self.model, self.local = objective, model, local
            self.timings = objective.timings

        def loss(self, rows, codes, *, mode):
            losses = [self.objective.loss(rows, codes, mode=mode)]
            losses += [self.objective.loss(rows, self.model(v), mode=mode) for v in self.local]
            return sum(losses) / len(losses)

        def update_bank(self, rows, codes):
            self.objective.update_bank(rows, codes)

    plain_step = la.train_step

    def step(model, objective, optimizer, views, rows, **kw):  # train.la's own step around the wrapped objective
        return plain_step(model, WithLocalViews(objective, model, local_views(views)), optimizer, views, rows, **kw)

    la.train_step = step
    return train(out, extra)


def train(out: str, extra: list[str]) -> dict:
    from train.la import main

    main(["--data", "cifar10", "--data-root", str(CIFAR), "--out", out, "--no-progress", *extra])
    m = json.loads((Path(out) / "metrics.json").read_text())
    return {"knn1": m.get("knn1_accuracy"), "nmi": m.get("kmeans_nmi"), "train_seconds": m.get("train_seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=("projections", "mlp", "multicrop"))
    p.add_argument("--out", default="runs/kmeans-variant", help="run folder for mlp / multicrop")
    p.add_argument("--hidden", type=int, default=1024, help="mlp: hidden width (default: 1024)")
    p.add_argument("--seed", type=int, default=0)
    args, extra = p.parse_known_args()
    if not (CIFAR / "test_batch").is_file():
        sys.exit(f"needs the CIFAR-10 test batch at {CIFAR} (set LOOKALIKE_SHARED_DATA)")
    extra = ["--arch", "kmeans", "--seed", str(args.seed), *extra]
    if args.variant == "projections":
        result = projections(args.seed)
    elif args.variant == "mlp":
        result = with_mlp_head(args.hidden, args.out, extra)
    else:
        result = with_multicrop(args.out, extra, args.seed)
    print(json.dumps({"variant": args.variant, "seed": args.seed, **result}))


if __name__ == "__main__":
    main()
