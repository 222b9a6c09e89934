"""Checkpoints on a time interval, at the end and on SIGTERM / SIGINT, and the run folder checked up front.

A run stopped by a signal writes its checkpoint after the step in progress (mid-epoch: the position within the
epoch is saved) and exits 143 / 130; resumed, it ends bit-identical to the same run never stopped. The signals
are real: raised in this process after the k-th optimiser step (a global step hook), and sent to a real
``python -m train.la`` process."""

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from resume_check import cli_error
from train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

LA = ["--data", "digits", "--limit", "24", "--image-size", "16", "--train-side", "16", "--code-dim", "16",
      "--batch-size", "8", "--warmup-epochs", "1", "--kmeans-k", "3", "--background", "10", "--no-progress"]
RUNS = {  # trainer, tiny argv, steps per epoch (mpnn: steps per level), the step after which the signal comes
    "la": ("train.la", LA + ["--epochs", "3"], 3, 5),  # epoch 2 (LA mode), 2 of its 3 steps
    "ae-conv": ("train.ae", ["--arch", "conv", "--data", "digits", "--image-size", "16", "--code-dim", "16",
                             "--limit", "16", "--batch-size", "4", "--epochs", "2", "--no-progress"], 4, 6),
    "siamese": ("train.siamese", ["--data", "digits", "--image-size", "8", "--dim", "8", "--limit", "32",
                                  "--batch-size", "8", "--test-pairs", "20", "--epochs", "2", "--no-progress"], 4, 6),
    "mpnn": ("train.mpnn", ["--size", "32", "--levels", "2", "--level-steps", "3", "--batch-size", "2",
                            "--frame-step", "25", "--init-frames", "2", "--window", "2", "--threshold", "0.01",
                            "--eval-limit", "4", "--no-progress", "--device", "cpu"], 3, 4),
}


class Unhandled(Exception):
    pass


@contextlib.contextmanager
def signal_after_step(k: int, signum=signal.SIGTERM):
    """Raise ``signum`` in this process right after the k-th optimiser step (of any optimiser). Meanwhile a signal
    the trainer does not catch raises ``Unhandled`` instead of killing the test session; yields that handler."""
    count = 0

    def hook(optimizer, args, kwargs):
        nonlocal count
        count += 1
        if count == k:
            signal.raise_signal(signum)

    def unhandled(signum, frame):
        raise Unhandled(f"{signal.Signals(signum).name} was not caught by the trainer")

    before = signal.signal(signum, unhandled)
    handle = register_optimizer_step_post_hook(hook)
    try:
        yield unhandled
    finally:
        handle.remove()
        signal.signal(signum, before)


def assert_same_end(a: dict, b: dict, ma: dict, mb: dict) -> None:
    """Two runs' final checkpoints (``a``, ``b``) and metrics (``ma``, ``mb``) are identical where it matters."""
    assert (a["epoch"], a["step"], a["complete"]) == (b["epoch"], b["step"], True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if "bank" in a["extra"]:
        assert torch.equal(a["extra"]["bank"]["vectors"], b["extra"]["bank"]["vectors"])
        assert torch.equal(a["extra"]["cluster_labels"], b["extra"]["cluster_labels"])
    if "per_level" in ma:
        assert [lv["loss"] for lv in ma["per_level"]] == [lv["loss"] for lv in mb["per_level"]]
    else:
        assert ma["loss_per_epoch"] == mb["loss_per_epoch"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_sigterm_mid_epoch_writes_a_checkpoint_and_resume_ends_identical(tmp_path, capsys, name):
    module, argv, per_epoch, k = RUNS[name]
    main = importlib.import_module(module).main
    straight = main(argv + ["--out", str(tmp_path / "a")])
    capsys.readouterr()
    with signal_after_step(k) as outside:
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(tmp_path / "b")])
        assert signal.getsignal(signal.SIGTERM) is outside  # the trainer put back the handler it found
    err = capsys.readouterr().err
    assert e.value.code == 128 + signal.SIGTERM == 143, err
    assert "SIGTERM received" in err and f"stopped by SIGTERM after step {k} (" in err and "--resume" in err, err
    stopped = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert stopped["step"] == k and stopped["complete"] is False
    if name == "mpnn":
        assert (stopped["extra"]["level"], stopped["extra"]["level_step"]) == (k // per_epoch, k % per_epoch)
    else:
        assert stopped["epoch"] == k // per_epoch
        assert (stopped["extra"]["position"]["steps"], stopped["extra"]["position"]["of"]) == (k % per_epoch, per_epoch)
        assert stopped["progress"].startswith(f"{k // per_epoch} of ") and "steps into epoch" in stopped["progress"]
    resumed = main(argv + ["--out", str(tmp_path / "b"), "--resume"])
    assert_same_end(load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt"),
                    straight, resumed)


def test_ctrl_c_exits_130_after_writing_the_checkpoint(tmp_path, capsys):
    module, argv, per_epoch, _ = RUNS["ae-conv"]
    main = importlib.import_module(module).main
    with signal_after_step(2, signal.SIGINT), pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 130
    assert "stopped by SIGINT after step 2" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["extra"]["position"]["steps"] == 2


def test_sigterm_to_a_training_process_then_resume_ends_identical(tmp_path):
    argv = [sys.executable, "-m", "train.la", *LA, "--epochs", "15", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(argv + ["--out", str(tmp_path / "a")], env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(argv + ["--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the first epoch ended: the process is training
        seen.append(line)
        if line.startswith("la epoch 1/15"):
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=600)
    err = "".join(seen) + rest
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err
    stopped = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert stopped["complete"] is False and 3 <= stopped["step"] < 45, stopped["progress"]
    subprocess.run(argv + ["--out", str(tmp_path / "b"), "--resume"], env=env, check=True, capture_output=True,
                   timeout=600)
    ma, mb = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("a", "b"))
    assert_same_end(load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt"),
                    ma, mb)
    assert ma["knn1_accuracy"] == mb["knn1_accuracy"]


def test_checkpoints_on_the_interval_at_every_epoch_with_0_and_their_share_in_metrics(tmp_path):
    from train.ae import main

    _, argv, per_epoch, _ = RUNS["ae-conv"]  # 2 epochs of 4 steps
    written = {}
    for every in ("default", "0", "1e-9"):
        extra = [] if every == "default" else ["--checkpoint-every", every]
        m = main(argv + extra + ["--out", str(tmp_path / every)])
        c = json.loads((tmp_path / every / "metrics.json").read_text())["checkpoints"]
        assert c["every_seconds"] == (300.0 if every == "default" else float(every))
        assert c["seconds"] > 0 and 0 < c["fraction"] < 1
        written[every] = c["written"]
        assert m["complete"]
    # 300 s: only at the end of this short run; 0: every epoch; a tiny interval: after every step and every epoch
    assert written == {"default": 1, "0": 2, "1e-9": 2 * (per_epoch + 1)}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, name):
    module, argv, _, _ = RUNS[name]
    main = importlib.import_module(module).main
    out = tmp_path / "afile"
    out.write_text("not a folder")
    # the data set is missing too: refused for --out first, before the data is looked at
    cli_error(capsys, lambda: main(argv + ["--data", "mnist", "--data-root", str(tmp_path / "gone"), "--out", str(out)]),
              f"--out {out}", "exists and is not a folder")
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_checkpoint_path_that_is_a_folder_is_refused_up_front(tmp_path, capsys, name, resume):
    module, argv, _, _ = RUNS[name]
    main = importlib.import_module(module).main
    (tmp_path / "checkpoint.pt").mkdir()
    cli_error(capsys, lambda: main(argv + ["--data", "mnist", "--data-root", str(tmp_path / "gone"),
                                           "--out", str(tmp_path)] + (["--resume"] if resume else [])),
              f"{tmp_path / 'checkpoint.pt'} is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # nothing written


def test_checkpoint_every_must_be_seconds_at_least_0(capsys):
    from train.siamese import main

    for bad in ("-1", "soon", "nan"):
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint-every", bad])
        assert e.value.code == 2
        assert f"--checkpoint-every: expected a number of seconds >= 0, got '{bad}'" in capsys.readouterr().err
