"""What every trainer shares: the command line, device and seed, the run folder, checkpoints and resume.

A trainer module (``train/mpnn.py`` ...) is its model, its loss and its config: it takes its data from
``train.split`` (held-out split, epoch order, batches), its inputs from ``train.augment`` (preprocessing,
augmentation) and its backbone from ``train.models.layers``; it defines a config dataclass, builds its parser with
``make_parser``, decorates its ``main`` with ``cli_main`` (the project's errors exit 2 with ``error: ...``; a
``ConfigError`` exits with its message) and drives a ``Run``::

    check_run_folder(out, ("clusters.png",))          # before any work: --out must be able to hold the run
    if args.resume:
        check_resume(out, "la", asdict(cfg), RESUME_KEYS)   # before Run rewrites config.json
    run = Run(out, name="la", config=asdict(cfg), resume=args.resume, checkpoint_every=args.checkpoint_every)
    state = run.resume_state()          # None, or the last checkpoint's payload
    with run.stoppable():               # SIGTERM / Ctrl-C: the step in progress finishes, then checkpoint and exit
        ... train a step ...
        if run.due(boundary=end_of_epoch):      # --checkpoint-every seconds passed (0: epoch ends), or a signal
            run.save(model=..., optimizer=..., epoch=e, step=step, encoder=encoder_spec(...), extra={...},
                     complete=..., progress=...)
            run.exit_if_stopped("...")

An epoch-based trainer (ae, siamese, la) writes its checkpoints through its own ``save(epochs_done, position=None)``
(``run.save`` with its model, encoder and extra state; returns ``epoch_progress``'s words)::

    with run.stoppable():
        for epoch in range(start_epoch, cfg.epochs):
            tally = EpochTally(state, epoch)    # the running loss; continues an epoch a checkpoint stopped in
            for i, batch in enumerate(batches[tally.done:], tally.done + 1):
                ... train a step ...; tally.add(loss, len(batch))
                run.after_step(save, epoch=epoch, step=step, position=tally.position(i, len(batches), batch_size))
            run.after_epoch(save, epoch=epoch, epochs=cfg.epochs)
    run.write_metrics({...}); run.save_figure(fig, "clusters.png")

Checkpoints are written on a time interval (``--checkpoint-every``, default 300 s, checked after every step; 0:
at the end of every epoch), always at the end, and when SIGTERM or SIGINT (Ctrl-C) arrives: the step in progress
finishes, the checkpoint is written (the position within the epoch included, so ``--resume`` continues exactly
there) and the trainer exits with status 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C); a second
signal stops at once, leaving the last checkpoint written. A crash (or SIGKILL) loses what was trained since the
last checkpoint: at most about ``--checkpoint-every`` seconds and a step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.errors import LookalikeError
from engine.fileio import unwritable
from train.checkpoint import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint

DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_EVERY = 300.0  # seconds between checkpoints (--checkpoint-every); 0: at the end of every epoch
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.json")  # what Run writes in every run folder

# torch is imported where it is used, not here: a trainer's command line (make_parser, --help, argument errors)
# answers before torch loads, which takes seconds.
if TYPE_CHECKING:
    import torch

    from engine.preprocess import Preprocess


class RunFolderError(LookalikeError):
    """The run folder (--out) cannot hold the run's files."""


class ConfigError(LookalikeError):
    """Settings that cannot be used: with the run's checkpoint (``--resume``, ``--init-from``), with the data, or
    on this machine. ``cli_main`` exits with the message (status 1), as it did before this class existed."""


def number(kind=int, *, low=None, high=None, low_open: bool = False, high_open: bool = False, why: str = ""):
    """An argparse ``type``: a ``kind`` (int or float) in [low, high] (``low_open`` / ``high_open``: that end
    excluded; None: unbounded). A value out of range, or not a finite number, is refused by argparse itself:
    ``prog: error: argument --epochs: expected an integer >= 1, got '0'`` on stderr, exit status 2."""
    if kind not in (int, float):
        raise ValueError(f"kind must be int or float, got {kind!r}")
    what = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        want = f"{what} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        want = f"{what} {'>' if low_open else '>='} {low}"
    elif high is not None:
        want = f"{what} {'<' if high_open else '<='} {high}"
    else:
        want = what
    if why:
        want += f" ({why})"

    def parse(text: str):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if (kind is float and not np.isfinite(v)) or (low is not None and (v <= low if low_open else v < low)) \
                or (high is not None and (v >= high if high_open else v > high)):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type by it in its own messages
    return parse


def make_parser(prog: str, description: str, *, datasets: dict[str, str], default_data: str,
                epochs: int, batch_size: int, default_out_help: str | None = None,
                min_batch_size: int = 1, batch_size_why: str = "",
                checkpoint_every: float = CHECKPOINT_EVERY) -> argparse.ArgumentParser:
    """The options every trainer takes; ``datasets`` maps each accepted name to a one-line description.
    ``default_out_help`` describes the run folder used without --out (default: ``runs/<last part of prog>``,
    what ``default_out`` gives for a trainer named like its module). Numeric options out of their range are
    refused by argparse (``number``); ``min_batch_size`` (and ``batch_size_why``, the reason) bounds --batch-size;
    ``checkpoint_every`` is the default of --checkpoint-every (seconds)."""
    out_help = default_out_help or str(default_out(prog.split(".")[-1]))
    listing = "\n".join(f"  {k:<10} {v}" for k, v in datasets.items())
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"datasets:\n{listing}\n\nData roots default to $LOOKALIKE_DATA/<dataset> when --data-root is not given.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=default_data, choices=sorted(datasets),
                   help=f"dataset to train on (default: {default_data}; see the list below)")
    p.add_argument("--data-root", default=None,
                   help="where the dataset lies on disk (a folder, a file, or for video a path or camera index)")
    p.add_argument("--epochs", type=number(int, low=1), default=epochs,
                   help=f"passes over the data (default: {epochs})")
    p.add_argument("--batch-size", type=number(int, low=min_batch_size, why=batch_size_why), default=batch_size,
                   help=f"images per step (default: {batch_size})")
    p.add_argument("--out", default=None, help=f"run folder for checkpoint, config, metrics and pictures (default: {out_help})")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto picks CUDA when torch sees a GPU, else the CPU (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed; fixed seed + CPU gives identical runs (default: 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's checkpoint (after a crash or to add epochs)")
    p.add_argument("--limit", type=number(int, low=1), default=None,
                   help="use at most this many training images (quick runs)")
    p.add_argument("--max-steps", type=number(int, low=1), default=None,
                   help="stop each epoch after this many steps (smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--checkpoint-every", type=_seconds, default=checkpoint_every, metavar="SECONDS",
                   help="write checkpoint.pt once this many seconds have passed since the last one (checked after "
                        "every step), at the end, and on SIGTERM / Ctrl-C; 0: at the end of every epoch "
                        f"(default: {checkpoint_every:g})")
    return p


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return v


def check_run_folder(out, files: tuple[str, ...] = ()) -> None:
    """Before any work: refuse (``RunFolderError``) a run folder that is not, and cannot be made, a writable
    folder, or in which the checkpoint, config.json, metrics.json or one of ``files`` (the trainer's pictures)
    exists as something other than a file. Creates nothing."""
    out = Path(out)
    why = unwritable(out)
    if why:
        raise RunFolderError(f"--out {out}: the run folder cannot be written ({why}); expected a folder, or a path "
                             f"where one can be made: give another --out")
    for name in (*RUN_FILES, *files):
        path = out / name
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise RunFolderError(f"--out {out}: {path} is {kind}, where the run writes its {name} file; remove it "
                                 f"or give another --out")


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """Fill a config dataclass from parsed arguments (dashes -> underscores), then apply overrides."""
    vals = {}
    ns = vars(args)
    for f in fields(cls):
        if f.name in overrides:
            vals[f.name] = overrides[f.name]
        elif f.name in ns and ns[f.name] is not None:
            vals[f.name] = ns[f.name]
    return cls(**vals)


def pick_device(choice: str = "auto") -> torch.device:
    import torch

    if choice not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA GPU on this machine; use --device auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a torch.Generator for data order."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def default_out(name: str) -> Path:
    return Path("runs") / name


def cli_main(main):
    """Decorate a trainer's ``main``: the one place where the project's errors become exit statuses. Missing or
    damaged data, a truncated or foreign checkpoint, an unusable run folder (``LookalikeError``: ``DataError``,
    ``CheckpointError``, ``RunFolderError`` ...) print ``error: <message>`` on stderr and exit with status 2, as
    the engine and export command lines do, instead of a traceback; settings that cannot be used
    (``ConfigError``) exit with their message (status 1). Other exceptions (bugs) keep their traceback."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except ConfigError as e:
            raise SystemExit(str(e)) from None
        except LookalikeError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def check_resume(out, name: str, config: dict, keys: tuple[str, ...], *, may_grow: tuple[str, ...] = ()) -> None:
    """Before the run folder is touched (``Run`` rewrites config.json): refuse to resume a checkpoint of
    another model (``CheckpointError``) or one trained with other model-, data- or state-shaping settings
    (``ConfigError``: ``keys`` must be equal, ``may_grow`` may only grow), naming every changed setting, saved and
    given; epochs, learning rate and the like may change. No checkpoint yet: nothing to check."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        return
    state = load_checkpoint(path)
    if state.get("name") != name:
        raise CheckpointError(f"{path} holds model {state.get('name')!r}, not {name!r}; use another --out")
    old = state.get("config", {})
    diff = [f"{k}: checkpoint {old.get(k)!r}, now {config.get(k)!r}" for k in keys if old.get(k) != config.get(k)]
    pos = (state.get("extra") or {}).get("position")
    if pos and "batch_size" not in keys and pos.get("batch_size") != config.get("batch_size"):
        diff.append(f"batch_size: checkpoint {pos.get('batch_size')!r}, now {config.get('batch_size')!r} (it stopped "
                    f"{pos.get('steps')} steps into an epoch, whose rest needs the same batches)")
    for k in may_grow:
        if old.get(k) is None or config.get(k) is None or config[k] < old[k]:
            diff.append(f"{k}: checkpoint {old.get(k)!r}, now {config.get(k)!r} (may only grow)")
    if diff:
        raise ConfigError(f"--resume: {path} was trained with other settings (" + "; ".join(diff) +
                         "); use another --out or the same settings")


def epoch_progress(epochs_done: int, epochs: int, *, cut_short: int = 0, max_steps: int | None = None,
                   position: dict | None = None) -> tuple[bool, str]:
    """(complete, progress in words) of an epoch-based run: complete when all ``epochs`` are done, none of them
    cut short by --max-steps (``cut_short`` counts those) and no epoch is under way (``position``, a checkpoint
    written mid-epoch: ``{"steps": done, "of": planned}``)."""
    words = f"{epochs_done} of {epochs} epochs"
    if position:
        words += f", {position['steps']} of {position['of']} steps into epoch {epochs_done + 1}"
    if cut_short:
        words += f"; {cut_short} epoch{'s' if cut_short > 1 else ''} cut short by --max-steps {max_steps}"
    return epochs_done >= epochs and not position and not cut_short, words


def resumed_position(state: dict | None, epoch: int) -> dict | None:
    """The position within ``epoch`` saved by a checkpoint written mid-epoch (by the time interval or a stop
    signal): ``{"epoch", "steps", "of", "batch_size", "total", "count", "seconds", ...}``; None when the checkpoint
    was written at an epoch's end (or for a fresh run)."""
    pos = ((state or {}).get("extra") or {}).get("position")
    return pos if pos and int(pos["epoch"]) == epoch else None


class EpochTally:
    """One epoch's running loss and clock: fresh, or continued from a checkpoint written mid-epoch
    (``resumed``, the saved position: its ``done`` steps are behind, their loss summed in ``total`` over ``count``
    items, and its ``seconds`` counted). ``position`` is what a mid-epoch checkpoint saves for it."""

    def __init__(self, state: dict | None, epoch: int, *, clock=time.time):
        self.epoch, self.clock = epoch, clock
        self.resumed = pos = resumed_position(state, epoch)
        self.done, self.total, self.count = (int(pos["steps"]), pos["total"], int(pos["count"])) if pos else (0, 0.0, 0)
        self.started = clock() - (pos["seconds"] if pos else 0.0)

    def add(self, loss: float, n: int) -> None:
        """A step's mean ``loss`` over its ``n`` items."""
        self.total += loss * n
        self.count += n

    @property
    def mean(self) -> float:
        """The mean loss so far (0 before any step)."""
        return self.total / max(self.count, 1)

    def seconds(self) -> float:
        return self.clock() - self.started

    def position(self, steps: int, of: int, batch_size: int, **extra) -> dict:
        """The position after ``steps`` of the epoch's ``of`` steps (see ``resumed_position``); ``extra``: what else
        the trainer needs to continue there (LA: its augmentation generator)."""
        return {"epoch": self.epoch, "steps": steps, "of": of, "batch_size": batch_size, "total": self.total,
                "count": self.count, "seconds": self.seconds(), **extra}


def cut_short_epochs(state: dict | None) -> int:
    """Epochs of the resumed run that --max-steps cut short (0 for a fresh run). A version 1 checkpoint did not
    count them: all its epochs count as cut short when it was trained with --max-steps."""
    if state is None:
        return 0
    extra = state.get("extra") or {}
    if "cut_short_epochs" in extra:
        return int(extra["cut_short_epochs"])
    return int(state.get("epoch", 0)) if (state.get("config") or {}).get("max_steps") is not None else 0


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def encoder_spec(arch: str, kwargs: dict, module: torch.nn.Module, dim: int, preprocess: Preprocess) -> dict:
    """The checkpoint's ``encoder`` entry: enough for ``train.registry.load_encoder`` to rebuild it.

    The state dict shares storage with the live module on the CPU (no copy), so ``torch.save`` writes the
    weights once although the checkpoint's ``model`` entry holds them too; save it before training goes on.
    """
    return {
        "arch": arch,
        "kwargs": dict(kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "dim": int(dim),
        "preprocess": preprocess.to_dict(),
    }


class Run:
    """A run folder: checkpoint.pt, config.json, metrics.json and pictures, all written atomically.

    ``checkpoint_every``: seconds between checkpoints (``due``); 0 writes one at every boundary (epoch end).
    Time spent writing checkpoints is counted and reported in metrics.json (``write_metrics``)."""

    def __init__(self, out, *, name: str, config: dict, resume: bool = False,
                 checkpoint_every: float = CHECKPOINT_EVERY):
        check_run_folder(out)
        self.dir = Path(out)
        self.name = name
        self.config = dict(config)
        self.resume = resume
        self.checkpoint_every = float(checkpoint_every)
        self.ckpt_path = self.dir / "checkpoint.pt"
        self.metrics_path = self.dir / "metrics.json"
        self.started = time.time()
        self.checkpoint_seconds = 0.0  # spent writing checkpoints in this process
        self.checkpoints_written = 0
        self.stop_signal: int | None = None  # SIGTERM / SIGINT received inside ``stoppable``
        self._last_save = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", {"name": name, "config": self.config})

    def resume_state(self, map_location="cpu") -> dict | None:
        """The last checkpoint when --resume was given (None without it); refuses a run of another model."""
        if not self.resume:
            return None
        if not self.ckpt_path.is_file():
            print(f"--resume: no checkpoint at {self.ckpt_path} yet; starting from scratch", file=sys.stderr)
            return None
        state = load_checkpoint(self.ckpt_path, map_location=map_location)
        if state.get("name") != self.name:
            raise CheckpointError(f"{self.ckpt_path} holds model {state.get('name')!r}, not {self.name!r}")
        where = state.get("progress") or f"epoch {state.get('epoch')}"
        print(f"resuming {self.name} from {self.ckpt_path} ({where}, step {state.get('step')})", file=sys.stderr)
        return state

    def save(self, *, model: torch.nn.Module, optimizer, epoch: int, step: int, encoder: dict, complete: bool,
             progress: str, extra: dict | None = None) -> str:
        """Write the checkpoint (see ``train.checkpoint``). ``complete``: the run did all its configured training;
        ``progress``: how far it got, in words (export names it when it refuses an incomplete run)."""
        import torch

        t = time.perf_counter()
        payload = {
            "name": self.name,
            "encoder": encoder,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "config": self.config,
            "epoch": int(epoch),
            "step": int(step),
            "complete": bool(complete),
            "progress": str(progress),
            "extra": extra or {},
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),  # its key array is stored as a tensor (to_plain)
            "python_rng": random.getstate(),
        }
        digest = save_checkpoint(self.ckpt_path, payload)
        self.checkpoint_seconds += time.perf_counter() - t
        self.checkpoints_written += 1
        self._last_save = time.monotonic()
        return digest

    def due(self, *, boundary: bool) -> bool:
        """Whether to write a checkpoint now: a stop signal arrived, or ``checkpoint_every`` seconds passed since
        the last one (with ``checkpoint_every`` 0: at a ``boundary``, an epoch's end)."""
        if self.stop_signal is not None:
            return True
        if self.checkpoint_every <= 0:
            return boundary
        return time.monotonic() - self._last_save >= self.checkpoint_every

    @contextlib.contextmanager
    def stoppable(self):
        """While training: SIGTERM and SIGINT set ``stop_signal`` instead of killing the process, so the step in
        progress finishes and the trainer writes its checkpoint (``due`` is then True) and calls
        ``exit_if_stopped``. A second signal stops at once (the last checkpoint written stays whole). A signal
        that comes after the trainer's last check still stops the run when the block ends (whose last act must be
        writing the final checkpoint). Outside the main thread (where Python cannot catch signals) this does
        nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                print(f"{self.name}: {name} again: stopping at once; {self.ckpt_path} is the last checkpoint written",
                      file=sys.stderr)
                raise SystemExit(128 + signum)
            self.stop_signal = signum
            print(f"{self.name}: {name} received: finishing the step in progress, then writing the checkpoint "
                  f"(send it again to stop at once)", file=sys.stderr)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        self.exit_if_stopped("at the end of training")

    def after_step(self, save, *, epoch: int, step: int, position: dict) -> None:
        """After training step ``step`` of epoch ``epoch`` (0-based), at ``position`` within it (``EpochTally``):
        when a checkpoint is ``due``, write it (``save(epoch, position)``, the trainer's, returns the run's progress
        in words) and stop there if a signal asked for it."""
        if self.due(boundary=False):
            words = save(epoch, position)
            self.exit_if_stopped(f"after step {step} ({words})")

    def after_epoch(self, save, *, epoch: int, epochs: int) -> None:
        """After epoch ``epoch`` (0-based) of ``epochs``: when a checkpoint is ``due`` or the run is over, write it
        (``save(epoch + 1)``) and stop there if a signal asked for it."""
        if self.due(boundary=True) or epoch + 1 == epochs:
            words = save(epoch + 1)
            self.exit_if_stopped(f"after epoch {epoch + 1} ({words})")

    def exit_if_stopped(self, where: str) -> None:
        """After the checkpoint a stop signal asked for: say where the run stopped and exit with 128 + the signal
        number (143 for SIGTERM, 130 for SIGINT)."""
        if self.stop_signal is None:
            return
        name = signal.Signals(self.stop_signal).name
        print(f"{self.name}: stopped by {name} {where}; checkpoint written to {self.ckpt_path}. Continue with the "
              f"same command and --resume", file=sys.stderr)
        raise SystemExit(128 + self.stop_signal)

    @staticmethod
    def restore_rng(state: dict) -> None:
        if "torch_rng" in state:
            import torch

            torch.set_rng_state(state["torch_rng"])
        if "numpy_rng" in state:
            kind, key, *rest = state["numpy_rng"]
            np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
        if "python_rng" in state:
            random.setstate(state["python_rng"])

    @classmethod
    def restore(cls, state: dict | None, model: torch.nn.Module, optimizer) -> tuple[int, int, list]:
        """Load a resumed checkpoint's model, optimizer and random states; returns (epochs done, steps done,
        losses so far), or (0, 0, []) for a fresh run (``state`` None)."""
        if state is None:
            return 0, 0, []
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        cls.restore_rng(state)
        return int(state["epoch"]), int(state["step"]), list(state["extra"].get("losses", []))

    def write_metrics(self, metrics: dict) -> None:
        """metrics.json: ``metrics``, the run's wall time here (``seconds``, from the run folder's opening) and the
        checkpoints' share of it (``checkpoints``: interval, how many were written, seconds spent, fraction)."""
        metrics = dict(metrics)
        metrics.setdefault("name", self.name)
        seconds = time.time() - self.started
        metrics["seconds"] = round(seconds, 2)
        metrics["checkpoints"] = {
            "every_seconds": self.checkpoint_every, "written": self.checkpoints_written,
            "seconds": round(self.checkpoint_seconds, 3),
            "fraction": round(self.checkpoint_seconds / seconds, 4) if seconds > 0 else 0.0}
        atomic_write_json(self.metrics_path, metrics)

    def save_figure(self, fig, filename: str) -> Path:
        """Save a matplotlib figure atomically as PNG and close it."""
        import io

        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        path = self.dir / filename
        atomic_write_bytes(path, buf.getvalue())
        return path


def progress(iterable=None, *, total=None, desc="", disable=False):
    """A tqdm progress bar on stderr; call ``bar.set_postfix(loss=...)`` for the running loss."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False)
