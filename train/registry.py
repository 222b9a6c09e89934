"""A registry of encoder architectures, so export, tests and benchmarks need no per-model edits.

An encoder maps ``(n, 3, H, W)`` float32 images (already preprocessed as its ``Preprocess`` says) to
``(n, dim)`` L2-normalised embeddings. Trainers register a factory per architecture::

    @register_encoder("mpnn")
    def mpnn_encoder(**kwargs) -> nn.Module: ...

and store ``{"arch", "kwargs", "state_dict", "dim", "preprocess"}`` under the checkpoint's ``encoder`` key;
``load_encoder(path)`` rebuilds the module from that alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from train.checkpoint import CheckpointError, load_checkpoint

if TYPE_CHECKING:  # torch loads with the architectures (_populate): export's --help reads MODEL_NAMES without it
    import torch.nn as nn

    from engine.preprocess import Preprocess

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}

# Model names (run folders under runs/ and exported files under models/) and the trainer of each.
MODEL_NAMES = ("mpnn", "ae-conv", "ae-vgg16bn", "la", "siamese")


def register_encoder(arch: str):
    def deco(fn):
        if arch in _ENCODERS and _ENCODERS[arch] is not fn:
            raise ValueError(f"encoder architecture {arch!r} is registered twice")
        _ENCODERS[arch] = fn
        return fn

    return deco


def _populate() -> None:
    import train.models  # noqa: F401  (registers every architecture)


def list_encoders() -> list[str]:
    _populate()
    return sorted(_ENCODERS)


def build_encoder(arch: str, /, **kwargs) -> nn.Module:
    _populate()
    if arch not in _ENCODERS:
        raise KeyError(f"unknown encoder architecture {arch!r}; known: {', '.join(sorted(_ENCODERS))}")
    return _ENCODERS[arch](**kwargs)


@dataclass
class EncoderInfo:
    name: str  # model name, e.g. "la"
    arch: str
    dim: int
    preprocess: Preprocess
    sha256: str  # of the source checkpoint's payload
    path: str
    config: dict


def load_encoder(path) -> tuple[nn.Module, EncoderInfo]:
    """Rebuild the encoder (eval mode, CPU) from a checkpoint file or a run folder holding checkpoint.pt."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    return encoder_from_checkpoint(load_checkpoint(p), p)


def encoder_from_checkpoint(ckpt: dict, p: Path) -> tuple[nn.Module, EncoderInfo]:
    """``load_encoder`` of a checkpoint already read (``train.checkpoint.load_checkpoint``) from the file ``p``."""
    from engine.preprocess import Preprocess

    enc = ckpt.get("encoder")
    if not isinstance(enc, dict) or not {"arch", "kwargs", "state_dict", "dim", "preprocess"} <= set(enc):
        raise CheckpointError(f"{p} has no usable 'encoder' entry (expected arch, kwargs, state_dict, dim, preprocess)")
    try:
        model = build_encoder(enc["arch"], **enc["kwargs"])
        model.load_state_dict(enc["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"{p}: this lookalike cannot rebuild encoder {enc['arch']!r} with kwargs {enc['kwargs']} ({e})"
        ) from None
    model.eval()
    info = EncoderInfo(
        name=ckpt.get("name", enc["arch"]),
        arch=enc["arch"],
        dim=int(enc["dim"]),
        preprocess=Preprocess.from_dict(enc["preprocess"]),
        sha256=ckpt["_sha256"],
        path=str(p),
        config=ckpt.get("config", {}),
    )
    return model, info
