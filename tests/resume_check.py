"""Shared checks for the trainers: a run split by ``--resume`` equals one run (the epoch-based ae, siamese), and
the command-line refusal of bad data or a damaged checkpoint (all four)."""

import torch

from train.checkpoint import load_checkpoint


def split_run_equals_whole(trainer, base, tmp_path):
    """Train 2 epochs of 2 steps at once (``full/``) and as 1 epoch then ``--resume`` to 2 (``part/``).

    Asserts the split run's checkpoint after epoch 1, then equal (epoch, step), bit-equal weights and equal
    per-epoch losses; returns ``(full metrics, resumed metrics, full checkpoint, resumed checkpoint)`` for the
    trainer's own further checks. ``base`` must fix ``--max-steps 2``.
    """
    full = trainer.main(base + ["--epochs", "2", "--out", str(tmp_path / "full")])
    trainer.main(base + ["--epochs", "1", "--out", str(tmp_path / "part")])
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    resumed = trainer.main(base + ["--epochs", "2", "--resume", "--out", str(tmp_path / "part")])
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert full["loss_per_epoch"] == resumed["loss_per_epoch"]
    return full, resumed, a, b


def truncated_checkpoint(folder, name: str):
    """A run folder whose checkpoint.pt (of model ``name``) lost its last 100 bytes, as a crash of a non-atomic
    copy would leave it; returns the checkpoint's path."""
    from pathlib import Path

    from train.checkpoint import save_checkpoint

    path = Path(folder) / "checkpoint.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"name": name, "config": {}, "padding": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:-100])
    return path


def cli_error(capsys, call, *needles: str) -> str:
    """Run ``call()`` (a trainer's main) expecting the command-line refusal: ``error: <message>`` on stderr, no
    traceback, exit status 2; asserts each of ``needles`` is in the message and returns it."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 2, (e.value.code, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def bad_data_and_damaged_checkpoint_exit_2(capsys, main, tmp_path, name: str, resume_args: list[str]):
    """A trainer's ``main`` refuses ``--data mnist`` at a missing root and ``--resume`` from a truncated
    checkpoint of model ``name`` (``resume_args``: a tiny run of that trainer, --out and --resume added) with
    ``error: ...`` naming the path, exit status 2 and no traceback."""
    gone = tmp_path / "nonexistent"
    cli_error(capsys, lambda: main([*resume_args, "--data", "mnist", "--data-root", str(gone), "--out",
                                    str(tmp_path / "a")]), "data set 'mnist'", str(gone))
    path = truncated_checkpoint(tmp_path / "b", name)
    cli_error(capsys, lambda: main([*resume_args, "--out", str(tmp_path / "b"), "--resume"]), str(path),
              "truncated or damaged")
