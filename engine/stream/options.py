"""``StreamOptions``: what the comparator's decisions depend on, with each default, its meaning and its check.

Every option is declared once, below: its default, what it means (the text ``--help`` shows), what values it
takes, and whether the command line has a flag for it. ``StreamComparator(encoder, **options)`` takes the same
names as keywords; ``add_flags`` / ``from_flags`` derive the command line's flags from the declarations.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

from engine.errors import InputError


def _int(default: int | None, doc: str, *, least: int = 1, none: bool = False, flag: bool = False):
    """An int option of at least ``least`` (``none``: None is allowed too)."""
    return field(default=default, metadata={"kind": int, "least": least, "none": none, "help": doc, "flag": flag})


def _bool(default: bool, doc: str, *, flag: bool = False):
    """A yes / no option (its flag, when it has one, turns it on)."""
    return field(default=default, metadata={"kind": bool, "help": doc, "flag": flag})


def _number(default: float, lo: float, hi: float, doc: str, *, flag: bool = False):
    """A number option in [lo, hi] (stored as float)."""
    return field(default=default, metadata={"kind": float, "range": (lo, hi), "help": doc, "flag": flag})


@dataclass(frozen=True)
class StreamOptions:
    """The comparator's options (the defaults suit the packaged MPNN, 112 px, and the seed's 224 px one, on
    ordinary footage). Refused values raise ``InputError`` naming the option, what it takes and what came."""

    window: int = _int(64, "recent frames over which each embedding dimension's variance is measured", least=2)
    top_dims: int | None = _int(4096, "compare on this many highest-variance dimensions (the published demo's "
                                      "choice); all where the embedding has no more, or with None", none=True,
                                flag=True)
    refresh: int = _int(16, "frames between two choices of the highest-variance dimensions")
    cut_threshold: float = _number(0.2, 0.0, 2.0, "least dissimilarity (1 - cosine) with the frame before for a cut",
                                   flag=True)
    cut_ratio: float = _number(2.5, 1.0, 1e9, "a cut's dissimilarity is also at least this many times the one "
                                              "typical of the neighbouring frames")
    # 0.8: the benchmark's 28 true cuts correlate by 0.29 at most, its lighting steps (x1.6, x1/1.6) by 0.88 or more
    light_corr: float = _number(0.8, -1.0, 2.0, "a cut candidate whose thumbnail, brightness and contrast "
                                                "normalised, correlates this much with the frame before's, and "
                                                "whose brightness or contrast changed 1.2 times or more, was relit "
                                                "(a lamp switched on), not cut (2: never)")
    flash_frames: int = _int(4, "content that comes back within this many frames was a flash, not a cut")
    gradual_window: int = _int(8, "frames averaged on each side of a point to find where content changes gradually",
                               least=2)
    gradual_threshold: float = _number(0.3, 0.0, 2.0, "least dissimilarity across a dissolve", flag=True)
    # a dissolve moves the picture in a straight line from P (before) to Q (after)
    straightness: float = _number(0.3, 0.0, 1.0, "a dissolve's distance covered over the path length travelled "
                                                 "(in thumbnail space) reaches this")
    blend_residual: float = _number(0.3, 0.0, 10.0, "how far (relative to |Q - P|) the frames of a dissolve may lie "
                                                    "from the blends of P and Q; motion and pans leave the line")
    blend_spread: float = _number(0.4, 0.0, 10.0, "how unevenly (interquartile range of per-tile blends) a dissolve "
                                                  "may blend the picture")
    # palette_change, moving_residual, moving_spread: tuned on the benchmark's dissolves, mixed and long_dissolves
    # videos (video_truth.py), where the dissolves between moving bikes.mp4 shots that the clean blend test missed
    # have residual 0.33-0.41, spread up to 0.46 and palette 0.30-0.88, while the stretches of motion inside one
    # shot that reach these tests have palette 0.92-0.99, except one (palette 0.82) whose residual is 0.48; a pan,
    # a zoom and a shake are "abrupt" (smooth_ratio) before. dissolves_held was built afterwards and held out.
    palette_change: float = _number(0.9, 0.0, 1.0, "a gradual change whose colours before and after (hue-saturation "
                                                   "histograms of the 8 frames on each side) agree at most this much "
                                                   "(Bhattacharyya) joins two scenes: a dissolve between moving "
                                                   "shots, which blends less cleanly, is accepted (0: never)")
    moving_residual: float = _number(0.45, 0.0, 10.0, "blend_residual for such a dissolve between moving shots")
    moving_spread: float = _number(0.5, 0.0, 10.0, "blend_spread for such a dissolve between moving shots")
    smooth_ratio: float = _number(0.25, 0.0, 1.0, "the largest share of the P-to-Q change one frame step may carry "
                                                  "in a dissolve")
    move_residual: float = _number(0.25, 0.0, 10.0, "how far (squared, relative to |Q - P|^2) the frames of a wipe "
                                                    "or push may lie from composites of P and Q split by an edge "
                                                    "(0: no wipes or pushes)")
    max_gradual: int = _int(40, "the longest transition, in frames")
    dark_threshold: float = _number(24.0, 0.0, 255.0, "mean brightness (0..255) at or below which a frame is black "
                                                      "(fades)")
    anchor_threshold: float = _number(0.5, -1.0, 1.0, "the published demo's rule: below this similarity to the "
                                                      "anchor, a new anchor")
    min_gap: int = _int(8, "frames at least between two transitions (a closer one is dropped)", flag=True)
    # A recurring shot must pass both tests. Calibrated on benchmarks/video_truth.py's recur_tune video (filmed
    # photos of fungi, two of each of two species, city shots, the animation, photos from scikit-image and
    # scikit-learn; 4 true recurrences) and the ten earlier benchmark videos (19 more) with the packaged MPNN: the
    # colour coefficient of the 23 true pairs is 0.949 or more, that of the 330 other pairs 0.918 at most; the
    # signature cosine of the true pairs is 0.024 or more (a pan and a zoom over one scene: 0.024; a photo filmed
    # again 86 px further along: 0.09), while pairs of different scenes reach 0.45. recur_held is held out.
    recur_threshold: float = _number(0.0, -1.0, 1.0, "least signature cosine (after removing the stream's mean) for "
                                                     "a recurring shot", flag=True)
    recur_colour: float = _number(0.935, 0.0, 1.0, "least Bhattacharyya coefficient of two shots' hue-saturation "
                                                   "histograms (whole frames, 16 hues x 8 saturations) for a "
                                                   "recurring shot (0: the signature alone decides)")
    max_shots: int = _int(256, "shot signatures kept for recurrence (the oldest are forgotten)")
    signature_dim: int = _int(1024, "entries in a shot signature (the mean embedding, pooled in blocks when larger)")
    thumb_size: int = _int(32, "side of the small colour thumbnails kept per frame to tell dissolves from motion",
                           least=4)
    # 2: end to end with 2 workers on the 2-core reference machine, median frames/s at batch 1 / 2 / 4 were
    # 218 / 222 / 217 on mixed.mp4 and 201 / 209 / 210 on bikes.mp4; larger batches' activations fall out of the
    # cache
    batch_size: int = _int(2, "frames embedded together", flag=True)
    # the gate (gate.py): the network embeds only the frames where the decisions may need it, the others get
    # their embedding interpolated; the transitions found are those of every frame embedded
    every_frame: bool = _bool(False, "embed every frame (no gate): the reference computation, slower", flag=True)
    gate_stride: int = _int(8, "embed at least every this many frames (key frames); the frames between are "
                               "embedded where something may happen, else interpolated")
    # 0.1: below where the dissolve test starts a region (0.4 * gradual_threshold = 0.12), so the frames
    # interpolated between two key frames closer than this start none. Transitions and shots equal to
    # every_frame's on every test video and clip at 0.05..0.2 with the packaged MPNN (224 and 112 px) and the
    # tests' tiny one (0.3 changed a dissolve); frames embedded over them 2630 -> 2412 of 2921 from 0.05 to 0.1
    gate_change: float = _number(0.1, 0.0, 2.0, "1 - cosine between two key frames from which every frame "
                                                "between them (and around) is embedded")
    gate_step_ratio: float = _number(1.9, 0.0, 1e9, "a thumbnail step this many times its neighbours' has the "
                                                    "frames around it embedded (the cut test asks for 2)")

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name), f.metadata))

    def to_dict(self) -> dict:
        return asdict(self)


OPTION_NAMES = tuple(f.name for f in fields(StreamOptions))


def _checked(name: str, v, m):
    import numpy as np  # here, not at the top: the command line's --help (which reads the flags) stays light

    if m["kind"] is bool:
        if not isinstance(v, (bool, np.bool_)):
            raise InputError(f"{name} must be True or False, got {v!r}")
        return bool(v)
    if m["kind"] is int:
        if v is None and m["none"]:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < m["least"]:
            want = "a positive int" if m["least"] == 1 else f"an int >= {m['least']}"
            raise InputError(f"{name} must be {want}{' or None' if m['none'] else ''}, got {v!r}")
        return int(v)
    lo, hi = m["range"]
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not lo <= float(v) <= hi:
        raise InputError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for each option the command line offers (``--cut-threshold`` for ``cut_threshold``), its type,
    default and help taken from the declaration."""
    for f in fields(StreamOptions):
        if f.metadata["flag"] and f.metadata["kind"] is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=f.default,
                                help=f.metadata["help"])
        elif f.metadata["flag"]:
            parser.add_argument("--" + f.name.replace("_", "-"), type=f.metadata["kind"], default=f.default,
                                help=f"{f.metadata['help']} (default: {f.default})")


def from_flags(args: argparse.Namespace) -> dict:
    """The options the command line gave (``add_flags``'s), by name."""
    return {f.name: getattr(args, f.name) for f in fields(StreamOptions) if f.metadata["flag"]}
