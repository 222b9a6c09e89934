"""MPNN, the multi-perspective network: a stack of small levels trained one after the other, without labels.

Each level is the published block::

    Conv 5x5 (in -> 64, padding 2) -> ReLU -> Conv 1x1 (64 -> 16) -> AvgPool 2

(the first level reads the 3 RGB channels, every later one the 16 maps of the level below). A level is
trained so that its 16 output maps are different "perspectives" of the image: for every image the cosine
between each pair of flattened maps is pushed to 0 (``pairwise_cosine_loss``). Levels train in order and
a trained level is frozen while the next one learns.

The embedding is the last level's output, flattened and L2-normalised: ``(n, 3, S, S) -> (n, 16 * s * s)``
with ``s = S / 2**levels`` (224 px and 5 levels, the default, give 7 x 7 maps and 784 dims; 3 levels give
28 x 28 maps and 12,544 dims for about the same compute, which levels 1 and 2 dominate).

Initialisation (``Level.pca_init_``): a level may start from the whitened principal directions of a sample
of its input patches (each map one component) rather than torch's random weights; on video this cuts the
steps level 1 needs to reach the similarity threshold several-fold (see train/mpnn.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.registry import register_encoder

HIDDEN = 64  # channels after the 5x5 conv (published)
MAPS = 16  # channels a level outputs: the "perspectives" (published)
KERNEL = 5  # the first conv's kernel size (published)


class Level(nn.Module):
    """One published level: ``(n, c_in, h, w) -> (n, 16, h // 2, w // 2)``."""

    def __init__(self, in_channels: int, *, hidden: int = HIDDEN, maps: int = MAPS, kernel: int = KERNEL):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, kernel, padding=kernel // 2)
        self.mix = nn.Conv2d(hidden, maps, 1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The published order is conv -> ReLU -> 1x1 -> pool. A 1x1 conv is affine per pixel and the 2x2 average
        # is linear, so they commute exactly: pooling first gives the same maps with a 4x cheaper 1x1 conv
        # (7% of the default network's multiply-adds; tests/test_mpnn.py checks the equality).
        return self.mix(self.pool(F.relu(self.conv(x))))

    @torch.no_grad()
    def pca_init_(self, x: torch.Tensor) -> torch.Tensor:
        """Initialise from a sample of this level's inputs ``x`` (n, c_in, h, w); returns the eigenvalues used.

        The 5x5 conv gets the top ``hidden / 2`` principal directions ``v_j`` of the inputs' (uncentred)
        patch second moment, whitened (``v_j / sqrt(lambda_j)``), each once with each sign and no bias; the
        1x1 conv sets map ``i`` to ``relu(e_i) - relu(-e_i) = e_i``. So each map starts as one whitened
        principal component of the patches -- maps that are already uncorrelated on the sample -- instead of
        16 random mixtures that are nearly parallel; training then only has to remove what is left per image.
        """
        hidden, maps = self.conv.out_channels, self.mix.out_channels
        k = self.conv.kernel_size[0]
        d = self.conv.in_channels * k * k
        half = hidden // 2
        if hidden % 2 or maps > half or half > d:
            raise ValueError(f"pca init needs an even hidden width with maps <= hidden/2 <= patch size; got "
                             f"hidden={hidden}, maps={maps}, patch size={d}")
        if x.dim() != 4 or x.shape[1] != self.conv.in_channels or len(x) == 0:
            raise ValueError(f"x must have shape (n>=1, {self.conv.in_channels}, h, w), got {tuple(x.shape)}")
        m = patch_second_moment(x, k)  # (d, d) float64
        lam, vec = torch.linalg.eigh(m)  # ascending
        lam, vec = lam.flip(0)[:half], vec.flip(1)[:, :half]
        w = (vec / lam.clamp_min(1e-12 * float(lam[0])).sqrt()).T  # (half, d): whitened directions
        self.conv.weight.copy_(torch.cat([w, -w]).reshape(hidden, -1, k, k).to(self.conv.weight))
        self.conv.bias.zero_()
        mix = torch.zeros(maps, hidden, dtype=self.mix.weight.dtype, device=self.mix.weight.device)
        idx = torch.arange(maps)
        mix[idx, idx] = 1.0
        mix[idx, half + idx] = -1.0
        self.mix.weight.copy_(mix.reshape(maps, hidden, 1, 1))
        self.mix.bias.zero_()
        return lam


@torch.no_grad()
def patch_second_moment(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """``E[p p^T]`` over every ``kernel x kernel`` patch of ``x`` (zero padding, as the conv sees them), float64.

    Patches are flattened in the conv weight's order (channel, row, column), so ``w.flatten()`` of a filter
    ``w`` gives its response ``w . p``.
    """
    total = None
    count = 0
    for img in x:  # one image at a time bounds memory: (h*w, d) patches
        p = F.unfold(img[None].double(), kernel, padding=kernel // 2)[0].T  # (h*w, d)
        m = p.T @ p
        total = m if total is None else total + m
        count += p.shape[0]
    return total / count


class MPNN(nn.Module):
    """``levels`` published levels stacked; ``forward`` returns the last level's maps ``(n, 16, s, s)``."""

    def __init__(self, *, levels: int = 5, hidden: int = HIDDEN, maps: int = MAPS, kernel: int = KERNEL):
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int (same-size padding), got {kernel}")
        self.maps = maps
        self.levels = nn.ModuleList(
            Level(3 if i == 0 else maps, hidden=hidden, maps=maps, kernel=kernel) for i in range(levels)
        )

    def features(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Output of the first ``upto`` levels (all when None)."""
        for level in self.levels[: len(self.levels) if upto is None else upto]:
            x = level(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def freeze(self, upto: int) -> None:
        """Freeze levels ``0 .. upto-1`` (no gradients, eval mode); the others train."""
        for i, level in enumerate(self.levels):
            frozen = i < upto
            level.requires_grad_(not frozen)
            level.train(not frozen)


def output_side(size: int, levels: int) -> int:
    """Side of the last level's maps for an input side ``size`` (each AvgPool 2 floors)."""
    for _ in range(levels):
        size //= 2
    return size


def embedding_dim(size: tuple[int, int] | int, levels: int, maps: int = MAPS) -> int:
    h, w = (size, size) if isinstance(size, int) else size
    return maps * output_side(h, levels) * output_side(w, levels)


class MPNNEncoder(nn.Module):
    """``(n, 3, H, W)`` float32 (preprocessed at ``size``) -> ``(n, dim)`` L2-normalised embeddings."""

    def __init__(self, *, levels: int = 5, size: tuple[int, int] | list[int] | int = (224, 224),
                 hidden: int = HIDDEN, maps: int = MAPS, kernel: int = KERNEL):
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        if output_side(min(h, w), levels) < 1:
            raise ValueError(f"input size {(h, w)} is too small for {levels} levels (each halves the side)")
        self.size = (h, w)
        self.net = MPNN(levels=levels, hidden=hidden, maps=maps, kernel=kernel)
        self.dim = embedding_dim(self.size, levels, maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.size:
            raise ValueError(f"images must have shape (n, 3, {self.size[0]}, {self.size[1]}), got {tuple(x.shape)}")
        f = self.net(x)  # (n, 16, s, s)
        return F.normalize(f.flatten(1), dim=1)  # (n, dim)


@register_encoder("mpnn")
def mpnn_encoder(**kwargs) -> MPNNEncoder:
    return MPNNEncoder(**kwargs)


# -- the objective -------------------------------------------------------------------------------------

def pairwise_cosines(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(n, c, h, w)`` maps -> ``(n, c, c)``: cosine between every pair of flattened maps, per image.

    A map that is all zeros has cosine 0 with every other map (and with itself).
    """
    if features.dim() != 4:
        raise ValueError(f"features must have shape (n, channels, h, w), got {tuple(features.shape)}")
    f = features.flatten(2)  # (n, c, h*w)
    f = f / f.norm(dim=2, keepdim=True).clamp_min(eps)
    return f @ f.transpose(1, 2)  # (n, c, c)


def _off_diagonal(cos: torch.Tensor) -> torch.Tensor:
    c = cos.shape[-1]
    mask = ~torch.eye(c, dtype=torch.bool, device=cos.device)
    return cos[:, mask]  # (n, c*(c-1))


def pairwise_cosine_loss(features: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine over all off-diagonal pairs of maps, over the batch (MSE against 0)."""
    if features.shape[1] < 2:
        raise ValueError(f"need at least 2 maps per image to compare, got {features.shape[1]}")
    return _off_diagonal(pairwise_cosines(features)).pow(2).mean()


def max_abs_cosine(features: torch.Tensor) -> torch.Tensor:
    """The largest ``|cos|`` between two different maps of the same image, over the whole batch (a scalar)."""
    if features.shape[1] < 2:
        raise ValueError(f"need at least 2 maps per image to compare, got {features.shape[1]}")
    return _off_diagonal(pairwise_cosines(features)).abs().max()


def max_abs_cosine_per_image(features: torch.Tensor) -> torch.Tensor:
    """``(n,)``: for each image, the largest ``|cos|`` between two of its maps."""
    if features.shape[1] < 2:
        raise ValueError(f"need at least 2 maps per image to compare, got {features.shape[1]}")
    return _off_diagonal(pairwise_cosines(features)).abs().amax(dim=1)


def mean_max_abs_cosine(features: torch.Tensor) -> torch.Tensor:
    """The training statistic: each image's largest ``|cos|`` between two of its maps, averaged over the batch.

    With one image per step it is the published per-frame statistic; averaging (rather than taking the
    batch's maximum) keeps its meaning independent of the batch size.
    """
    return max_abs_cosine_per_image(features).mean()
