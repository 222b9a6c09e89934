"""Pictures of the shots: PySceneDetect's ``save-images`` (``<stem>-Scene-001-01.jpg`` ...) and the thumbnails of
the HTML report, taken from the video file in a second pass after the stream.

Which frames: PySceneDetect's rule (``scenedetect.output.image``), in exact fractions of frames. A shot of L frames
(from ``start``; its exclusive end ``start + L``) is cut into ``num_images`` equal segments; one image per
segment: ``frame_margin`` frames into the first segment, ``frame_margin`` frames before the end of the last one,
the middle of the others; with one image, the middle of the shot (``start + L / 2``). Each point is rounded to
the nearest frame, a half up (PySceneDetect rounds in floating point seconds, so on a half it may take either). Names follow PySceneDetect's default template
``$VIDEO_NAME-Scene-$SCENE_NUMBER-$IMAGE_NUMBER``: the scene number has at least 3 digits, the image number
one more digit than ``num_images`` has.

The second pass decodes the file from its start (``VideoReader``, as the stream did), up to the last frame
wanted, so each picture is exactly the frame its index names (seeking is not frame-accurate in every container).
A camera cannot be read twice: it gets no pictures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.fileio import atomic_write
from engine.stream.events import Shot
from engine.video import VideoReader


def image_frames(shot: Shot, num_images: int, frame_margin: int = 1) -> list[int]:
    """The frames (0-based) of ``shot`` that ``save-images`` saves (see the module notes)."""
    if num_images < 1:
        raise InputError(f"num_images must be a positive int, got {num_images!r}")
    if frame_margin < 0:
        raise InputError(f"frame_margin must be a non-negative int, got {frame_margin!r}")
    start, length = shot.start, shot.end - shot.start + 1
    seg = Fraction(length, num_images)
    out = []
    for j in range(num_images):
        lo, hi = start + j * seg, start + (j + 1) * seg
        if num_images == 1:
            t = start + Fraction(length, 2)
        elif j == 0:
            t = min(lo + frame_margin, hi)
        elif j == num_images - 1:
            t = max(hi - frame_margin, lo)
        else:
            t = (lo + hi) / 2
        out.append(min(shot.end, max(start, math.floor(t + Fraction(1, 2)))))  # the nearest frame (halves: later)
    return out


def image_names(stem: str, n_shots: int, num_images: int, ext: str = "jpg") -> Callable[[int, int], str]:
    """``name(scene_number, image_number)`` (both 1-based) as PySceneDetect names its images."""
    scene_digits = max(3, math.floor(math.log10(max(1, n_shots))) + 1)
    image_digits = math.floor(math.log10(num_images)) + 2
    return lambda scene, image: f"{stem}-Scene-{scene:0{scene_digits}d}-{image:0{image_digits}d}.{ext}"


def jpeg(frame: np.ndarray, *, quality: int = 95, width: int | None = None) -> bytes:
    """``frame`` (uint8 RGB) as JPEG bytes, scaled to ``width`` pixels wide when given (PySceneDetect's quality
    default is 95)."""
    import cv2

    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    if width is not None and width < bgr.shape[1]:
        h = max(1, round(bgr.shape[0] * width / bgr.shape[1]))
        bgr = cv2.resize(bgr, (width, h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise InputError(f"could not encode a frame of shape {frame.shape} as JPEG")
    return buf.tobytes()


def pictures(source: str, shots: list[Shot], out: Path, stem: str, *, save: bool, num_images: int = 3,
             frame_margin: int = 1, thumb_width: int = 320,
             progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict[int, bytes]]:
    """One pass over the video file ``source``: with ``save``, write each shot's images into ``out`` (atomically,
    as its frame goes by); and a small JPEG thumbnail of each shot's middle frame (``thumb_width`` pixels wide).

    Returns (what was written: ``{shot, image, frame, file}`` with ``shot`` the shot's 0-based index and ``image``
    1-based; the thumbnails by shot index). Frames past what the file decodes (a damaged file) get nothing.
    ``progress(frames)`` is called as frames are decoded. Memory: one frame and the thumbnails.
    """
    name = image_names(stem, len(shots), num_images)
    jobs: dict[int, list[tuple]] = {}  # frame -> what to make of it
    for n, sh in enumerate(shots, start=1):
        jobs.setdefault(image_frames(sh, 1)[0], []).append(("thumb", sh.index))
        if save:
            for j, f in enumerate(image_frames(sh, num_images, frame_margin), start=1):
                jobs.setdefault(f, []).append(("image", sh.index, j, name(n, j)))
    written, thumbs = [], {}
    if not jobs:
        return written, thumbs
    last = max(jobs)
    with VideoReader(source, threads=1) as video:
        for i, frame in enumerate(video.frames(last + 1)):
            for job in jobs.get(i, ()):
                if job[0] == "thumb":
                    thumbs[job[1]] = jpeg(frame, quality=85, width=thumb_width)
                else:
                    atomic_write(out / job[3], jpeg(frame))
                    written.append({"shot": job[1], "image": job[2], "frame": i, "file": job[3]})
            if progress is not None:
                progress(1)
    written.sort(key=lambda w: (w["shot"], w["image"]))
    return written, thumbs
