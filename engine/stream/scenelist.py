"""The shots as PySceneDetect's ``list-scenes`` writes them (``<video stem>-Scenes.csv``), and the timecodes the
other outputs share.

The CSV has PySceneDetect's layout (``scenedetect.output.write_scene_list``, 0.7.2), so that what reads its
scene lists reads ours (``scenedetect -i VIDEO load-scenes -i VIDEO-Scenes.csv`` does): a first row
``Timecode List:`` followed by the start timecode of every shot after the first, then the header row and one row
per shot with PySceneDetect's ten columns, in its conventions:

- ``Start Frame`` is 1-based (the shot's first frame + 1); ``End Frame`` is the 0-based index one past the shot's
  last frame, which is also its last frame counted from 1: PySceneDetect's scene ends are exclusive;
- ``End Timecode`` / ``End Time (seconds)`` are the time where the shot stops (its last frame's time plus one
  frame), ``Length (frames)`` = ``End Frame`` - ``Start Frame`` + 1;
- timecodes are ``HH:MM:SS.mmm`` at the video's frame rate (frame / fps, rounded to the millisecond).

lookalike's own shots (report.json, ``Shot``) give inclusive 0-based ``start`` / ``end``, so a row's ``Start
Frame`` is ``start + 1`` and its ``End Frame`` is ``end + 1``. Frames of a gradual transition belong to neither
shot: there the next row's ``Start Frame`` is more than the previous ``End Frame`` + 1 (PySceneDetect's scenes
always touch). Five columns are appended after PySceneDetect's:

- ``Transition`` how the shot begins: ``cut``, ``dissolve`` or ``fade``; empty for the first shot;
- ``Transition Start Frame`` / ``Transition End Frame`` the transition's first and last frame, 1-based and
  inclusive like ``Start Frame`` (a cut's both equal the shot's ``Start Frame``);
- ``Recurs With Scene`` the ``Scene Number`` of the earlier shot this one shows again, else empty;
- ``Recurrence Score`` the cosine between the two shots' signatures, else empty.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from engine.stream.events import Shot, Transition

PYSCENEDETECT_COLUMNS = ("Scene Number", "Start Frame", "Start Timecode", "Start Time (seconds)", "End Frame",
                         "End Timecode", "End Time (seconds)", "Length (frames)", "Length (timecode)",
                         "Length (seconds)")
EXTRA_COLUMNS = ("Transition", "Transition Start Frame", "Transition End Frame", "Recurs With Scene",
                 "Recurrence Score")
COLUMNS = PYSCENEDETECT_COLUMNS + EXTRA_COLUMNS


def timecode(seconds: float | None) -> str:
    """``HH:MM:SS.mmm`` as PySceneDetect writes it (rounded to the millisecond); empty for an unknown time."""
    if seconds is None:
        return ""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def transition_name(tr: Transition) -> str:
    """``cut``, ``dissolve``, ``fade``, ``wipe``, ``push`` or ``slide``: a ``Transition``'s kind in plain words."""
    if tr.type == "cut":
        return "cut"
    if tr.move is not None:
        return tr.move
    return "fade" if tr.fade else "dissolve"


@dataclass(frozen=True)
class SceneRow:
    """One shot with what the outputs say about it."""

    number: int  # 1-based, as PySceneDetect numbers scenes
    shot: Shot
    into: Transition | None  # the transition the shot begins with (None for the first shot)

    @property
    def length(self) -> int:
        return self.shot.end - self.shot.start + 1


def scene_rows(shots: list[Shot], transitions: list[Transition]) -> list[SceneRow]:
    """The shots in order, each with the transition it begins with: the one that lies after the previous shot's
    last frame and starts at or before the shot's first frame."""
    rows, prev_end, k = [], -1, 0
    ordered = sorted(transitions, key=lambda t: t.first)
    for n, sh in enumerate(sorted(shots, key=lambda s: s.start)):
        into = None
        while k < len(ordered) and ordered[k].first <= sh.start:
            if ordered[k].first > prev_end:
                into = ordered[k]
            k += 1
        rows.append(SceneRow(n + 1, sh, into))
        prev_end = sh.end
    return rows


def scene_list_csv(shots: list[Shot], transitions: list[Transition], fps: float | None) -> bytes:
    """The scene list CSV (see the module notes) as UTF-8 bytes; ``fps`` None leaves the time columns empty."""
    rows = scene_rows(shots, transitions)
    number_of = {r.shot.index: r.number for r in rows}

    def t(frame: int) -> float | None:
        return None if not fps else frame / fps

    def secs(frame: int) -> str:
        return "" if not fps else f"{frame / fps:.3f}"

    buf = io.StringIO(newline="")
    w = csv.writer(buf, delimiter=",", lineterminator="\n")
    w.writerow(["Timecode List:", *[timecode(t(r.shot.start)) for r in rows[1:]]])
    w.writerow(COLUMNS)
    for r in rows:
        s, stop = r.shot.start, r.shot.end + 1  # stop: exclusive, PySceneDetect's end
        into, again = r.into, r.shot.recurs_with
        w.writerow([
            str(r.number), str(s + 1), timecode(t(s)), secs(s), str(stop), timecode(t(stop)), secs(stop),
            str(stop - s), timecode(t(stop - s)), secs(stop - s),
            "" if into is None else transition_name(into),
            "" if into is None else str(into.first + 1),
            "" if into is None else str(into.last + 1),
            "" if again is None or again not in number_of else str(number_of[again]),
            "" if again is None or r.shot.recurrence_score is None else f"{r.shot.recurrence_score:.3f}",
        ])
    return buf.getvalue().encode("utf-8")


def scene_list_name(stem: str) -> str:
    """PySceneDetect's default name for the scene list of a video named ``stem``: ``$VIDEO_NAME-Scenes.csv``."""
    return f"{stem}-Scenes.csv"
