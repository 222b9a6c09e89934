"""The Siamese pair network (Koch, Zemel & Salakhutdinov 2015, "Siamese Neural Networks for One-shot Image
Recognition"), scaled to digit-sized images, and the metric-learning losses with online in-batch mining.

Pair network: one shared conv tower maps each image to an embedding; the absolute difference of the two
(L2-normalised) embeddings goes through a linear head to one logit, "same class". The tower begins by
averaging the 3 input channels, so grey digits and RGB images both work. The searchable embedding is the
tower's output, L2-normalised.

Losses on a labelled batch of embeddings (Euclidean distances between unit vectors):
- ``binary``: BCE with logits on balanced positive / negative pairs through the head.
- ``contrastive`` (Hadsell, Chopra & LeCun 2006): d(a,p)^2 + max(0, m - d(a,n))^2 over mined triplets.
- ``triplet`` (Schroff et al. 2015): max(0, d(a,p) - d(a,n) + m) over mined triplets.
Mining (``mine_triplets``):
- ``hard`` ("batch hard", Hermans et al. 2017): per anchor, its farthest positive and nearest negative.
- ``semihard`` (FaceNet, as in TensorFlow's ``triplet_semihard_loss``): per positive pair (a, p), the nearest
  negative farther than p; when there is none, the farthest negative.
A batch with no valid triplet (one class only, or no class seen twice) gives a loss of exactly 0 that still
back-propagates (zero gradients).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.choices import DEFAULT_MARGIN, MININGS  # defined without torch, for train.siamese --help
from train.models.layers import L2Normalized
from train.registry import register_encoder


class SiameseTower(nn.Module):
    """(n, 3, s, s) -> (n, dim) unnormalised embedding; s >= 8 (28 for MNIST)."""

    def __init__(self, *, image_size: int = 28, dim: int = 128, width: int = 32):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"siamese image_size must be at least 8, got {image_size}")
        self.image_size = int(image_size)
        self.out_dim = int(dim)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = image_size // 2 // 2 // 2
        self.fc = nn.Linear(4 * w * side * side, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be a tensor of shape (n, 3, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"siamese tower expects (n, 3, {self.image_size}, {self.image_size}) images, got {tuple(x.shape)}")
        g = x.mean(dim=1, keepdim=True)  # (n, 1, s, s): grey, whatever the input colours
        return self.fc(self.features(g).flatten(1))  # (n, dim)


class SiameseNet(nn.Module):
    """Shared tower + |e1 - e2| + linear head -> one logit per pair.

    The head reads |e1 - e2| * sqrt(dim): for unit vectors each coordinate of the difference is of order
    1 / sqrt(dim), and the fixed scale gives the head inputs of order 1 (so it learns at a usual rate)."""

    def __init__(self, *, image_size: int = 28, dim: int = 128):
        super().__init__()
        self.tower = SiameseTower(image_size=image_size, dim=dim)
        self.head = nn.Linear(dim, 1)
        self.scale = float(dim) ** 0.5

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(x), dim=1)  # (n, dim) unit vectors

    def pair_logits(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        return self.head((e1 - e2).abs() * self.scale).squeeze(1)  # (n,)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        e = self.embed(torch.cat([x1, x2]))  # one pass, so batch norm sees both sides together
        return self.pair_logits(e[: len(x1)], e[len(x1):])


@register_encoder("siamese")
def siamese_encoder(*, image_size: int = 28, dim: int = 128) -> nn.Module:
    """The Siamese tower, L2-normalised: (n, 3, s, s) -> (n, dim)."""
    return L2Normalized(SiameseTower(image_size=image_size, dim=dim))


# --------------------------------------------------------------------------------------------------
# Losses and mining


def _check_batch(emb: torch.Tensor, labels: torch.Tensor) -> None:
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2D tensor of shape (batch_size, embedding_size), got {tuple(emb.shape)}")
    if labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must be a 1D tensor of shape ({emb.shape[0]},), got {tuple(labels.shape)}")


def pairwise_distances(emb: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, n) Euclidean distances, exact 0 on the diagonal, finite gradient everywhere."""
    sq = (emb * emb).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T).clamp_min(0.0)
    eye = torch.eye(len(emb), dtype=torch.bool, device=emb.device)
    d2 = d2.masked_fill(eye, 0.0)
    zero = d2 <= 1e-12
    return torch.where(zero, torch.zeros_like(d2), torch.sqrt(torch.where(zero, torch.ones_like(d2), d2)))


@torch.no_grad()
def mine_triplets(dist: torch.Tensor, labels: torch.Tensor, mining: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (a, p, n), each (t,), of the mined triplets; t may be 0. Ties go to the lowest index."""
    if mining not in MININGS:
        raise ValueError(f"mining must be one of {MININGS}, got {mining!r}")
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    pos = same & ~eye  # (n, n)
    neg = ~same
    has = pos.any(1) & neg.any(1)  # anchors with at least one positive and one negative
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    if mining == "hard":
        a = torch.nonzero(has).flatten()
        p = torch.where(pos, dist, -inf)[a].argmax(1)  # farthest positive
        ng = torch.where(neg, dist, inf)[a].argmin(1)  # nearest negative
        return a, p, ng
    a, p = torch.nonzero(pos & has[:, None], as_tuple=True)  # every positive pair (a, p), a with a negative
    d_ap = dist[a, p][:, None]  # (t, 1)
    d_an = dist[a]  # (t, n)
    negs = neg[a]
    farther = negs & (d_an > d_ap)
    nearest_farther = torch.where(farther, d_an, inf).argmin(1)
    farthest = torch.where(negs, d_an, -inf).argmax(1)
    ng = torch.where(farther.any(1), nearest_farther, farthest)
    return a, p, ng


def _empty_loss(emb: torch.Tensor) -> torch.Tensor:
    return (emb * 0.0).sum()  # 0, still attached to the graph


def _mined_distances(emb: torch.Tensor, labels: torch.Tensor, mining: str):
    """(d(a, p), d(a, n)) over the mined triplets of the batch, or None when mining finds none."""
    _check_batch(emb, labels)
    dist = pairwise_distances(emb)
    a, p, n = mine_triplets(dist.detach(), labels, mining)
    return None if len(a) == 0 else (dist[a, p], dist[a, n])


def contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, *, margin: float = DEFAULT_MARGIN["contrastive"],
                     mining: str = "hard") -> torch.Tensor:
    """Mean over mined triplets of d(a,p)^2 + max(0, margin - d(a,n))^2."""
    d = _mined_distances(emb, labels, mining)
    if d is None:
        return _empty_loss(emb)
    return (d[0] ** 2 + F.relu(margin - d[1]) ** 2).mean()


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, *, margin: float = DEFAULT_MARGIN["triplet"],
                 mining: str = "hard") -> torch.Tensor:
    """Mean over mined triplets of max(0, d(a,p) - d(a,n) + margin)."""
    d = _mined_distances(emb, labels, mining)
    if d is None:
        return _empty_loss(emb)
    return F.relu(d[0] - d[1] + margin).mean()
