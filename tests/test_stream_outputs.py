"""What ``python -m engine.stream VIDEO --out D`` writes for people: the scene list CSV (read back by PySceneDetect
and compared with its own detection), the EDL (read back by a small parser of this file), the saved images and
the split videos (compared with the video's frames, decoded here with OpenCV), report.html (parsed, and rendered
by headless Chromium), the progress bar and a fast ``--help``.

The model is the packaged default (``engine/models/mpnn.onnx``, used without ``--model``) when it is installed,
else the tiny trained MPNN of tests/test_stream.py. The video is the real bikes.mp4 of the shared data (5 hard
cuts, at frames 30, 76, 137, 187 and 242: shots.json).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_stream import SIZE, _dissolve_fade_clip, _shot, _wipe_clip, mpnn_model  # noqa: F401  (mpnn_model: a fixture)

from engine.default_models import default_model
from engine.errors import ModelError
from engine.stream import main

ROOT = Path(__file__).resolve().parents[1]
HAVE_FFMPEG = importlib.util.find_spec("imageio_ffmpeg") is not None
NO_FFMPEG = "imageio-ffmpeg is not installed (pip install imageio-ffmpeg): --split has no ffmpeg"


@pytest.fixture(scope="session")
def stream_model(request) -> tuple[Path, bool]:
    """(model, whether it is the packaged default)."""
    try:
        return default_model("video"), True
    except ModelError:
        return request.getfixturevalue("mpnn_model"), False


def _run(args: list[str], model: tuple[Path, bool]) -> subprocess.CompletedProcess:
    """The real command, in a fresh interpreter; ``--model`` only when the default model is not installed."""
    extra = [] if model[1] else ["--model", str(model[0])]
    proc = subprocess.run([sys.executable, "-m", "engine.stream", *args, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def _main(args: list[str], model: tuple[Path, bool]) -> None:
    """The command's ``main`` in this process (quicker than a fresh interpreter)."""
    assert main([*args, *([] if model[1] else ["--model", str(model[0])])]) == 0


@pytest.fixture(scope="module")
def bikes(shared_data, stream_model, tmp_path_factory):
    """One run over bikes.mp4 with every output: (video, out folder, report.json, the process)."""
    video = shared_data / "video" / "bikes.mp4"
    out = tmp_path_factory.mktemp("bikes")
    proc = _run([str(video), "--out", str(out), "--save-images", *(["--split"] if HAVE_FFMPEG else [])],
                stream_model)
    return video, out, json.loads((out / "report.json").read_text()), proc


def _frames(path) -> np.ndarray:
    """Every frame of a video, decoded here with OpenCV (BGR)."""
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    cap.release()
    return np.stack(out)


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _pyscenedetect_csv(scenes) -> list[list[str]]:
    """What PySceneDetect's ``list-scenes`` writes for ``scenes`` (its own writer)."""
    from scenedetect.output import write_scene_list

    buf = io.StringIO(newline="")
    write_scene_list(buf, scenes, include_cut_list=True, cut_list=[s for s, _ in scenes[1:]])
    return list(csv.reader(io.StringIO(buf.getvalue())))


# ---------------------------------------------------------------------------------------------------------------
# the scene list


def test_scene_list_agrees_with_pyscenedetect_on_a_video_with_clean_cuts(bikes, stream_model, tmp_path):
    from scenedetect import ContentDetector, detect

    video, out, report, _ = bikes
    ours = _csv_rows(out / "bikes-Scenes.csv")
    scenes = detect(str(video), ContentDetector())  # PySceneDetect's own detection: the oracle for the cuts
    theirs = _pyscenedetect_csv(scenes)
    truth = json.loads((video.parent / "shots.json").read_text())["bikes.mp4"]["shot_starts"]
    assert [s.frame_num for s, _ in scenes] == truth  # the premise: PySceneDetect finds the true cuts
    # PySceneDetect's columns first, in its order, then ours
    width = len(theirs[1])
    assert ours[1][:width] == theirs[1]
    assert ours[1][width:] == ["Transition", "Transition Start Frame", "Transition End Frame", "Recurs With Scene",
                               "Recurrence Score"]
    assert ours[0][0] == "Timecode List:" and all(len(r) == len(ours[1]) for r in ours[2:])
    starts = [int(r[1]) - 1 for r in ours[2:]]  # 1-based Start Frame
    tol = 0 if stream_model[1] else 2  # the tiny test model finds the cuts within 2 frames (test_stream.py)
    assert len(starts) == len(truth) and all(abs(a - b) <= tol for a, b in zip(starts, truth)), (starts, truth)
    if starts == truth:  # the same cuts: every PySceneDetect column, and the cut list, written alike
        assert ours[0] == theirs[0]
        assert [r[:width] for r in ours[2:]] == theirs[2:]
    # the extra columns: every shot after the first begins with a cut there
    assert [r[width:] for r in ours[2:]] == [["", "", "", "", ""]] + [["cut", r[1], r[1], "", ""] for r in ours[3:]]
    # and report.json (inclusive ends, 0-based) says the same shots
    assert [(s["start"], s["end"]) for s in report["shots"]] == [(int(r[1]) - 1, int(r[4]) - 1) for r in ours[2:]]


def test_pyscenedetect_reads_our_scene_list(bikes, tmp_path):
    """``scenedetect load-scenes`` (PySceneDetect's reader of scene lists) takes our CSV and lists the same
    scenes again."""
    video, out, _, _ = bikes
    proc = subprocess.run([sys.executable, "-m", "scenedetect", "-i", str(video), "-o", str(tmp_path), "-q",
                           "load-scenes", "-i", str(out / "bikes-Scenes.csv"), "list-scenes"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    again = _csv_rows(tmp_path / "bikes-Scenes.csv")
    ours = _csv_rows(out / "bikes-Scenes.csv")
    assert again[0] == ours[0]
    assert [r[:len(again[1])] for r in ours[1:]] == again[1:]


class _Table:
    """The rows of a scene list CSV by column name (the extra columns included)."""

    def __init__(self, path: Path):
        rows = _csv_rows(path)
        self.cut_list, self.header, self.rows = rows[0], rows[1], [dict(zip(rows[1], r)) for r in rows[2:]]


@pytest.fixture(scope="module")
def gradual(stream_model, tmp_path_factory):
    """A real clip written to a file: a street corner dissolves into a man in a car, who fades out to black and
    in to taxis (tests/test_stream.py's clip), then the street corner again after a cut, then after a cut the taxis
    a wipe uncovers the man in the car in (tests/test_stream.py's wipe clip)."""
    clip = _dissolve_fade_clip()[0]
    clip = [*clip, *_shot("bikes", 162, 187), *_wipe_clip("wipe")[0]]
    folder = tmp_path_factory.mktemp("gradual")
    video = folder / "gradual.mp4"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25, SIZE)
    for f in clip:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    out = folder / "out"
    _main([str(video), "--out", str(out), "--no-progress"], stream_model)
    return video, out, json.loads((out / "report.json").read_text()), len(clip)


def test_scene_list_names_gradual_transitions_and_recurrences_as_report_json_does(gradual):
    _, out, report, _ = gradual
    table = _Table(out / "gradual-Scenes.csv")
    shots, transitions = report["shots"], report["transitions"]
    assert {"dissolve", "fade", "wipe"} <= {t["move"] or ("fade" if t["fade"] else "dissolve") for t in transitions
                                            if t["type"] == "gradual"}  # the premise: the clip's gradual transitions
    assert len(table.rows) == len(shots)
    for row, shot in zip(table.rows, shots):
        assert (int(row["Start Frame"]), int(row["End Frame"])) == (shot["start"] + 1, shot["end"] + 1)
        assert int(row["Length (frames)"]) == shot["end"] - shot["start"] + 1
        assert float(row["Start Time (seconds)"]) == pytest.approx(shot["start"] / 25, abs=5e-4)
        assert float(row["End Time (seconds)"]) == pytest.approx((shot["end"] + 1) / 25, abs=5e-4)
        into = [t for t in transitions if t["first"] <= shot["start"] and
                (t["last"] == shot["start"] - 1 or t["first"] == shot["start"])]
        if shot["start"] == 0:
            assert row["Transition"] == "" and not into
        else:
            (t,) = into
            assert row["Transition"] == ("cut" if t["type"] == "cut" else t["move"] or ("fade" if t["fade"]
                                                                                      else "dissolve"))
            assert (int(row["Transition Start Frame"]), int(row["Transition End Frame"])) == (t["first"] + 1,
                                                                                            t["last"] + 1)
        again = shot["recurs_with"]
        assert row["Recurs With Scene"] == ("" if again is None else str(again + 1))
    # a gradual transition's frames are in no shot: there the next Start Frame is past the End Frame + 1
    gaps = [int(b["Start Frame"]) - int(a["End Frame"]) - 1 for a, b in zip(table.rows, table.rows[1:])]
    assert gaps == [0 if t["type"] == "cut" else t["last"] - t["first"] + 1 for t in transitions]


# ---------------------------------------------------------------------------------------------------------------
# the EDL


_EVENT = re.compile(r"^(\d{3,})\s+(\S+)\s+V\s+C\s+(\d\d:\d\d:\d\d:\d\d) (\d\d:\d\d:\d\d:\d\d) "
                    r"(\d\d:\d\d:\d\d:\d\d) (\d\d:\d\d:\d\d:\d\d)\s*$")


def _frame_of(tc: str, rate: int) -> int:
    h, m, s, f = (int(x) for x in tc.split(":"))
    assert f < rate and s < 60 and m < 60
    return ((h * 60 + m) * 60 + s) * rate + f


def test_edl_reads_back_as_the_shots(bikes):
    video, out, report, _ = bikes
    lines = (out / "bikes.edl").read_text().splitlines()
    assert lines[0] == "TITLE: bikes" and lines[1] == "FCM: NON-DROP FRAME"
    rate = round(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FPS))
    events = [m.groups() for m in map(_EVENT.match, lines) if m]
    assert len(events) == len(report["shots"]) == 6
    for k, (num, reel, a, b, c, d) in enumerate(events):
        shot = report["shots"][k]
        assert int(num) == k + 1 and reel == "AX"
        assert (_frame_of(a, rate), _frame_of(b, rate)) == (shot["start"], shot["end"] + 1)  # out: exclusive
        assert (c, d) == (a, b)  # record = source: each shot where it was
    assert all(line == "" or line.startswith(("TITLE:", "FCM:", "*")) or _EVENT.match(line) for line in lines)


# ---------------------------------------------------------------------------------------------------------------
# saved images


def test_saved_images_are_the_frames_they_name_with_pyscenedetect_names(bikes, tmp_path):
    from scenedetect import open_video
    from scenedetect.common import FrameTimecode
    from scenedetect.output import save_images

    video, out, report, _ = bikes
    frames = _frames(video)
    images = report["outputs"]["images"]
    assert len(images) == 3 * len(report["shots"])  # PySceneDetect's 3 per scene
    for im in images:
        shot = report["shots"][im["shot"]]
        assert shot["start"] <= im["frame"] <= shot["end"]
        got = cv2.imread(str(out / im["file"]), cv2.IMREAD_COLOR)
        assert got.shape == frames[im["frame"]].shape
        diff = np.abs(got.astype(np.int16) - frames[im["frame"]].astype(np.int16)).mean()
        assert diff < 3, (im, diff)  # JPEG at quality 95
    # the frames PySceneDetect's save-images takes in the same scenes (its frame chooser: a private function, so
    # the comparison goes where it goes); it rounds in floating point seconds, so a point that falls half-way
    # between two frames may go to either
    from scenedetect.output.image import _generate_timecode_list

    rate = cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FPS)
    scenes = [(FrameTimecode(s["start"], rate), FrameTimecode(s["end"] + 1, rate)) for s in report["shots"]]
    theirs = [t.frame_num for times in _generate_timecode_list(scenes, 3, 1) for t in times]
    ours = [im["frame"] for im in images]
    assert len(ours) == len(theirs) and all(abs(a - b) <= 1 for a, b in zip(ours, theirs)), (ours, theirs)
    assert ours[0::3] == theirs[0::3] and ours[2::3] == theirs[2::3]  # first and last: whole frames, no halves
    # the names PySceneDetect gives the images of the same scenes
    theirs = save_images(scenes, open_video(str(video)), num_images=3, output_dir=str(tmp_path), show_progress=False)
    assert sorted(im["file"] for im in images) == sorted(f for names in theirs.values() for f in names)
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(im["file"] for im in images)


# ---------------------------------------------------------------------------------------------------------------
# report.html


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.rows, self.links, self.sources, self.text = [], {}, [], [], []
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and a.get("id", "").startswith("shot-"):
            self._row = a["id"]
            self.rows[self._row] = []
        if "src" in a:
            self.sources.append(a["src"])
        if "href" in a:
            self.links.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self.rows[self._row].append(data.strip())


def test_report_html_is_self_contained_and_lists_every_shot(bikes, gradual):
    for video, out, report in (bikes[:3], gradual[:3]):
        page = _Page()
        page.feed((out / "report.html").read_text(encoding="utf-8"))
        assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
        assert page.sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
                                    for s in page.sources)  # nothing fetched from anywhere
        shots = report["shots"]
        assert sorted(page.rows) == sorted(f"shot-{k + 1}" for k in range(len(shots)))
        for k, s in enumerate(shots):
            cells = page.rows[f"shot-{k + 1}"]
            assert cells[:2] == [str(k + 1), str(s["start"])] and str(s["end"]) in cells
        # every link points at a row of the page: the earlier shot a recurring one shows again
        want = [f"#shot-{s['recurs_with'] + 1}" for s in shots if s["recurs_with"] is not None]
        assert page.links == want
        # one picture per shot (middle frame) besides the timeline, when the source is a file
        assert sum(s.startswith("data:image/jpeg") for s in page.sources) == len(shots)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium) to render report.html")


def _screenshot(browser: str, page: Path, png: Path) -> np.ndarray:
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={png.parent / 'profile'}",
                           f"--screenshot={png}", "--window-size=1280,1400", page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert png.is_file(), proc.stderr
    return cv2.imread(str(png), cv2.IMREAD_COLOR)


def test_report_html_renders_in_a_browser(bikes, tmp_path):
    browser = _chromium()
    _, out, _, _ = bikes
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>\n")
    blank = _screenshot(browser, empty, tmp_path / "blank.png")
    shot = _screenshot(browser, out / "report.html", tmp_path / "report.png")
    assert blank.shape == shot.shape
    assert len(np.unique(blank.reshape(-1, 3), axis=0)) == 1  # what an empty page renders: one colour
    assert (np.abs(shot.astype(np.int16) - blank.astype(np.int16)).max(axis=2) > 30).mean() > 0.1
    b, g, r = (shot[..., k].astype(np.int16) for k in range(3))
    assert ((r > 200) & (g < 80) & (b < 80)).sum() > 50  # the timeline's red cut lines (and red "cut" words)
    assert ((b > 120) & (r < 90) & (g < 160) & (b - r > 60)).sum() > 50  # its blue curve
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 1000  # the shots' pictures


# ---------------------------------------------------------------------------------------------------------------
# split videos


def _check_split(video: Path, out: Path, report: dict) -> set:
    source = _frames(video)
    written = report["outputs"]["split"]
    assert [w["shot"] for w in written] == list(range(len(report["shots"])))
    for w in written:
        shot = report["shots"][w["shot"]]
        got = _frames(out / w["file"])
        assert len(got) == shot["end"] - shot["start"] + 1 == w["frames"], (w, len(got))
        want = source[shot["start"]: shot["end"] + 1]
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16)).reshape(len(got), -1).mean(axis=1)
        if w["mode"] == "copy":
            assert diff.max() == 0, w  # the source's own compressed frames
        else:
            assert diff.max() < 3, (w, diff.max())  # re-encoded at -crf 16
            # each frame is its own source frame, not a neighbour
            for k in (0, len(got) - 1):
                near = [np.abs(got[k].astype(np.int16) - source[j].astype(np.int16)).mean()
                        for j in range(max(0, shot["start"] + k - 2), min(len(source), shot["start"] + k + 3))]
                assert int(np.argmin(near)) == min(2, shot["start"] + k), (w, k, near)
    return {w["mode"] for w in written}


@pytest.mark.skipif(not HAVE_FFMPEG, reason=NO_FFMPEG)
def test_split_videos_hold_exactly_each_shots_frames(bikes, shared_data, stream_model, tmp_path):
    video, out, report, _ = bikes
    assert [w["file"] for w in report["outputs"]["split"]] == [f"bikes-Scene-{k:03d}.mp4" for k in range(1, 7)]
    _check_split(video, out, report)
    # stopped at frame 100, the last shot ends where the file has no key frame: it is re-encoded
    short = tmp_path / "short"
    _main([str(video), "--out", str(short), "--max-frames", "100", "--split", "--no-progress"], stream_model)
    report = json.loads((short / "report.json").read_text())
    assert report["shots"][-1]["end"] == 99
    assert "encode" in _check_split(video, short, report)
    assert report["outputs"]["split"][-1]["mode"] == "encode"


# ---------------------------------------------------------------------------------------------------------------
# the command line: the model it used, the progress bar, --help, refusals


def test_the_command_says_which_model_it_used(bikes, stream_model):
    _, _, report, proc = bikes
    model, is_default = stream_model
    assert report["model"]["path"] == str(model) and report["model"]["default"] is is_default
    lines = [line for line in proc.stderr.splitlines() if line.startswith("model: ")]
    assert len(lines) == 1 and str(model) in lines[0] and report["model"]["name"] in lines[0]
    assert ("the packaged default" in lines[0]) is is_default


def test_a_file_of_known_length_shows_a_progress_bar(bikes):
    _, _, report, proc = bikes
    assert re.search(r"stream \(\w+\): *100%\|.*\| 250/250", proc.stderr), proc.stderr[-2000:]
    assert report["frames"] == 250


def test_help_imports_nothing_heavy_and_lists_the_outputs():
    code = ("import runpy, sys; sys.argv = ['engine.stream', '--help']\n"
            "try:\n    runpy.run_module('engine.stream', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'numba', 'cv2', 'matplotlib', 'numpy') if m in sys.modules),"
            " file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr
    for word in ("STEM-Scenes.csv", "STEM.edl", "report.html", "--save-images", "--split", "--num-images",
                 "PySceneDetect", "exclusive", "non-drop-frame", "default"):
        assert word in proc.stdout, word


def test_pictures_and_split_of_a_camera_are_refused_before_it_opens(tmp_path, capsys):
    for flag in ("--save-images", "--split"):
        assert main(["0", "--out", str(tmp_path / "cam"), flag]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} needs a video file") and "camera 0" in err
    assert not (tmp_path / "cam").exists()
