"""Checkpoints: written atomically, checksummed, versioned, and holding no code.

File layout: one header line ``LOOKALIKE-CHECKPOINT {json}\\n`` (format version, payload size and sha256),
then the payload as written by ``torch.save``. A crash mid-save leaves the previous file whole (temporary
file in the same folder, fsync, then ``os.replace``); a truncated or altered file fails the checksum and is
refused with a message naming the path.

Nothing in a checkpoint can run code when it is read: the payload holds tensors and plain Python values only
(dicts, lists, tuples, str, int, float, bool, None; ``to_plain`` turns numpy arrays into tensors and numpy
numbers into Python ones when saving, and refuses anything else), and ``load_checkpoint`` reads it with
``torch.load(weights_only=True)``, whose unpickler builds only those. A file whose payload names anything else
(a crafted ``__reduce__`` calling ``os.system``, say; the header's digests are no defence, anyone can
recompute them) is refused with ``CheckpointError`` before anything in it runs.

Format versions: 2 is the above. 1 held numpy arrays (numpy's RNG state, LA's memory bank);
it is still read, with ``weights_only=True`` and numpy's array and number reconstruction allowed besides (no
other callable), and its arrays come back as tensors, as version 2 holds them.

Payload keys every trainer writes (see ``train.common.Run.save``):
  name          the model name ("mpnn", "ae-conv", "ae-vgg16bn", "la", "siamese")
  encoder       {"arch", "kwargs", "state_dict", "dim", "preprocess"}: enough to rebuild the encoder alone
  model         state dict of the whole trained module (decoders, heads included)
  optimizer     optimizer state dict
  config        the trainer's config as a dict
  epoch, step   progress counters (epoch = number of finished epochs)
  complete      True when the run did all its configured training (epochs, levels), none of it cut short by
                --max-steps or stopped by a signal; absent in version 1 (see ``run_progress``)
  progress      what was trained, in words ("3 of 60 epochs, 5 of 7 steps into epoch 4")
  extra         trainer-specific state (memory bank, level index, the position within an epoch, ...)
  torch_rng, numpy_rng, python_rng   the global random states (numpy's: its get_state tuple, key as a tensor)
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from engine.errors import LookalikeError
from engine.fileio import atomic_write, read_framed, write_framed

MAGIC = b"LOOKALIKE-CHECKPOINT "
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Version 1 payloads hold numpy arrays and numbers: what torch's weights-only unpickler must be allowed to build
# for them (array and number reconstruction, numeric dtypes; nothing that calls other code).
_V1_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype,
                     *sorted({type(np.dtype(c)) for c in "?bBhHiIlLqQefd"}, key=str)]


class CheckpointError(LookalikeError):
    """A checkpoint is missing, damaged, from another format version, or holds what a checkpoint never holds."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one, never half."""
    atomic_write(path, data)


def to_plain(obj, where: str = "payload"):
    """``obj`` with numpy arrays as tensors, numpy numbers as Python numbers and paths as str: what
    ``torch.load(weights_only=True)`` reads back. Raises ``TypeError`` naming the entry for anything else."""
    import torch  # here, not at the top: the trainers' --help reads this module without loading torch

    if isinstance(obj, np.generic):  # before float: numpy.float64 is a float, pickled as a numpy scalar
        return obj.item()
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, (torch.Tensor, torch.dtype,
                                                                                torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(obj))
        except TypeError:
            raise TypeError(f"{where}: a numpy array of dtype {obj.dtype} cannot be stored in a checkpoint") from None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        out = {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
        for k in out:
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} ({type(k).__name__}) cannot be stored in a checkpoint")
        return OrderedDict(out) if isinstance(obj, OrderedDict) else out
    if isinstance(obj, torch.Size):
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a checkpoint "
                    f"(tensors, numpy arrays and plain Python values only)")


def save_checkpoint(path, payload: dict) -> str:
    """Save ``payload`` (through ``to_plain``) atomically; returns the payload's sha256 (hex)."""
    import torch

    buf = io.BytesIO()
    torch.save(to_plain(payload), buf)
    return write_framed(path, MAGIC, {"version": CHECKPOINT_VERSION}, buf.getvalue())


def _version(path: Path):
    with open(path, "rb") as f:
        line = f.readline(4096)
    try:
        return json.loads(line[len(MAGIC):]).get("version") if line.startswith(MAGIC) else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None  # read_framed says what is wrong


def read_header(path) -> tuple[dict, bytes]:
    path = Path(path)
    if not path.is_file():
        why = " (it is a folder)" if path.is_dir() else ""
        raise CheckpointError(f"no checkpoint at {path}{why} (expected a file written by a lookalike trainer)")
    version = _version(path)
    return read_framed(path, MAGIC, version if version in READABLE_VERSIONS else CHECKPOINT_VERSION,
                       what="checkpoint", error=CheckpointError,
                       version_hint=". Re-train, or use the lookalike version that wrote it.")


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and verify a checkpoint; raises CheckpointError with the path on any problem, and before running
    anything for a payload that holds more than tensors and plain values."""
    import torch

    header, body = read_header(path)
    allowed = _V1_NUMPY_GLOBALS if header.get("version") == 1 else []
    try:
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(e))
        if found:
            raise CheckpointError(
                f"{path} holds objects that a lookalike checkpoint never holds ({found.group(1) or found.group(2)}); "
                f"refused without loading it, since unpickling them could run code. A trainer writes only tensors "
                f"and plain values: re-train, or use a checkpoint from a source you trust") from None
        detail = next((ln.strip() for ln in reversed(str(e).split("\n\n")[:-1]) if ln.strip()), "")[:200]
        raise CheckpointError(f"{path}: its payload cannot be read as tensors and plain values ({detail}); refused "
                              f"without running anything in it") from None
    except Exception as e:  # noqa: BLE001  (a payload that passed its checksum yet is not a torch file)
        raise CheckpointError(f"{path}: its payload is not a readable torch file ({type(e).__name__}: "
                              f"{str(e).strip()[:200]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict payload, got {type(payload).__name__}")
    if header.get("version") == 1:
        payload = to_plain(payload)  # its numpy arrays as tensors, as version 2 holds them
    payload["_sha256"] = header["sha256"]
    payload["_path"] = str(path)
    return payload


def checkpoint_sha256(path) -> str:
    return read_header(path)[0]["sha256"]


def run_progress(payload: dict) -> tuple[bool, str]:
    """(complete, progress in words) of a loaded checkpoint. Version 1 checkpoints did not record it: they count
    as complete when every configured epoch (mpnn: level) was trained and no --max-steps was given."""
    if "complete" in payload:
        return bool(payload["complete"]), str(payload.get("progress", ""))
    config, extra = payload.get("config") or {}, payload.get("extra") or {}
    max_steps = config.get("max_steps")
    if payload.get("name") == "mpnn":
        done, total = int(extra.get("level", 0)), int(config.get("levels", 0))
        words = f"{done} of {total} levels"
        return done >= total, words
    done, total = int(payload.get("epoch", 0)), int(config.get("epochs", 0))
    words = f"{done} of {total} epochs" + (f", each at most --max-steps {max_steps} steps" if max_steps else "")
    return done >= total and max_steps is None, words
