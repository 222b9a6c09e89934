"""``--split``: one video file per shot, ``<stem>-Scene-001.mp4`` ... (PySceneDetect's ``split-video`` names),
cut with the ffmpeg binary that the ``imageio-ffmpeg`` package ships.

Each file holds exactly the shot's frames, first to last (the frames of a dissolve or fade belong to no shot
and to no file). How a shot is cut:

- **stream copy** (no re-encoding: the source's own compressed frames, bit for bit) when that gives exactly
  the shot's frames. ffmpeg lists the video's packets (``-c copy -f framecrc``: decode order, timestamps,
  key-frame flags); a shot is copied when the source is an MP4 / MOV file whose packets are one per frame, the
  shot's first frame is a key frame preceded by exactly the packets of the frames before it, and the packets
  from there to the next key frame after the shot (or the end of the file) are exactly the shot's frames, so
  no frame the shot needs is coded outside it and no frame of another shot inside it. Encoders put key frames
  at hard cuts, so cut-to-cut shots are usually copied. The copied shots are cut in one ffmpeg run
  (the ``segment`` muxer, split at those frame numbers).
- **re-encoding** otherwise (H.264, ``-crf 16``, audio AAC): ffmpeg seeks to the shot (``-ss`` before the input
  decodes from the key frame before and drops the frames before the shot's first) and stops after the shot's
  frame count (``-frames:v``): frame-accurate.

Audio, where there is some, follows the video's cut points. Files are written under temporary names and renamed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from engine.errors import InputError, LookalikeError
from engine.stream.events import Shot

COPY_CONTAINERS = (".mp4", ".m4v", ".mov")  # what is copied into .mp4 as it is
MAX_PACKET_LISTING = 1 << 30  # bytes of ffmpeg's packet listing read at most (some 10^7 packets)


class SplitError(LookalikeError, OSError):
    """ffmpeg failed to cut a shot, or is not installed."""


def ffmpeg_exe() -> str:
    """The ffmpeg binary of the ``imageio-ffmpeg`` package (``SplitError`` naming the package when absent)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise SplitError("--split needs ffmpeg from the imageio-ffmpeg package, which is not installed "
                         "(pip install imageio-ffmpeg)") from None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        raise SplitError(f"--split needs ffmpeg: imageio-ffmpeg found none ({e})") from None


def split_names(stem: str, n_shots: int) -> list[str]:
    """PySceneDetect's ``$VIDEO_NAME-Scene-$SCENE_NUMBER.mp4`` (scene numbers of at least 3 digits)."""
    digits = max(3, len(str(max(1, n_shots))))
    return [f"{stem}-Scene-{k:0{digits}d}.mp4" for k in range(1, n_shots + 1)]


@dataclass(frozen=True)
class Packets:
    """The video stream's packets as ffmpeg lists them."""

    display: list[int]  # in decode order: each packet's frame index (its rank by presentation time)
    key: list[bool]  # by frame index: a key frame
    seconds: list[float]  # by frame index: presentation time from the first frame's


_LINE = re.compile(r"^\s*0,\s*(-?\d+),\s*(-?\d+),\s*(-?\d+),\s*(\d+),\s*0x[0-9a-fA-F]+(?:,\s*F=0x([0-9a-fA-F]+))?")


def packets(exe: str, source: str) -> Packets | None:
    """The packets of ``source``'s first video stream, or None where ffmpeg cannot list them."""
    proc = subprocess.Popen([exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", source, "-map", "0:v:0",
                             "-c", "copy", "-f", "framecrc", "-"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    tb = None
    rows = []  # (pts, key) in decode order
    seen = 0
    try:
        for raw in proc.stdout:  # parsed as it comes: memory holds two numbers per packet
            seen += len(raw)
            if seen > MAX_PACKET_LISTING:
                return None
            line = raw.decode("ascii", "replace")
            if line.startswith("#tb 0:"):
                num, _, den = line.split(":", 1)[1].strip().partition("/")
                tb = Fraction(int(num), int(den or 1))
                continue
            m = _LINE.match(line)
            if m:
                flags = m.group(5)
                rows.append((int(m.group(2)), flags is None or bool(int(flags, 16) & 1)))
    except (ValueError, ZeroDivisionError):  # a listing not as expected: no stream copy
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        proc.stdout.close()
    if rc != 0 or tb is None or not rows or len({p for p, _ in rows}) != len(rows):
        return None
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    display = [0] * len(rows)
    for rank, i in enumerate(order):
        display[i] = rank
    first = rows[order[0]][0]
    return Packets(display=display, key=[rows[i][1] for i in order],
                   seconds=[float((rows[i][0] - first) * tb) for i in order])


def copyable(shot: Shot, pk: Packets) -> bool:
    """Whether copying packets gives exactly the frames of ``shot`` (see the module notes)."""
    n = len(pk.display)
    s, stop = shot.start, shot.end + 1
    if not (0 <= s < stop <= n) or not pk.key[s] or (stop < n and not pk.key[stop]):
        return False
    pos = {d: i for i, d in enumerate(pk.display)}  # frame -> decode position
    p0 = pos[s]
    p1 = pos[stop] if stop < n else n
    return p0 == s and p1 == stop and sorted(pk.display[p0:p1]) == list(range(s, stop))


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          check=False)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit status {proc.returncode}"
        raise SplitError(f"ffmpeg failed {what}: {tail}")


def split(source: str, shots: list[Shot], out: Path, stem: str, *, fps: float | None, frame_count: int | None,
          progress: Callable[[int], None] | None = None) -> list[dict]:
    """Write one file per shot into ``out``; what was written: ``{shot, file, frames, mode: copy|encode}``."""
    exe = ffmpeg_exe()
    names = split_names(stem, len(shots))
    pk = packets(exe, source)
    if pk is not None and frame_count is not None and len(pk.display) != frame_count:
        pk = None  # packets and frames do not pair up: frame indices cannot be trusted to name packets
    copy = [pk is not None and Path(source).suffix.lower() in COPY_CONTAINERS and copyable(sh, pk) for sh in shots]
    written = []
    if any(copy):
        bounds = sorted({b for sh, c in zip(shots, copy) if c for b in (sh.start, sh.end + 1)} - {0, len(pk.display)})
        starts = [0, *bounds]  # segment k starts at frame starts[k]
        tmp = Path(tempfile.mkdtemp(prefix=".split-", dir=out))
        try:
            cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", source, "-map", "0:v:0",
                   "-map", "0:a?", "-c", "copy", "-f", "segment", "-segment_format", "mp4", "-reset_timestamps", "1"]
            if bounds:
                cmd += ["-segment_frames", ",".join(map(str, bounds))]
            else:
                cmd += ["-segment_time", str(10 ** 9)]
            _run(cmd + [str(tmp / "%06d.mp4")], f"copying the shots of {source}")
            for sh, c, name in zip(shots, copy, names):
                if c:
                    seg = tmp / f"{starts.index(sh.start):06d}.mp4"
                    if not seg.is_file():
                        raise SplitError(f"ffmpeg wrote no segment for shot {sh.index} (frames {sh.start}-{sh.end})")
                    os.replace(seg, out / name)
                    written.append({"shot": sh.index, "file": name, "frames": sh.end - sh.start + 1, "mode": "copy"})
                    if progress is not None:
                        progress(1)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for sh, c, name in zip(shots, copy, names):
        if c:
            continue
        n = sh.end - sh.start + 1
        if pk is not None:
            t0 = 0.0 if sh.start == 0 else (pk.seconds[sh.start - 1] + pk.seconds[sh.start]) / 2
        elif fps:
            t0 = max(0.0, (sh.start - 0.5) / fps)
        else:
            raise InputError(f"cannot cut {source}: its frame rate is unknown and ffmpeg lists no timestamps")
        duration = (n + 0.5) / fps if fps else None  # for the audio; -frames:v cuts the video exactly
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
            if t0 > 0:
                cmd += ["-ss", f"{t0:.6f}"]
            cmd += ["-i", source, "-map", "0:v:0", "-map", "0:a?", "-frames:v", str(n)]
            if duration:
                cmd += ["-t", f"{duration:.6f}"]
            cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "16", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    "-f", "mp4", tmp_name]
            _run(cmd, f"re-encoding shot {sh.index} (frames {sh.start}-{sh.end}) of {source}")
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, out / name)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        written.append({"shot": sh.index, "file": name, "frames": n, "mode": "encode"})
        if progress is not None:
            progress(1)
    written.sort(key=lambda w: w["shot"])
    return written
