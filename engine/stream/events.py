"""What a ``StreamComparator`` emits (``Transition``, ``Shot``) and what it measured on each frame (``FrameScore``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

TRANSITION_TYPES = ("cut", "gradual")


@dataclass(frozen=True)
class Event:
    """Base class of what a ``StreamComparator`` emits: a ``Transition`` or a ``Shot``."""

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind
        return d


@dataclass(frozen=True)
class Transition(Event):
    type: str  # "cut" (hard cut) or "gradual" (dissolve or fade)
    first: int  # first frame of the transition (for a cut: the first frame of the new shot)
    last: int  # last frame of the transition (== first for a cut)
    score: float  # dissimilarity across it, 1 - cosine between the content before and after (0..2)
    start_time: float | None = None  # timestamp of ``first`` when the frames came with timestamps
    end_time: float | None = None  # timestamp of ``last``
    fade: bool = False  # a gradual transition found by brightness (through black or white), not a dissolve
    move: str | None = None  # "wipe", "push" or "slide": a gradual transition where the new picture moves in


@dataclass(frozen=True)
class Shot(Event):
    index: int  # 0-based number of the shot in the stream
    start: int  # first frame
    end: int  # last frame (inclusive)
    recurs_with: int | None = None  # index of an earlier shot that shows the same scene, if any
    recurrence_score: float | None = None  # cosine between the two shots' signatures
    start_time: float | None = None
    end_time: float | None = None


@dataclass(frozen=True)
class FrameScore:
    """What the comparator measured on one frame (given to ``on_score`` once the frame is decided)."""

    index: int
    time: float | None
    similarity: float  # cosine with the frame before (on the selected dimensions); 1.0 for the first frame
    anchor_similarity: float  # cosine with the current anchor (the published demo's curve)
    gradual: float  # dissimilarity of the mean embeddings of the windows before and after this frame
    outlier: bool  # ignored as part of a flash / occlusion
    embedded: bool = True  # False: the gate skipped the network on it and interpolated its embedding
