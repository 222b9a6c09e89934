"""Shared check for the epoch-based trainers (ae, siamese): a run split by ``--resume`` equals one run."""

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
