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

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

MAGIC = b"LOOKALIKE-CHECKPOINT "
CHECKPOINT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is missing, damaged, or from another format version."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; written files should read like any other
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(path, payload: dict) -> str:
    """Save ``payload`` atomically; returns the payload's sha256 (hex)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest()
    header = {"version": CHECKPOINT_VERSION, "nbytes": len(body), "sha256": digest}
    atomic_write_bytes(Path(path), MAGIC + json.dumps(header).encode() + b"\n" + body)
    return digest


def read_header(path) -> tuple[dict, bytes]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (expected a file written by a lookalike trainer)")
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a lookalike checkpoint (it does not start with {MAGIC!r})")
    nl = raw.find(b"\n")
    try:
        header = json.loads(raw[len(MAGIC) : nl])
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint header ({e})") from None
    if header.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is checkpoint format version {header.get('version')!r}; this lookalike reads version "
            f"{CHECKPOINT_VERSION}. Re-train, or use the lookalike version that wrote it."
        )
    body = raw[nl + 1 :]
    if len(body) != header.get("nbytes"):
        raise CheckpointError(
            f"{path} is truncated or damaged: header says {header.get('nbytes')} payload bytes, found {len(body)}"
        )
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path} is damaged: the payload's sha256 does not match the header")
    return header, body


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and verify a checkpoint; raises CheckpointError with the path on any problem."""
    header, body = read_header(path)
    payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)
    payload["_sha256"] = header["sha256"]
    payload["_path"] = str(path)
    return payload


def checkpoint_sha256(path) -> str:
    return read_header(path)[0]["sha256"]
