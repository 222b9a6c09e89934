"""engine.fileio: atomic writes keep the previous file whole; framed files refuse every kind of damage."""

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from engine.fileio import atomic_write, read_framed, unwritable, write_framed

MAGIC = b"LOOKALIKE-TEST "


class Boom(Exception):
    pass


def test_atomic_write_replaces_the_file_and_reads_like_any_other(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, b"old")
    atomic_write(path, b"ne", memoryview(b"w!"))
    assert path.read_bytes() == b"new!"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]  # no temporary file left


def test_a_crash_mid_write_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"previous contents")

    class Exploding:  # a chunk whose write fails after the first chunk went out
        def __buffer__(self, flags):
            raise Boom("disk on fire")

    with pytest.raises((Boom, TypeError)):
        atomic_write(path, b"half of the new", Exploding())
    assert path.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_framed_round_trip_and_the_header_it_writes(tmp_path):
    path = tmp_path / "x.framed"
    digest = write_framed(path, MAGIC, {"version": 3, "note": "hi"}, b"\x00payload\n")
    raw = path.read_bytes()
    header = json.loads(raw[len(MAGIC) : raw.index(b"\n")])
    fields = {"version": 3, "note": "hi", "nbytes": 9, "sha256": hashlib.sha256(b"\x00payload\n").hexdigest()}
    canonical = json.dumps({k: v for k, v in fields.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    assert header == {**fields, "header_sha256": hashlib.sha256(canonical.encode()).hexdigest()}
    assert digest == header["sha256"]
    got_header, body = read_framed(path, MAGIC, 3, what="test", error=ValueError)
    assert got_header == header and body == b"\x00payload\n"


@pytest.mark.parametrize("damage, message", [
    (lambda raw, nl: b"PK\x03\x04" + raw[4:], r"is not a lookalike test file \(it does not start with"),
    (lambda raw, nl: MAGIC + b"{oops" + raw[nl:], "damaged test header"),
    (lambda raw, nl: MAGIC + b"[1, 2]" + raw[nl:], r"damaged test header \(header is not a JSON object\)"),
    (lambda raw, nl: raw[:-2], "is truncated or damaged: header says 8 payload bytes, found 6"),
    (lambda raw, nl: raw[:-1] + b"X", "is damaged: the payload's sha256 does not match the header"),
    (lambda raw, nl: raw.replace(b'"nbytes": 8', b'"nbytes": 8, "extra": 1'),
     r"is damaged: its header \(test metadata\) does not match the header's sha256"),
    (lambda raw, nl: raw[:nl], r"damaged test header \(the file ends inside the header line\)"),
    (lambda raw, nl: MAGIC + b" " * (2 << 20) + raw[len(MAGIC) :],
     r"damaged test header \(the header line does not end within 1048576 bytes\)"),
])
def test_read_framed_refuses_damage_naming_the_path(tmp_path, damage, message):
    path = tmp_path / "x.framed"
    write_framed(path, MAGIC, {"version": 1}, b"12345678")
    raw = path.read_bytes()
    path.write_bytes(damage(raw, raw.index(b"\n")))
    with pytest.raises(KeyError, match=message) as e:
        read_framed(path, MAGIC, 1, what="test", error=KeyError)
    assert str(path) in str(e.value)


def test_a_file_without_the_header_digest_reads_unless_the_caller_requires_it(tmp_path):
    """Files written before header_sha256 existed (training checkpoints) still read; a caller whose header
    carries meaning (the memory bank) refuses them."""
    path = tmp_path / "x.framed"
    body = b"12345678"
    header = {"version": 1, "nbytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + body)
    assert read_framed(path, MAGIC, 1, what="test", error=ValueError) == (header, body)
    with pytest.raises(ValueError, match=r"its header \(test metadata\) does not match the header's sha256"):
        read_framed(path, MAGIC, 1, what="test", error=ValueError, header_digest=True)


def framed_bytes(fields: dict, body: bytes) -> bytes:
    """A framed file with both digests correct, computed as the module documents them."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    header = {**fields, "sha256": hashlib.sha256(body).hexdigest(),
              "header_sha256": hashlib.sha256(canonical).hexdigest()}
    return MAGIC + json.dumps(header).encode() + b"\n" + body


@pytest.mark.parametrize("nbytes", ["8", 8.0, -8, None, True])
def test_a_payload_size_that_is_not_a_byte_count_is_refused(tmp_path, nbytes):
    path = tmp_path / "x.framed"
    path.write_bytes(framed_bytes({"version": 1, "nbytes": nbytes}, b"12345678"))
    with pytest.raises(ValueError, match=rf"{path}: damaged test header \(nbytes must be a byte count, got "
                                         rf"{re.escape(repr(nbytes))}\)"):
        read_framed(path, MAGIC, 1, what="test", error=ValueError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
@pytest.mark.parametrize("extra, message", [(b"", None), (b"and more", "found more than 8"), (None, "found 5")])
def test_read_framed_from_a_pipe_reads_no_more_than_the_header_promises(tmp_path, extra, message):
    """A pipe has no size to check first: the payload is read up to one byte past the promise."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    body = b"12345678"
    data = framed_bytes({"version": 1, "nbytes": 8}, body)
    data = data[:-3] if extra is None else data + extra

    def feed():
        with open(path, "wb") as f:
            try:
                f.write(data)
            except BrokenPipeError:  # the reader stopped early, as it should
                pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        if message is None:
            assert read_framed(path, MAGIC, 1, what="test", error=ValueError)[1] == body
        else:
            with pytest.raises(ValueError, match=rf"{path} is truncated or damaged: header says 8 payload bytes, "
                                                 rf"{message}$"):
                read_framed(path, MAGIC, 1, what="test", error=ValueError)
    finally:
        writer.join(timeout=60)


def test_read_framed_refuses_another_version_with_the_hint(tmp_path):
    path = tmp_path / "x.framed"
    write_framed(path, MAGIC, {"version": 2}, b"abc")
    with pytest.raises(ValueError, match=r"is test format version 2; this lookalike reads version 1\. Re-train"):
        read_framed(path, MAGIC, 1, what="test", error=ValueError, version_hint=". Re-train")


def test_unwritable_names_the_file_in_the_way_and_creates_nothing(tmp_path):
    assert unwritable(tmp_path) is None
    assert unwritable(tmp_path / "new" / "deeper") is None  # can be made
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("a file")
    assert unwritable(tmp_path / "f") == f"{tmp_path / 'f'} exists and is not a folder"
    assert unwritable(tmp_path / "f" / "sub" / "x") == f"{tmp_path / 'f'} exists and is not a folder"


# -- temporaries of interrupted saves ---------------------------------------------------------------

LONG_AGO = 1_000_000_000  # 2001: before any process that runs these tests started

# A child process that saves ``path`` (argv[1]) but stops inside the save, its temporary file written and
# not yet renamed: it prints "saving" and waits for a line on stdin before finishing the save.
HELD_SAVE = r"""
import os, sys
from engine.fileio import atomic_write
real_fsync = os.fsync
def held_fsync(fd):
    print("saving", flush=True)
    sys.stdin.readline()
    real_fsync(fd)
os.fsync = held_fsync
atomic_write(sys.argv[1], b"from the held save")
print("saved", flush=True)
"""

SAVE = "import sys; from engine.fileio import atomic_write; atomic_write(sys.argv[1], b'from a new process')"


def child(code, *args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, text=True, **kwargs)


def temporaries(folder, name):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def test_a_save_removes_its_targets_stale_temporaries_and_nothing_else(tmp_path):
    """Stale: named as atomic_write names the target's temporaries, last written before this process began.
    A fresh one (a save of this process or of a newer one), another target's, and lookalikes stay."""
    path = tmp_path / "index.lkx"
    stale = [".index.lkx.a1b2c3d4.tmp", ".index.lkx.zz_9zz9z.tmp"]
    kept_old = [".other.lkx.a1b2c3d4.tmp", "index.lkx.a1b2c3d4.tmp", ".index.lkx.a1b2.tmp",
                ".index.lkx.A1B2C3D4.tmp", ".index.lkx.a1b2c3d4.tmp.bak", ".index.lkx.a1b2c3d4.tmpx", "notes.txt"]
    fresh = [".index.lkx.new12345.tmp"]
    for name in stale + kept_old + fresh:
        (tmp_path / name).write_bytes(b"x" * 10)
    for name in stale + kept_old:
        os.utime(tmp_path / name, (LONG_AGO, LONG_AGO))
    (tmp_path / ".index.lkx.dir12345.tmp").mkdir()  # a folder by that name is not a temporary file
    os.utime(tmp_path / ".index.lkx.dir12345.tmp", (LONG_AGO, LONG_AGO))
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        kept_old + fresh + ["index.lkx", ".index.lkx.dir12345.tmp"])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_the_temporary_of_a_killed_save_is_removed_by_the_next_process_that_saves(tmp_path):
    path = tmp_path / "index.lkx"
    atomic_write(path, b"before")
    held = child(HELD_SAVE, path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert held.stdout.readline().strip() == "saving"
    held.send_signal(signal.SIGKILL)  # kill -9 mid-save: nothing of it can clean up
    held.wait(timeout=60)
    left = temporaries(tmp_path, "index.lkx")
    assert len(left) == 1 and (tmp_path / left[0]).read_bytes() == b"from the held save"
    assert path.read_bytes() == b"before"
    atomic_write(path, b"this process")  # this process started before the killed save: not stale for it
    assert temporaries(tmp_path, "index.lkx") == left
    # A save later than the margin for coarse file times (2 s) finds it older than its own start: the file's
    # time is set back instead of waiting.
    os.utime(tmp_path / left[0], (time.time() - 60, time.time() - 60))
    assert child(SAVE, path).wait(timeout=120) == 0
    assert temporaries(tmp_path, "index.lkx") == []
    assert path.read_bytes() == b"from a new process"


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_the_temporary_of_a_live_save_of_another_process_is_left_alone_however_old(tmp_path):
    """A process that began saving long before the cleaning one started holds a lock on its temporary file:
    the cleaning save leaves it, and the held save then completes."""
    path = tmp_path / "index.lkx"
    held = child(HELD_SAVE, path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert held.stdout.readline().strip() == "saving"
        (live,) = temporaries(tmp_path, "index.lkx")
        os.utime(tmp_path / live, (LONG_AGO, LONG_AGO))  # as old as a save can look
        assert child(SAVE, path).wait(timeout=120) == 0
        assert temporaries(tmp_path, "index.lkx") == [live]
        assert path.read_bytes() == b"from a new process"
        held.stdin.write("go on\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "saved"
    finally:
        held.kill()
        held.wait(timeout=60)
    assert temporaries(tmp_path, "index.lkx") == []
    assert path.read_bytes() == b"from the held save"
