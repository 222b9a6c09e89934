"""Files that survive a crash mid-save, and files that prove they are whole when read back.

- ``atomic_write(path, *chunks)``: the bytes go to a temporary file in the same folder, are flushed and
  fsynced, and the temporary file is renamed over ``path`` (``os.replace``), so a reader sees the previous
  file or the new one, never a half-written one; on any error the temporary file is removed and the
  previous file is left as it was. The file reads like any other (mode 0644, not mkstemp's 0600).
  A process killed mid-save cannot remove its temporary file, so each save first removes the stale
  temporaries of the same target: names ``.{name}.XXXXXXXX.tmp`` exactly as made here, last modified before
  this process started (``STARTED``, less a margin for coarse file times), and not locked. The writer holds
  an exclusive ``flock`` on its temporary file until the rename, so the save of another live process, however
  long it has run, is never disturbed; the kernel drops the lock of a killed one. Other files are never touched.
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
import re
import stat
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are told by their age alone
    fcntl = None

STARTED = time.time()  # this process's start, as near as this module knows (no save of it can be older)
STALE_MARGIN_S = 2.0  # file times may lag the clock (coarse timestamps, network file systems)
_TEMP_TAIL = re.compile(r"[a-z0-9_]{8}\.tmp")  # mkstemp's 8 random characters, then our suffix


def atomic_write(path, *chunks, mode: int = 0o644) -> None:
    """Write the bytes-like ``chunks``, in order, to ``path`` atomically (see the module notes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)  # a live save: other processes' cleanups leave it alone
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, mode)
            if fcntl is not None:
                os.replace(tmp, path)  # still locked, so never seen unlocked under its temporary name
        if fcntl is None:
            os.replace(tmp, path)  # Windows cannot rename an open file
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _remove_stale_temporaries(path) -> None:
    """Remove the temporary files that saves of ``path`` killed mid-write left beside it.

    Only names ``.{path.name}.XXXXXXXX.tmp`` (as ``atomic_write`` makes them), last modified more than
    ``STALE_MARGIN_S`` before ``STARTED`` (so none of this process's saves, nor of any process started after
    it), and not locked by a live writer. Files that vanish or cannot be removed meanwhile are left alone.
    """
    prefix = f".{path.name}."
    before = STARTED - STALE_MARGIN_S
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and _TEMP_TAIL.fullmatch(entry.name, len(prefix))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_mtime >= before:
                continue
            if fcntl is None:
                os.unlink(entry.path)
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live save holds it
                os.unlink(entry.path)  # under the lock: its writer, if any, is gone
            finally:
                os.close(fd)
        except OSError:  # vanished, locked, or not ours to remove
            continue


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
