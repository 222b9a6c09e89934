"""What the networks see: the (evaluation / export) preprocessing trainers fit or choose, and the random training
views some of them train on.

- ``IMAGENET_MEAN`` / ``IMAGENET_STD``: the statistics ImageNet-pretrained networks (VGG16-BN) expect;
- ``fitted_preprocess``: a ``Preprocess`` whose mean / std are the training images' own;
- ``preprocess_all`` / ``show``: images to a network-input tensor and back to displayable pictures;
- ``resized_uint8`` / ``augment`` / ``epoch_generator``: random resized crops, flips and colour jitter in torch,
  batched, on uint8 images resized once (LA's training views);
- ``rotate`` / ``gaussian_blur`` / ``down_up``: the extra edits of copy-detection views (a small rotation, a
  blur, a downscale-upscale), batched with one parameter per image, each checked against OpenCV in the tests.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.preprocess import Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what (ImageNet-pretrained) VGG16-BN expects
IMAGENET_STD = (0.229, 0.224, 0.225)


def fitted_preprocess(images, *, size: int | tuple[int, int], grayscale: bool = False, sample: int = 2000,
                      **kw) -> Preprocess:
    """A Preprocess whose mean / std are the training images' own (per channel; one grey value when
    ``grayscale``), measured after resizing on at most ``sample`` evenly spread images. ``size``: a square
    side or (height, width)."""
    size = (size, size) if isinstance(size, int) else size
    base = Preprocess(size=size, grayscale=grayscale, **kw)
    n = len(images)
    pick = np.unique((np.arange(min(n, sample)) * n) // max(1, min(n, sample)))
    x = base([images[i] for i in pick]).astype(np.float64)  # (m, 3, s, s) in [0, 1]
    if grayscale:
        mean = (float(x.mean()),) * 3
        std = (max(float(x.std()), 1e-3),) * 3
    else:
        mean = tuple(float(v) for v in x.mean(axis=(0, 2, 3)))
        std = tuple(max(float(v), 1e-3) for v in x.std(axis=(0, 2, 3)))
    return Preprocess(size=size, grayscale=grayscale, mean=mean, std=std, **kw)


def preprocess_all(pre: Preprocess, images, *, batch: int = 1024) -> torch.Tensor:
    """All images through ``pre`` -> (n, 3, h, w) float32 tensor (batched to bound memory)."""
    parts = [pre(images[s : s + batch]) for s in range(0, len(images), batch)]
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros((0, 3, *pre.size), np.float32))


def show(pre: Preprocess, x: np.ndarray) -> np.ndarray:
    """Network input (n, 3, h, w) -> displayable (n, h, w, 3) in [0, 1] (undoes mean / std / BGR)."""
    x = np.asarray(x, np.float32).transpose(0, 2, 3, 1)
    if pre.color == "BGR":
        x = x[..., ::-1]
    return np.clip(x * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32), 0.0, 1.0)


def resize_side(side: int, fraction: float) -> int:
    """Shorter side to resize to so that a centre crop of ``side`` keeps ``fraction`` of it."""
    return max(side, int(round(side / fraction)))


def resized_uint8(images, side: int, *, center_crop: float = 1.0, batch: int = 2048) -> torch.Tensor:
    """Every image's centre square (the part the eval Preprocess keeps: ``center_crop`` of the shorter side)
    at ``side`` x ``side`` -> (n, side, side, 3) uint8 tensor: what the augmentation crops from."""
    pre = Preprocess(size=(side, side), resize_to=resize_side(side, center_crop))
    out = np.empty((len(images), side, side, 3), np.uint8)
    for s in range(0, len(images), batch):
        for j, im in enumerate(images[s : s + batch]):
            out[s + j] = pre.resize_crop(im)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------------
# augmentation (torch, batched)

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as OpenCV's RGB -> grey


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (_LUMA[0] * x[:, 0] + _LUMA[1] * x[:, 1] + _LUMA[2] * x[:, 2]).unsqueeze(1)  # (b, 1, h, w)


def augment(images: torch.Tensor, *, out_size: int, mean, std, crop_scale: float = 0.3, jitter: float = 0.2,
            hue: float = 0.0, grayscale: float = 0.0, rotation: float = 0.0, blur: float = 0.0,
            downscale: float = 0.0, color: str = "RGB", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random views of ``images`` (b, H, W, 3) uint8 RGB -> (b, 3, out_size, out_size) float32 network input.

    Per image: a random resized crop (area fraction in [crop_scale, 1], aspect ratio in [3/4, 4/3], bilinear,
    one affine grid for the batch), a horizontal flip with probability 1/2, a rotation by an angle in
    [-rotation, rotation] degrees (``rotate``), brightness, contrast and saturation factors in
    [1 - jitter, 1 + jitter] (in random order), a hue rotation in [-hue, hue] turns (in YIQ space), grey with
    probability ``grayscale``, a Gaussian blur with probability ``blur`` (sigma in ``BLUR_SIGMA`` pixels of the
    view), a downscale to a factor in ``DOWNSCALE`` of the side and back with probability ``downscale``
    (``down_up``); then clipping to [0, 1] and ``(x - mean) / std``. ``rotation``, ``blur`` and ``downscale`` at
    0 draw no random numbers, so views without them are exactly those of the code before they existed.
    """
    import torch.nn.functional as F

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"images must be a uint8 tensor of shape (b, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    g = generator
    b = images.shape[0]
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (b, 3, H, W)
    area = torch.empty(b).uniform_(crop_scale, 1.0, generator=g)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] grid units
    cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (b, 3, s, s)
    if rotation > 0:
        x = rotate(x, torch.empty(b).uniform_(-rotation, rotation, generator=g))
    if jitter > 0:
        factors = torch.empty(3, b, 1, 1, 1).uniform_(1 - jitter, 1 + jitter, generator=g)
        for op in torch.randperm(3, generator=g).tolist():
            f = factors[op]
            if op == 0:  # brightness
                x = (x * f).clamp_(0, 1)
            elif op == 1:  # contrast, around the mean grey level
                m = _grey(x).mean(dim=(2, 3), keepdim=True)
                x = ((x - m) * f + m).clamp_(0, 1)
            else:  # saturation, around each pixel's grey
                gr = _grey(x)
                x = ((x - gr) * f + gr).clamp_(0, 1)
    if hue > 0:
        a = torch.empty(b).uniform_(-hue, hue, generator=g) * (2 * math.pi)
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1] = torch.cos(a)
        rot[:, 1, 2] = -torch.sin(a)
        rot[:, 2, 1] = torch.sin(a)
        rot[:, 2, 2] = torch.cos(a)
        m = torch.linalg.inv(yiq) @ rot @ yiq  # (b, 3, 3)
        x = torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1)
    if grayscale > 0:
        grey = (torch.rand(b, generator=g) < grayscale).float().view(b, 1, 1, 1)
        x = x * (1 - grey) + _grey(x) * grey
    if blur > 0:
        pick = torch.rand(b, generator=g) < blur
        sigma = torch.empty(b).uniform_(*BLUR_SIGMA, generator=g)
        if pick.any():
            x = x.clone()
            x[pick] = gaussian_blur(x[pick], sigma[pick])
    if downscale > 0:
        pick = torch.rand(b, generator=g) < downscale
        factor = torch.empty(b).uniform_(*DOWNSCALE, generator=g)
        for i in torch.nonzero(pick).flatten().tolist():
            x[i : i + 1] = down_up(x[i : i + 1], float(factor[i]))
    x = (x - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float32).view(1, 3, 1, 1)
    if color == "BGR":
        x = x.flip(1)
    return x.contiguous()


BLUR_SIGMA = (0.3, 2.0)  # Gaussian blur sigma, in pixels of the training view, drawn uniformly
DOWNSCALE = (0.3, 0.8)  # downscale-upscale: the small side as a fraction of the view's, drawn uniformly


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` (b, c, H, W) float rotated about its centre by ``degrees`` (b,) (positive:
    counter-clockwise on screen, as ``cv2.getRotationMatrix2D``), same size, bilinear, mirrored beyond the
    edges (OpenCV's ``BORDER_REFLECT``)."""
    import torch.nn.functional as F

    b, _, h, w = x.shape
    if degrees.shape != (b,):
        raise ValueError(f"degrees must have shape ({b},), one angle per image, got {tuple(degrees.shape)}")
    a = degrees.to(torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    # output pixel (u, v) samples input R^-1 (u, v) about the centre, in pixels; affine_grid works in [-1, 1]
    # units per axis, so the off-diagonal terms carry the aspect ratio
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` (b, c, H, W) float blurred by a Gaussian of its own ``sigma`` (b,) pixels: separable,
    kernel radius ceil(3 * max sigma), mirrored edges without repeating the edge pixel (OpenCV's default
    ``BORDER_REFLECT_101``); the kernel is normalised to sum 1."""
    import torch.nn.functional as F

    b, c, h, w = x.shape
    if sigma.shape != (b,) or not bool((sigma > 0).all()):
        raise ValueError(f"sigma must be ({b},) positive values, one per image, got {tuple(sigma.shape)}")
    r = max(1, math.ceil(3 * float(sigma.max())))
    r = min(r, h - 1, w - 1)  # reflect padding needs a radius below the side
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma.to(torch.float32)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (b * c, 2r + 1)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def down_up(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` (b, c, H, W) float shrunk to ``factor`` of each side (rounded) by averaging (as ``cv2.INTER_AREA``
    for a whole factor; otherwise each small pixel averages the whole input pixels it overlaps) and enlarged
    back (bilinear, as ``cv2.INTER_LINEAR``): the detail a copy saved small and viewed large loses."""
    import torch.nn.functional as F

    if not 0 < factor <= 1:
        raise ValueError(f"factor must be in (0, 1], got {factor}")
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Augmentation randomness of one epoch: depends on (seed, epoch) only, so a resumed run repeats it."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch + 7)
    return g
