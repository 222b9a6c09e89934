"""Autoencoders on the encoders (backbones) of ``train/models/layers.py``, which LA reuses too.

Two architectures:

- ``vgg16bn``: a SegNet-style autoencoder. The encoder is torchvision's ``vgg16_bn().features`` (13 conv +
  batch norm + ReLU layers, 5 max-pools); each pool keeps its argmax indices, and the mirrored decoder
  (``MaxUnpool2d`` with those indices, then ``ConvTranspose2d`` + batch norm + ReLU per encoder conv, in
  reverse) rebuilds the image; the last layer (back to 3 channels) has no batch norm and no activation.
  Backbone features: the encoder's (n, 512, h, w) output averaged over h and w -> (n, 512).
- ``conv``: a small CIFAR conv autoencoder: 4 conv layers (3 of them stride 2) then a linear layer to a
  1000-d code, mirrored by the decoder. Backbone features: the code, (n, 1000).

The encoders themselves (``VGG16BNBackbone``, ``ConvEncoder``), ``build_backbone(kind)`` (the unnormalised
feature extractor) and ``L2Normalized`` live in ``train/models/layers.py``; the registered encoders
``ae-vgg16bn`` and ``ae-conv`` wrap the backbone with an L2 normalisation (the embedding the engine searches).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from train.models.layers import BACKBONES, ConvEncoder, L2Normalized, VGG16BNBackbone, build_backbone
from train.registry import register_encoder


# --------------------------------------------------------------------------------------------------
# VGG16-BN / SegNet


class SegNetDecoder(nn.Module):
    """The mirror of a VGG ``features`` stack: unpool with the encoder's indices, then transposed convs."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        # Group the encoder into blocks of convs, each closed by a pool.
        blocks, convs = [], []
        for m in features:
            if isinstance(m, nn.Conv2d):
                convs.append(m)
            elif isinstance(m, nn.MaxPool2d):
                blocks.append(convs)
                convs = []
        if convs:
            raise ValueError("a VGG features stack must end with a max-pool")
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        stages = []
        first_conv = blocks[0][0]
        for convs in reversed(blocks):
            layers = []
            for conv in reversed(convs):
                layers.append(nn.ConvTranspose2d(conv.out_channels, conv.in_channels, 3, padding=1))
                if conv is not first_conv:  # the final layer (back to RGB) keeps no norm and no activation
                    layers += [nn.BatchNorm2d(conv.in_channels), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, z: torch.Tensor, indices: list, sizes: list) -> torch.Tensor:
        if len(indices) != len(self.stages) or len(sizes) != len(self.stages):
            raise ValueError(f"expected {len(self.stages)} pooling indices and sizes, got {len(indices)} and {len(sizes)}")
        x = z
        for stage, idx, size in zip(self.stages, reversed(indices), reversed(sizes)):
            x = self.unpool(x, idx, output_size=size)
            x = stage(x)
        return x


class SegNetAutoencoder(nn.Module):
    """VGG16-BN encoder with pooling indices + mirrored decoder; forward returns the reconstruction."""

    def __init__(self, *, pretrained: bool = False):
        super().__init__()
        self.encoder = VGG16BNBackbone(pretrained=pretrained)
        self.decoder = SegNetDecoder(self.encoder.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, indices, sizes = self.encoder.encode(x, with_indices=True)
        return self.decoder(z, indices, sizes)


# --------------------------------------------------------------------------------------------------
# Small CIFAR conv autoencoder


class ConvDecoder(nn.Module):
    def __init__(self, encoder: ConvEncoder):
        super().__init__()
        c, h, w = encoder.map_shape
        self.map_shape = (c, h, w)
        self.fc = nn.Linear(encoder.out_dim, c * h * w)
        self.net = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.BatchNorm2d(c // 2), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c // 2, c // 4, 4, stride=2, padding=1), nn.BatchNorm2d(c // 4), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c // 4, c // 8, 4, stride=2, padding=1), nn.BatchNorm2d(c // 8), nn.ReLU(inplace=True),
            nn.Conv2d(c // 8, 3, 3, padding=1),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(code).view(-1, *self.map_shape))


class ConvAutoencoder(nn.Module):
    def __init__(self, *, image_size: int = 32, code_dim: int = 1000):
        super().__init__()
        self.encoder = ConvEncoder(image_size=image_size, code_dim=code_dim)
        self.decoder = ConvDecoder(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# --------------------------------------------------------------------------------------------------
# Public helpers


def build_autoencoder(arch: str, *, pretrained: bool = False, image_size: int = 32,
                      code_dim: int = 1000) -> nn.Module:
    """The whole autoencoder; its ``encoder`` attribute is ``build_backbone(arch)``'s module."""
    if arch == "vgg16bn":
        return SegNetAutoencoder(pretrained=pretrained)
    if arch == "conv":
        return ConvAutoencoder(image_size=image_size, code_dim=code_dim)
    raise ValueError(f"autoencoder arch must be one of {BACKBONES}, got {arch!r}")


def backbone_state_from_ae(checkpoint_path, kind: str) -> dict:
    """The encoder weights of an autoencoder checkpoint (file or run folder), as a state dict that loads
    into ``build_backbone(kind)[0]`` (for LA's ``--init-from``)."""
    from train.checkpoint import CheckpointError, load_checkpoint

    if kind not in BACKBONES:
        raise ValueError(f"backbone kind must be one of {BACKBONES}, got {kind!r}")
    p = Path(checkpoint_path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    ckpt = load_checkpoint(p)
    want = f"ae-{kind}"
    if ckpt.get("name") != want:
        raise CheckpointError(f"{p} holds model {ckpt.get('name')!r}; a {kind} backbone needs an {want!r} checkpoint")
    model = ckpt.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{p} has no 'model' state dict")
    state = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    if not state:
        raise CheckpointError(f"{p}: the model state dict has no 'encoder.*' entries")
    return state


@register_encoder("ae-vgg16bn")
def ae_vgg16bn_encoder(**kwargs) -> nn.Module:
    """SegNet/VGG16-BN encoder, features averaged over H and W, L2-normalised: (n, 3, H, W) -> (n, 512)."""
    return L2Normalized(build_backbone("vgg16bn", **kwargs)[0])


@register_encoder("ae-conv")
def ae_conv_encoder(*, image_size: int = 32, code_dim: int = 1000) -> nn.Module:
    """CIFAR conv autoencoder code, L2-normalised: (n, 3, s, s) -> (n, code_dim)."""
    return L2Normalized(build_backbone("conv", image_size=image_size, code_dim=code_dim)[0])
