"""A damaged copy of a real video for the readers' tests: the container's index is whole, the frames are not."""

from __future__ import annotations

from pathlib import Path

import cv2


def damaged_copy(src: Path, dst: Path, keep: float = 0.2) -> Path:
    """``src`` with its coded frames zeroed after the first ``keep`` of them: the container (its index, which
    lists every frame, comes after the frames in these files) is intact, the decoder runs dry early."""
    data = bytearray(Path(src).read_bytes())
    i = 0
    while i < len(data):  # the file's top-level boxes: size (4 bytes, big-endian), type (4 bytes), payload
        size, kind = int.from_bytes(data[i : i + 4], "big"), bytes(data[i + 4 : i + 8])
        if kind == b"mdat":
            cut = i + 8 + int((size - 8) * keep)
            data[cut : i + size] = bytes(i + size - cut)
            break
        i += size
    else:
        raise AssertionError(f"no mdat box in {src}")
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def decodable(path: Path) -> tuple[int, int]:
    """(frames the container lists, frames OpenCV decodes), read with OpenCV directly (the oracle)."""
    cap = cv2.VideoCapture(str(path))
    listed, n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return listed, n
