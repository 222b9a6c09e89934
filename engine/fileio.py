"""Files that survive a crash mid-save, and files that prove they are whole when read back.

- ``atomic_write(path, *chunks)``: the bytes go to a temporary file in the same folder, are flushed and
  fsynced, and the temporary file is renamed over ``path`` (``os.replace``), so a reader sees the previous
  file or the new one, never a half-written one; on any error the temporary file is removed and the
  previous file is left as it was. The file reads like any other (mode 0644, not mkstemp's 0600).
- ``unwritable(folder)``: why files cannot be written there (None when they can), checked before long work.
- ``write_framed`` / ``read_framed``: the layout the memory bank and the training checkpoints share, one
  line ``MAGIC {json header}\\n`` then the payload; the header carries ``version``, ``nbytes``, the payload's
  ``sha256`` and ``header_sha256`` (of the header's other fields, canonical JSON), and reading refuses (with the
  caller's error class, naming the path) a file that does not start with the magic, a damaged header, another
  version, a truncated payload, or a header or payload whose digest differs. (Files written before
  ``header_sha256`` existed have only the payload's digest; ``read_framed`` checks the header's digest where
  there is one, and a caller whose header carries meaning requires it with ``header_digest=True``.)

Imports nothing else of the project, and no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, *chunks, mode: int = 0o644) -> None:
    """Write the bytes-like ``chunks``, in order, to ``path`` atomically (see the module notes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _header_digest(header: dict) -> str:
    fields = {k: v for k, v in header.items() if k not in ("sha256", "header_sha256")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def unwritable(folder) -> str | None:
    """Why files cannot be written into ``folder`` (to be created as needed), or None when they can: the folder,
    or its nearest existing parent while it is still to be made, must be a writable folder. Creates nothing.
    (Checked before long work so that it fails first; ``atomic_write`` still reports what this cannot foresee.)"""
    probe = Path(folder).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} exists and is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def write_framed(path, magic: bytes, header: dict, body: bytes) -> str:
    """``magic {header + nbytes + sha256 + header_sha256}\\n body``, written atomically; returns the payload's
    sha256 (hex)."""
    digest = hashlib.sha256(body).hexdigest()
    full = {**header, "nbytes": len(body), "sha256": digest}
    full["header_sha256"] = _header_digest(full)
    atomic_write(path, magic + json.dumps(full).encode() + b"\n", body)
    return digest


def read_framed(path, magic: bytes, version: int, *, what: str, error: type[Exception],
                version_hint: str = "", header_digest: bool = False) -> tuple[dict, bytes]:
    """(header, payload) of a file written by ``write_framed`` with this ``magic`` and ``version``.

    ``what`` names the kind of file in messages ("memory-bank", "checkpoint"); ``error`` is the exception
    class raised; ``version_hint`` is appended to the other-version message; ``header_digest`` refuses a file
    without ``header_sha256``. The caller checks that the file exists (with its own message).
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.startswith(magic):
        raise error(f"{path} is not a lookalike {what} file (it does not start with {magic!r})")
    nl = raw.find(b"\n")
    try:
        header = json.loads(raw[len(magic) : nl])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: damaged {what} header ({e})") from None
    if header.get("version") != version:
        raise error(f"{path} is {what} format version {header.get('version')!r}; this lookalike reads version "
                    f"{version}{version_hint}")
    if "header_sha256" in header or header_digest:
        if header.get("header_sha256") != _header_digest(header):
            raise error(f"{path} is damaged: its header ({what} metadata) does not match the header's sha256")
    body = raw[nl + 1 :]
    if len(body) != header.get("nbytes"):
        raise error(f"{path} is truncated or damaged: header says {header.get('nbytes')} payload bytes, "
                    f"found {len(body)}")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise error(f"{path} is damaged: the payload's sha256 does not match the header")
    return header, body
