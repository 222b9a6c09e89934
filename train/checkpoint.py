"""Checkpoints: written atomically, checksummed, versioned.

File layout: one header line ``LOOKALIKE-CHECKPOINT {json}\\n`` (format version, payload size and sha256),
then the payload as written by ``torch.save``. A crash mid-save leaves the previous file whole (temporary
file in the same folder, fsync, then ``os.replace``); a truncated or altered file fails the checksum and is
refused with a message naming the path.

Payload keys every trainer writes (see ``train.common.Run.save``):
  name          the model name ("mpnn", "ae-conv", "ae-vgg16bn", "la", "siamese")
  encoder       {"arch", "kwargs", "state_dict", "dim", "preprocess"}: enough to rebuild the encoder alone
  model         state dict of the whole trained module (decoders, heads included)
  optimizer     optimizer state dict
  config        the trainer's config as a dict
  epoch, step   progress counters (epoch = number of finished epochs)
  extra         trainer-specific state (memory bank, level index, ...)
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from engine.fileio import atomic_write, read_framed, write_framed

MAGIC = b"LOOKALIKE-CHECKPOINT "
CHECKPOINT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is missing, damaged, or from another format version."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one, never half."""
    atomic_write(path, data)


def save_checkpoint(path, payload: dict) -> str:
    """Save ``payload`` atomically; returns the payload's sha256 (hex)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return write_framed(path, MAGIC, {"version": CHECKPOINT_VERSION}, buf.getvalue())


def read_header(path) -> tuple[dict, bytes]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a file written by a lookalike trainer)")
    return read_framed(path, MAGIC, CHECKPOINT_VERSION, what="checkpoint", error=CheckpointError,
                       version_hint=". Re-train, or use the lookalike version that wrote it.")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and verify a checkpoint; raises CheckpointError with the path on any problem."""
    header, body = read_header(path)
    payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)
    payload["_sha256"] = header["sha256"]
    payload["_path"] = str(path)
    return payload


def checkpoint_sha256(path) -> str:
    return read_header(path)[0]["sha256"]
