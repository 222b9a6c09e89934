"""Local Aggregation (Zhuang, Zhai, Yamins, ICCV 2019): the encoder, the neighbour sets and the loss.

Every training image ``i`` has a code ``v_i`` (a 128-d unit vector from ``LAEncoder``) and a memory-bank row
``v̄_i`` (``engine.memory_bank.MemoryBank``, a running average of its past codes). For a batch:

- background neighbours ``B_i``: image ``i`` itself plus the ``k`` bank rows closest (cosine) to ``v_i``
  among the other rows (``k`` is capped at ``n - 1``; the paper uses 4,096 of ImageNet's 1.28M images),
  selected from the scores the loss needs anyway;
- close neighbours ``C_i``: the rows that share ``i``'s cluster in at least one of several k-means runs over
  the bank (the union over runs, as in the paper); ``i`` itself is always close. Only ``C_i ∩ B_i`` enters;
- loss ``L_i = -log(P(C_i ∩ B_i | v_i) / P(B_i | v_i))`` with ``P(A | v) = Σ_{j∈A} exp(v̄_j·v / τ) / Z``, τ =
  0.07. ``Z`` cancels, so ``L_i = logsumexp_{j∈B_i} s_ij - logsumexp_{j∈C_i∩B_i} s_ij`` with ``s_ij =
  v̄_j·v_i / τ``. Because ``i ∈ C_i ∩ B_i`` the loss is always finite (and 0 when ``C_i ⊇ B_i``).
- instance recognition (IR, Wu et al. 2018; the usual warm-up before LA): ``B_i`` = the whole bank and
  ``C_i = {i}``, i.e. ``-log P(i | v_i)``.

After the loss (and the optimiser step) the batch's rows are updated with its new codes, detached:
``v̄_i <- normalise(0.5 v_i + 0.5 v̄_i)`` (``MemoryBank.update``).

The numpy / engine parts (neighbours, cluster mates, bank update, k-means) are timed in
``LocalAggregation.timings`` so the trainer can report the machinery's share of an epoch.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from train.models.layers import LA_BACKBONES, build_backbone
from train.registry import register_encoder

MODES = ("la", "ir")


class LAEncoder(nn.Module):
    """Backbone (``vgg16bn``: VGG16-BN features averaged over H, W -> 512; ``conv``: the small CIFAR encoder ->
    1000) + a linear head to ``dim``, L2-normalised: (n, 3, H, W) -> (n, dim) unit vectors."""

    def __init__(self, *, backbone: str = "conv", dim: int = 128, image_size: int = 32, code_dim: int = 1000,
                 pretrained: bool = False, width: int = 16):
        super().__init__()
        if backbone not in LA_BACKBONES:
            raise ValueError(f"backbone must be one of {LA_BACKBONES}, got {backbone!r}")
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.kind = backbone
        self.dim = int(dim)
        self.backbone, out_dim = build_backbone(backbone, pretrained=pretrained, image_size=image_size,
                                                code_dim=code_dim, width=width)
        self.head = nn.Linear(out_dim, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)  # (n, dim)

    @torch.no_grad()
    def for_export(self) -> nn.Module:
        """The same function for inference, cheaper: with the conv backbone, everything after the conv stack is
        linear in eval mode (fc -> batch norm with running statistics -> head), so the three fold into one
        Linear (8192 -> 128 at 64 px instead of 8192 -> 1000 -> 128), composed in float64. ``export`` writes
        this module and checks it against ``self`` (onnxruntime vs torch <= 1e-4). The vgg16bn backbone (its
        mean over H, W precedes the head directly) is returned as is."""
        bb = self.backbone
        if self.kind != "conv" or self.training:
            return self
        w = bb.fc.weight.double()  # (code, feat)
        b = bb.fc.bias.double()
        if isinstance(bb.norm, nn.BatchNorm1d):
            n = bb.norm
            scale = 1.0 / torch.sqrt(n.running_var.double() + n.eps)
            shift = -n.running_mean.double() * scale
            if n.affine:
                scale, shift = scale * n.weight.double(), shift * n.weight.double() + n.bias.double()
            w, b = w * scale[:, None], b * scale + shift
        h_w, h_b = self.head.weight.double(), self.head.bias.double()
        fused = nn.Linear(w.shape[1], self.dim)
        fused.weight.copy_((h_w @ w).float())
        fused.bias.copy_((h_w @ b + h_b).float())
        return _FoldedConvLA(bb.features, fused).eval()


class _FoldedConvLA(nn.Module):
    """conv features -> flatten -> one Linear -> L2 normalisation (``LAEncoder.for_export``)."""

    def __init__(self, features: nn.Module, linear: nn.Linear):
        super().__init__()
        self.features = features
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(self.features(x).flatten(1)), dim=1)


@register_encoder("la")
def la_encoder(*, backbone: str = "conv", dim: int = 128, image_size: int = 32, code_dim: int = 1000,
               pretrained: bool = False, width: int = 16) -> nn.Module:
    """Local Aggregation encoder: backbone + linear head, L2-normalised (n, 3, H, W) -> (n, dim).

    (The backbone kind is ``backbone``, not ``arch``: ``train.registry.build_encoder(arch, **kwargs)`` takes
    the registered name as ``arch``.)"""
    return LAEncoder(backbone=backbone, dim=dim, image_size=image_size, code_dim=code_dim, pretrained=pretrained,
                     width=width)


# --------------------------------------------------------------------------------------------------
# The loss on given sets


def la_loss(scores: torch.Tensor, close: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``logsumexp(scores[i]) - logsumexp(scores[i][close[i]])``.

    ``scores``: (b, m) float logits ``v̄_j·v_i / τ`` over row i's background set (m members);
    ``close``: (b, m) bool, which of those members are close neighbours (C ∩ B). Every row needs at least one
    close member (in LA the image itself), else the probability is 0 and the loss infinite: refused.
    """
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be a 2-D tensor of shape (batch_size, background_size), got {tuple(scores.shape)}")
    if close.shape != scores.shape:
        raise ValueError(f"close must have the shape of scores {tuple(scores.shape)}, got {tuple(close.shape)}")
    if close.dtype != torch.bool:
        raise ValueError(f"close must be a bool tensor, got {close.dtype}")
    if scores.shape[0] == 0:
        raise ValueError("la_loss needs at least one row, got an empty batch")
    empty = ~close.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten()[:10].tolist()
        raise ValueError(f"every row needs at least one close neighbour in its background set; rows {rows} have none")
    log_b = torch.logsumexp(scores, dim=1)  # (b,)
    log_cb = torch.logsumexp(scores.masked_fill(~close, float("-inf")), dim=1)  # (b,)
    return (log_b - log_cb).mean()


# --------------------------------------------------------------------------------------------------
# Neighbour sets (numpy)


def background_neighbours(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """``B_i`` for each batch row: (b, 1 + k') int64 bank rows, column 0 the row itself, then (in no particular
    order) the ``k' = min(k, n - 1)`` other bank rows with the highest ``scores`` (cosine of the batch's new
    codes with the bank rows, (b, n)). Found by partial selection (``np.argpartition``, O(n) per row): with
    ``k`` a good fraction of ``n`` (4,096 of CIFAR's 8,000), a full top-k search would cost more than the
    encoder. At a tie on the k-th score, which of the tied rows enter is unspecified."""
    scores = np.asarray(scores)
    rows = np.asarray(rows, dtype=np.int64)
    if scores.ndim != 2 or rows.shape != (scores.shape[0],):
        raise ValueError(f"scores must have shape (b, n) and rows shape (b,), got {scores.shape} and {rows.shape}")
    if int(k) < 1:
        raise ValueError(f"k (background neighbours) must be >= 1, got {k}")
    b, n = scores.shape
    kk = min(int(k), n - 1)
    out = np.empty((b, 1 + kk), dtype=np.int64)
    out[:, 0] = rows
    if kk == 0:
        return out
    if kk == n - 1:  # every other row: no selection needed
        others = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n))
        keep = others != rows[:, None]
        out[:, 1:] = others[keep].reshape(b, kk)
        return out
    s = np.array(scores, dtype=np.float32)  # (b, n), a copy we may write
    s[np.arange(b), rows] = np.inf  # the row itself is always in B_i: select it, then drop it
    top = np.argpartition(-s, kk, axis=1)[:, : kk + 1]  # (b, kk + 1): the row itself and kk others
    keep = top != rows[:, None]
    out[:, 1:] = top[keep].reshape(b, kk)
    return out


def close_neighbours(background: np.ndarray, rows: np.ndarray, cluster_labels: np.ndarray) -> np.ndarray:
    """(b, m) bool: ``background[i, j]`` shares row ``rows[i]``'s cluster in at least one k-means run, or is
    ``rows[i]`` itself. ``cluster_labels``: (runs, n) int labels, one row per k-means run."""
    labels = np.asarray(cluster_labels)
    if labels.ndim != 2:
        raise ValueError(f"cluster_labels must have shape (runs, n), got {labels.shape}")
    rows = np.asarray(rows, dtype=np.int64)
    if background.ndim != 2 or background.shape[0] != rows.shape[0]:
        raise ValueError(f"background must have shape ({rows.shape[0]}, m), got {background.shape}")
    close = background == rows[:, None]  # (b, m)
    for run in labels:
        close |= run[background] == run[rows][:, None]
    return close


# --------------------------------------------------------------------------------------------------
# The whole objective with its bank


class LocalAggregation:
    """The LA / IR objective over a ``MemoryBank`` and the latest k-means labels of it.

    ``loss(rows, codes, mode=)`` computes the loss of a batch from the bank as it is (the bank is not
    touched); ``update_bank(rows, codes)`` then mixes the batch's new codes in; ``recluster`` refreshes the
    cluster labels. Time spent outside the encoder is added to ``timings`` (seconds).
    """

    def __init__(self, bank, *, background: int = 4096, temperature: float = 0.07):
        if background < 1:
            raise ValueError(f"background (k nearest bank rows) must be >= 1, got {background}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.bank = bank
        self.background = int(background)
        self.temperature = float(temperature)
        self.cluster_labels: np.ndarray | None = None  # (runs, n) int64
        self.timings = {"neighbours": 0.0, "bank_update": 0.0, "cluster": 0.0}

    def recluster(self, n_clusters: int, *, repeats: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
        """k-means (``repeats`` runs of ``n_clusters`` clusters) on the bank -> (repeats, n) labels, kept."""
        t = time.perf_counter()
        labels = self.bank.cluster(min(int(n_clusters), len(self.bank)), repeats=repeats,
                                   iterations=iterations, seed=seed)
        self.cluster_labels = np.stack(labels).astype(np.int64)
        self.timings["cluster"] += time.perf_counter() - t
        return self.cluster_labels

    def _bank_tensor(self, device) -> torch.Tensor:
        with warnings.catch_warnings():  # a read-only view: never written through this tensor
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.bank.vectors).to(device)

    def loss(self, rows, codes: torch.Tensor, *, mode: str = "la") -> torch.Tensor:
        """The batch's mean loss. ``rows``: (b,) bank rows of the images; ``codes``: (b, dim) their unit codes
        (with grad). ``mode``: "la" (needs ``recluster`` first) or "ir" (instance recognition)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if codes.ndim != 2 or codes.shape != (len(rows), self.bank.dim):
            raise ValueError(f"codes must have shape ({len(rows)}, {self.bank.dim}), got {tuple(codes.shape)}")
        bank = self._bank_tensor(codes.device)  # (n, dim)
        scores = codes @ bank.T / self.temperature  # (b, n)
        r = torch.from_numpy(rows).to(codes.device)
        if mode == "ir":
            close = torch.zeros_like(scores, dtype=torch.bool)
            close[torch.arange(len(rows), device=codes.device), r] = True
            return la_loss(scores, close)
        if self.cluster_labels is None:
            raise RuntimeError("LA mode needs cluster labels: call recluster() first")
        t = time.perf_counter()
        nb = background_neighbours(scores.detach().cpu().numpy(), rows, self.background)  # (b, m)
        close = close_neighbours(nb, rows, self.cluster_labels)  # (b, m)
        self.timings["neighbours"] += time.perf_counter() - t
        nb_t = torch.from_numpy(nb).to(codes.device)
        return la_loss(scores.gather(1, nb_t), torch.from_numpy(close).to(codes.device))

    def update_bank(self, rows, codes: torch.Tensor) -> None:
        """Mix the batch's new codes (detached) into its bank rows."""
        t = time.perf_counter()
        rows = np.ascontiguousarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        self.bank.update(rows, np.ascontiguousarray(codes.detach().cpu().numpy(), dtype=np.float32))
        self.timings["bank_update"] += time.perf_counter() - t
