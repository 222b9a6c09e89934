"""Building blocks several models share: the backbones (feature extractors) the autoencoder, LA and their
encoders are built on, and the L2 normalisation that turns features into a search embedding.

- ``vgg16bn``: torchvision's ``vgg16_bn().features`` (13 conv + batch norm + ReLU layers, 5 max-pools), its
  (n, 512, h, w) output averaged over h and w -> (n, 512); ``encode(x, with_indices=True)`` also gives the
  pools' argmax indices (for the SegNet decoder of ``train/models/ae.py``).
- ``conv``: a small CIFAR conv encoder: 4 conv layers (3 of them stride 2) then a linear layer to a 1000-d code.
- ``resnet18`` (LA only): torchvision's ``resnet18`` without its classifier, random init, averaged over H, W -> 512.
- ``kmeans`` (LA only): a single layer learned by k-means on whitened patches (Coates & Ng), fit before training
  and frozen: 400 filters, soft thresholds pooled on a 3 x 3 grid -> 7,200 standardised features.

``build_backbone(kind)`` gives the unnormalised feature extractor and its size; ``L2Normalized`` wraps one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from train.choices import BACKBONES, LA_BACKBONES  # defined without torch, for the trainers' --help


class L2Normalized(nn.Module):
    """Wraps a feature extractor: (n, 3, H, W) -> (n, dim) unit vectors."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)


def _check_images(x: torch.Tensor, min_side: int = 1) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be a tensor of shape (n, 3, H, W), got {tuple(x.shape)}")
    if min(x.shape[2], x.shape[3]) < min_side:
        raise ValueError(f"images must be at least {min_side}x{min_side} pixels, got {tuple(x.shape[2:])}")


# --------------------------------------------------------------------------------------------------
# VGG16-BN


@contextlib.contextmanager
def _weights_only_loads():
    """torch.hub loads torchvision's weights with ``torch.load(weights_only=False)``, and a file already in its
    cache (which the warning below tells users to place by hand) is not checked against its hash: force
    ``weights_only`` while it loads, so such a file cannot run code."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _load_pretrained_vgg16bn() -> nn.Sequential | None:
    """torchvision's ImageNet vgg16_bn features, or None (with a warning) when the weights cannot be had."""
    import torchvision

    try:
        with _weights_only_loads():
            vgg = torchvision.models.vgg16_bn(weights=torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1)
    except Exception as e:  # no network, no cached file, damaged download, a file that holds more than weights ...
        print(
            f"WARNING: --pretrained: torchvision's ImageNet vgg16_bn weights cannot be had ({type(e).__name__}: {e}); "
            f"training continues from random initialisation. To use them, place vgg16_bn-6c64b313.pth in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}.",
            file=sys.stderr,
        )
        return None
    return vgg.features


class VGG16BNBackbone(nn.Module):
    """torchvision ``vgg16_bn().features`` (same parameter names, so ImageNet weights load as they are)."""

    out_dim = 512
    min_side = 32  # five 2x2 pools

    def __init__(self, *, pretrained: bool = False):
        super().__init__()
        import torchvision

        features = _load_pretrained_vgg16bn() if pretrained else None
        if features is None:  # the features stack alone: building vgg16_bn() would also initialise its
            # 120M-parameter classifier, only to throw it away
            features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
            for m in features.modules():  # torchvision VGG's own initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
        self.features = features

    def encode(self, x: torch.Tensor, *, with_indices: bool = False):
        """(n, 3, H, W) -> (n, 512, H/32, W/32) feature map; with indices also the pools' argmax indices
        and input sizes (one per pool, encoder order) for the SegNet decoder."""
        _check_images(x, self.min_side)
        indices, sizes = [], []
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                if with_indices:
                    sizes.append(x.shape[-2:])
                    x, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation,
                                          ceil_mode=m.ceil_mode, return_indices=True)
                    indices.append(idx)
                else:
                    x = m(x)
            else:
                x = m(x)
        return (x, indices, sizes) if with_indices else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).mean(dim=(2, 3))  # (n, 512)


# --------------------------------------------------------------------------------------------------
# Small CIFAR conv encoder


class ConvEncoder(nn.Module):
    """(n, 3, s, s) -> (n, code_dim) code; s must be a multiple of 8 (32 for CIFAR).

    The code passes a batch norm without affine parameters, so each code dimension is centred and scaled
    to unit variance (over the training set, in eval mode): cosine similarity between codes is then a
    correlation, not dominated by the shared mean code."""

    def __init__(self, *, image_size: int = 32, code_dim: int = 1000, width: int = 16, code_norm: bool = True):
        super().__init__()
        if image_size % 8 or image_size < 8:
            raise ValueError(f"conv autoencoder image_size must be a positive multiple of 8, got {image_size}")
        self.image_size = int(image_size)
        self.out_dim = int(code_dim)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),                  # s
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),  # s/2
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),  # s/4
            nn.Conv2d(4 * w, 8 * w, 4, stride=2, padding=1), nn.BatchNorm2d(8 * w), nn.ReLU(inplace=True),  # s/8
        )
        self.map_shape = (8 * w, image_size // 8, image_size // 8)
        self.fc = nn.Linear(8 * w * (image_size // 8) ** 2, code_dim)
        self.norm = nn.BatchNorm1d(code_dim, affine=False) if code_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"conv encoder expects (n, 3, {self.image_size}, {self.image_size}) images, got {tuple(x.shape)}")
        return self.norm(self.fc(self.features(x).flatten(1)))  # (n, code_dim)


# --------------------------------------------------------------------------------------------------
# ResNet-18


class ResNet18Backbone(nn.Module):
    """torchvision ``resnet18`` (random init, its own initialisation) up to the global average pool: (n, 3, H, W)
    -> (n, 512). Parameter names are torchvision's (less ``fc``)."""

    out_dim = 512
    min_side = 32  # stride 32 overall

    def __init__(self):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.min_side)
        return self.net(x)  # (n, 512): avgpool + flatten, fc is the identity


# --------------------------------------------------------------------------------------------------
# k-means patch layer (Coates & Ng)


class PatchKMeansBackbone(nn.Module):
    """A single-layer network learned by k-means (Coates, Lee, Ng, AISTATS 2011; Coates & Ng, "Learning feature
    representations with k-means", 2012): (n, 3, s, s) -> (n, 2 * clusters * grid**2) standardised features.

    ``fit`` learns it from training images, without labels, in seconds: ``patches`` random ``patch`` x ``patch``
    patches, each normalised for brightness and contrast (its mean removed, divided by sqrt(variance + eps)),
    ZCA-whitened, scaled to unit length and clustered by spherical k-means (``engine.kernels.kmeans``). The
    forward pass is then a convolution: every patch of an image, normalised and whitened the same way, is scored
    against the unit centroids ``z = D^T W (p - mu)``; the features are the soft thresholds ``max(0, z - alpha)``
    and ``max(0, -z - alpha)`` (alpha = 0.25, the paper's), averaged over a ``grid`` x ``grid`` split of the
    image, and standardised with the training images' mean and standard deviation. The whitening is folded into
    the filters, and the patch-mean removal too (filters that sum to zero ignore a patch's mean), so the network
    is two small convolutions for the patch statistics, one for the scores, and pooling; nothing in it trains.
    LA trains a head on it (``LAEncoder``)."""

    def __init__(self, *, image_size: int = 32, clusters: int = 400, patch: int = 6, grid: int = 3,
                 alpha: float = 0.25):
        super().__init__()
        self.positions = int(image_size) - int(patch) + 1  # patch positions along a side
        if patch < 2 or clusters < 1 or grid < 1 or self.positions < grid:
            raise ValueError(f"k-means layer: needs patch >= 2, clusters >= 1, grid >= 1 and image_size >= patch + grid "
                             f"- 1; got image_size {image_size}, patch {patch}, clusters {clusters}, grid {grid}")
        self.image_size, self.clusters, self.patch, self.grid = int(image_size), int(clusters), int(patch), int(grid)
        self.alpha = float(alpha)
        self.cell = self.positions // self.grid  # positions per pooling cell; the border left over is not pooled
        self.out_dim = 2 * self.clusters * self.grid * self.grid
        self.register_buffer("filters", torch.zeros(self.clusters, 3, self.patch, self.patch))  # W D, zero-sum
        self.register_buffer("offset", torch.zeros(self.clusters))  # mu . W D: the whitening's centre
        self.register_buffer("eps", torch.ones(()))  # added to each patch's variance
        self.register_buffer("mean", torch.zeros(self.out_dim))  # the training images' features
        self.register_buffer("std", torch.ones(self.out_dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, *, patches: int = 200_000, iterations: int = 20, seed: int = 0,
            batch: int = 256) -> dict:
        """Learn the layer from (n, 3, s, s) network inputs (the training images through the export
        preprocessing), drawing ``patches`` patches at random (at most as many as the images hold). Returns what
        it did (patch count, k-means iterations and inertia, seconds) and the unfolded pieces."""
        from engine.kernels.kmeans import spherical_kmeans  # numba: only when fitting

        t0 = time.perf_counter()
        _check_images(images)
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"k-means layer: expected (n, 3, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(images.shape)}")
        n, p = images.shape[0], self.patch
        patches = int(min(patches, n * self.positions ** 2))  # no more draws than there are patches
        rng = np.random.default_rng(seed)
        pick, top, left = (rng.integers(0, n, patches), rng.integers(0, self.positions, patches),
                           rng.integers(0, self.positions, patches))
        x = images.cpu().numpy()
        rows = x[pick[:, None, None, None], np.arange(3)[None, :, None, None],
                 (top[:, None] + np.arange(p))[:, None, :, None], (left[:, None] + np.arange(p))[:, None, None, :]]
        pts = rows.reshape(patches, -1).astype(np.float64)  # (patches, 3 p p) in (channel, row, column) order
        pts -= pts.mean(axis=1, keepdims=True)
        var = pts.var(axis=1, keepdims=True)
        eps = 0.025 * max(float(np.median(var)), 1e-12)  # the paper's +10 on 0-255 pixels, relative to the data
        pts /= np.sqrt(var + eps)
        mu = pts.mean(axis=0)
        evals, evecs = np.linalg.eigh(np.cov(pts - mu, rowvar=False))
        whiten = (evecs / np.sqrt(np.maximum(evals, 0.0) + 0.1)) @ evecs.T  # ZCA, the paper's 0.1
        z = (pts - mu) @ whiten
        z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
        km = spherical_kmeans(np.ascontiguousarray(z, dtype=np.float32), self.clusters, iterations=iterations,
                              seed=seed)
        cents = km.centroids.astype(np.float64)
        cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
        filt = whiten @ cents.T  # (3 p p, clusters)
        self.offset.copy_(torch.from_numpy(mu @ filt))
        filt -= filt.mean(axis=0, keepdims=True)  # zero-sum: the score ignores the patch mean
        self.filters.copy_(torch.from_numpy(filt.T.reshape(self.clusters, 3, p, p)))
        self.eps.fill_(eps)
        self.mean.zero_()
        self.std.fill_(1.0)
        self.fitted.fill_(True)
        feats = torch.cat([self(images[s:s + batch]) for s in range(0, n, batch)]).double()
        self.mean.copy_(feats.mean(dim=0))
        self.std.copy_(feats.std(dim=0).clamp_min(max(1e-3 * float(feats.std()), 1e-6)))  # constant features: no 0
        return {"patches": int(patches), "clusters": self.clusters, "kmeans_iterations": int(km.iterations),
                "kmeans_inertia": float(km.inertia), "seconds": round(time.perf_counter() - t0, 2),
                # the unfolded pieces (for checks): eps, ZCA matrix, whitened-space centre, unit centroids
                "eps": eps, "whitening": whiten, "patch_mean": mu, "centroids": cents}

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch, self.cell
        box = torch.full((1, 3, p, p), 1.0 / (3 * p * p), dtype=x.dtype, device=x.device)
        mean = F.conv2d(x, box)
        inv_std = torch.rsqrt((F.conv2d(x * x, box) - mean * mean).clamp(min=0) + self.eps)
        z = F.conv2d(x, self.filters) * inv_std  # (n, clusters, L, L), before the whitening's centre
        off = self.offset[None, :, None, None]
        o = (self.positions - self.grid * c) // 2  # centre the pooled cells
        pos = F.relu(z - (off + self.alpha))[:, :, o:o + self.grid * c, o:o + self.grid * c]
        neg = F.relu((off - self.alpha) - z)[:, :, o:o + self.grid * c, o:o + self.grid * c]
        return torch.cat([F.avg_pool2d(pos, c), F.avg_pool2d(neg, c)], dim=1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"k-means layer expects (n, 3, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(x.shape)}")
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if not exporting and not bool(self.fitted):
            raise RuntimeError("the k-means layer has not been fitted: call fit(images) first")
        # in slices of ~2.3M map values (8 images of 32 px): the (n, clusters, L, L) maps of a whole batch leave the
        # caches and, freed, go back to the system at every step (about 3x slower at 32 and at 64 px)
        step = max(1, 2_400_000 // (self.clusters * self.positions ** 2))
        feats = self._features(x) if exporting else torch.cat([self._features(x[s:s + step])
                                                               for s in range(0, x.shape[0], step)])
        return (feats - self.mean) / self.std


def build_backbone(kind: str, *, pretrained: bool = False, image_size: int = 32,
                   code_dim: int = 1000, width: int = 16) -> tuple[nn.Module, int]:
    """An unnormalised feature extractor (n, 3, H, W) -> (n, out_dim) and its out_dim.

    ``vgg16bn``: vgg16_bn features averaged over height and width (512); ``pretrained`` asks for
    torchvision's ImageNet weights (a warning, and random init, when they cannot be had).
    ``conv``: the CIFAR conv encoder (``code_dim``, 1000 by default) for ``image_size`` square inputs.
    """
    if kind == "vgg16bn":
        m = VGG16BNBackbone(pretrained=pretrained)
        return m, m.out_dim
    if kind == "conv":
        if pretrained:
            print("WARNING: there are no pretrained weights for the conv backbone; using random init", file=sys.stderr)
        m = ConvEncoder(image_size=image_size, code_dim=code_dim, width=width)
        return m, m.out_dim
    if kind == "kmeans":
        if pretrained:
            print("WARNING: there are no pretrained weights for the k-means layer; it is fit to the data", file=sys.stderr)
        m = PatchKMeansBackbone(image_size=image_size)
        return m, m.out_dim
    if kind == "resnet18":
        if pretrained:
            print("WARNING: --pretrained is not offered for resnet18; using random init", file=sys.stderr)
        m = ResNet18Backbone()
        return m, m.out_dim
    raise ValueError(f"backbone kind must be one of {LA_BACKBONES}, got {kind!r}")
