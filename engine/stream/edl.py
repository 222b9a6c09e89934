"""The shots as a CMX 3600 edit decision list (``<video stem>.edl``), one cut event per shot.

The layout is PySceneDetect's ``save-edl`` (``TITLE:``, ``FCM: NON-DROP FRAME``, then events
``001  AX       V     C        SRC_IN SRC_OUT REC_IN REC_OUT``), with the record timecodes equal to the source's,
so an editor places each shot where it was in the video. Timecodes are ``HH:MM:SS:FF``, non-drop-frame, counted in
whole frames at the video's nominal rate (the frame rate rounded: 30 for 29.97 fps, whose non-drop timecode then
runs 0.1 % behind the clock, as NDF does). As in every EDL, an event's out timecode is exclusive: the frame after
the shot's last. Frames of a gradual transition (dissolve, fade, wipe, push) belong to no shot, so they fall between two
events. Each event is followed by a ``* FROM CLIP NAME:`` comment naming the video, and by a comment saying how
the shot begins and which earlier shot it shows again, if any.
"""

from __future__ import annotations

from engine.errors import InputError
from engine.stream.events import Shot, Transition
from engine.stream.scenelist import scene_rows, transition_name


def nominal_rate(fps: float) -> int:
    """The timecode's frames per second: the frame rate rounded (at least 1)."""
    if not fps or fps <= 0:
        raise InputError(f"an EDL needs the video's frame rate, got {fps!r}")
    return max(1, round(fps))


def smpte(frame: int, rate: int) -> str:
    """Non-drop-frame ``HH:MM:SS:FF`` of ``frame`` (0-based) at ``rate`` timecode frames per second."""
    s, ff = divmod(int(frame), rate)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{s:02d}:{ff:02d}"


def edl_text(shots: list[Shot], transitions: list[Transition], fps: float, *, title: str, clip: str,
             reel: str = "AX") -> bytes:
    """The EDL (see the module notes) as UTF-8 bytes, lines ending in ``\\n``."""
    rate = nominal_rate(fps)
    title = "".join(ch if ch.isprintable() else "_" for ch in title)[:70]
    clip = "".join(ch if ch.isprintable() else "_" for ch in clip)
    created = (f"* CREATED WITH LOOKALIKE (python -m engine.stream): {len(shots)} shots of {clip} at {fps:g} "
               f"frames/s, timecode at {rate} frames/s non-drop-frame, out points exclusive")
    lines = [f"TITLE: {title}", "FCM: NON-DROP FRAME", created, ""]
    rows = scene_rows(shots, transitions)
    number_of = {r.shot.index: r.number for r in rows}
    for r in rows:
        a, b = smpte(r.shot.start, rate), smpte(r.shot.end + 1, rate)
        lines.append(f"{r.number:03d}  {reel:<8} V     C        {a} {b} {a} {b}")
        lines.append(f"* FROM CLIP NAME: {clip}")
        how = "starts the video" if r.into is None else f"begins with a {transition_name(r.into)}"
        again = r.shot.recurs_with
        lines.append(f"* SHOT {r.number}: frames {r.shot.start} to {r.shot.end} (0-based, inclusive), {how}"
                     + ("" if again is None or again not in number_of else f", shows shot {number_of[again]} again"))
    return ("\n".join(lines) + "\n").encode("utf-8")
