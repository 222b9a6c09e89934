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
  version, a truncated payload, or a header or payload whose digest differs. It reads the magic and the header
  first and compares the payload size the header gives with the file's size (``fstat``) before reading the
  payload, so ``/dev/zero`` or a huge sparse file is refused at once, and it never reads more than the header
  promises (``read_payload``, shared with the index file). (Files written before
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
MAX_HEADER = 1 << 20  # a header line (framed file, index) longer than this is not ours
_READ_CHUNK = 1 << 20  # payloads of files that are not regular files are read this much at a time
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


def read_payload(f, nbytes: int, complain) -> bytes:
    """The rest of the open binary file ``f``, which must be exactly ``nbytes`` long (the header's promise).

    A regular file's remaining size is compared first (``fstat``), so a wrong one is refused without reading
    it; anything else (a pipe, a device) is read in chunks, never more than ``nbytes + 1`` bytes. When the
    rest is not ``nbytes`` long, raises ``complain(found)``, ``found`` saying how long it is ("12", or for a
    stream that goes on, "more than 8").
    """
    st = os.fstat(f.fileno())
    if stat.S_ISREG(st.st_mode):
        left = st.st_size - f.tell()
        if left != nbytes:
            raise complain(str(left))
        body = f.read(nbytes)
    else:
        parts, got = [], 0
        while got <= nbytes:
            part = f.read(min(_READ_CHUNK, nbytes + 1 - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        body = b"".join(parts)
    if len(body) != nbytes:  # a stream, or a file that changed size meanwhile
        raise complain(f"more than {nbytes}" if len(body) > nbytes else str(len(body)))
    return body


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
    try:
        with open(path, "rb") as f:
            if f.read(len(magic)) != magic:
                raise error(f"{path} is not a lookalike {what} file (it does not start with {magic!r})")
            line = f.readline(MAX_HEADER + 1)
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("the file ends inside the header line" if len(line) <= MAX_HEADER
                                     else f"the header line does not end within {MAX_HEADER} bytes")
                header = json.loads(line)
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
            except (ValueError, UnicodeDecodeError) as e:
                raise error(f"{path}: damaged {what} header ({e})") from None
            if header.get("version") != version:
                raise error(f"{path} is {what} format version {header.get('version')!r}; this lookalike reads "
                            f"version {version}{version_hint}")
            if "header_sha256" in header or header_digest:
                if header.get("header_sha256") != _header_digest(header):
                    raise error(f"{path} is damaged: its header ({what} metadata) does not match the header's "
                                f"sha256")
            nbytes = header.get("nbytes")
            if type(nbytes) is not int or nbytes < 0:
                raise error(f"{path}: damaged {what} header (nbytes must be a byte count, got {nbytes!r})")
            body = read_payload(f, nbytes, lambda found: error(
                f"{path} is truncated or damaged: header says {nbytes} payload bytes, found {found}"))
    except error:
        raise
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}") from e
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise error(f"{path} is damaged: the payload's sha256 does not match the header")
    return header, body
