"""The four trainers' command lines refuse out-of-range numbers before any work, as argparse refuses any bad
option: exit status 2 and ``<prog>: error: argument --<option>: expected <range>, got '<value>'`` on stderr.
Oracle: the option's documented range, written out here per trainer."""

from __future__ import annotations

import importlib

import pytest

# (trainer, option, refused value, what the message must say is expected). Every numeric option of each trainer
# that has a bound; make_parser's own (--epochs, --batch-size, --limit, --max-steps) for all four.
COMMON = [("--epochs", "0", "an integer >= 1"), ("--epochs", "-3", "an integer >= 1"),
          ("--limit", "0", "an integer >= 1"), ("--max-steps", "0", "an integer >= 1"),
          ("--epochs", "two", "an integer >= 1"), ("--limit", "1.5", "an integer >= 1")]
CASES = {
    "ae": COMMON + [("--batch-size", "0", "an integer >= 2 (batch norm needs two images)"),
                    ("--batch-size", "1", "an integer >= 2 (batch norm needs two images)"),
                    ("--image-size", "0", "an integer >= 8"), ("--code-dim", "0", "an integer >= 1"),
                    ("--lr", "-0.1", "a number >= 0"), ("--weight-decay", "-1", "a number >= 0"),
                    ("--lr", "nan", "a number >= 0")],
    "siamese": COMMON + [("--batch-size", "1", "an integer >= 2 (a batch needs a pair)"),
                         ("--image-size", "4", "an integer >= 8"), ("--dim", "0", "an integer >= 1"),
                         ("--test-pairs", "0", "an integer >= 1"), ("--margin", "0", "a number > 0"),
                         ("--lr", "-1", "a number >= 0"), ("--weight-decay", "-1", "a number >= 0")],
    "la": COMMON + [("--batch-size", "0", "an integer >= 2"), ("--image-size", "0", "an integer >= 8"),
                    ("--train-side", "4", "an integer >= 8"), ("--dim", "0", "an integer >= 1"),
                    ("--code-dim", "0", "an integer >= 1"), ("--temperature", "0", "a number > 0"),
                    ("--background", "0", "an integer >= 1"), ("--k", "-2", "an integer >= 1"),
                    ("--kmeans-k", "0", "an integer >= 1"), ("--kmeans-repeats", "0", "an integer >= 1"),
                    ("--kmeans-iterations", "0", "an integer >= 1"), ("--cluster-every", "0", "an integer >= 1"),
                    ("--warmup-epochs", "-1", "an integer >= 0"), ("--eval-every", "-1", "an integer >= 0"),
                    ("--mixing-rate", "0", "a number in (0, 1]"), ("--mixing-rate", "1.5", "a number in (0, 1]"),
                    ("--center-crop", "0", "a number in (0, 1]"), ("--crop-scale", "1.01", "a number in (0, 1]"),
                    ("--jitter", "1", "a number in [0, 1)"), ("--hue", "0.6", "a number in [0, 0.5]"),
                    ("--grayscale", "-0.1", "a number in [0, 1]"), ("--holdout", "1", "a number in [0, 1)"),
                    ("--lr", "-0.1", "a number >= 0"), ("--momentum", "-0.5", "a number >= 0"),
                    ("--weight-decay", "-1", "a number >= 0")],
    "mpnn": COMMON + [("--batch-size", "0", "an integer >= 1"), ("--levels", "0", "an integer >= 1"),
                      ("--size", "0", "an integer >= 1"), ("--lr", "-1", "a number >= 0"),
                      ("--init-frames", "0", "an integer >= 1"), ("--threshold", "0", "a number in (0, 1]"),
                      ("--threshold", "1.5", "a number in (0, 1]"), ("--window", "0", "an integer >= 1"),
                      ("--level-steps", "0", "an integer >= 1"), ("--frame-step", "0", "an integer >= 1"),
                      ("--shuffle-window", "0", "an integer >= 1"), ("--threads", "-1", "an integer >= 0"),
                      ("--eval-limit", "0", "an integer >= 1")],
}


# A tiny run of each trainer, given before the option under test (the last of an option counts): a value that is
# not refused trains for a second instead of a full default run.
TINY = {
    "ae": ["--data", "photos", "--limit", "4", "--epochs", "1", "--max-steps", "1"],
    "siamese": ["--data", "digits", "--limit", "20", "--epochs", "1", "--max-steps", "1"],
    "la": ["--data", "photos", "--limit", "4", "--image-size", "32", "--train-side", "32", "--epochs", "1",
           "--max-steps", "1"],
    "mpnn": ["--data", "photos", "--limit", "4", "--size", "32", "--levels", "1", "--level-steps", "1"],
}


def refused(capsys, name: str, argv: list[str], tmp_path) -> str:
    """Run train.<name>'s main on ``argv``; assert exit status 2, no traceback and no run folder; the stderr."""
    main = importlib.import_module(f"train.{name}").main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*TINY[name], "--no-progress", "--device", "cpu", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2, (e.value.code, err)
    assert "Traceback" not in err and not (tmp_path / "run").exists(), err
    return err


@pytest.mark.parametrize("name, option, value, expected",
                         [(n, *c) for n, cases in CASES.items() for c in cases],
                         ids=[f"{n} {c[0]} {c[1]}" for n, cases in CASES.items() for c in cases])
def test_out_of_range_numbers_are_refused_by_the_parser(name, option, value, expected, tmp_path, capsys):
    err = refused(capsys, name, [option, value], tmp_path)
    shown = "--background/--k" if option in ("--background", "--k") else option  # argparse names both spellings
    assert f"train.{name}: error: argument {shown}: expected {expected}, got '{value}'" in err, err


@pytest.mark.parametrize("name, argv, says", [
    ("la", ["--image-size", "30"], "--image-size must be a multiple of 8 for the conv backbone, got 30"),
    ("la", ["--arch", "vgg16bn", "--image-size", "24"], "--image-size must be at least 32 for vgg16bn"),
    ("ae", ["--image-size", "30"], "--image-size must be a multiple of 8 for the conv autoencoder, got 30"),
    ("ae", ["--arch", "vgg16bn", "--image-size", "24"], "--image-size must be at least 32 for vgg16bn"),
    ("mpnn", ["--size", "32", "--levels", "4"], "--size 32 with --levels 4 leaves the last level 2x2 maps; "
                                                 "expected at least 16 values per map"),
])
def test_options_that_do_not_fit_together_are_refused_by_the_parser(name, argv, says, tmp_path, capsys):
    err = refused(capsys, name, argv, tmp_path)
    assert f"train.{name}: error: {says}" in err, err


def test_the_bounds_themselves_are_accepted():
    from train import ae, la, siamese

    cfg, _ = la.parse_config(["--warmup-epochs", "0", "--eval-every", "0", "--mixing-rate", "1", "--hue", "0.5",
                              "--jitter", "0", "--holdout", "0", "--lr", "0", "--center-crop", "1",
                              "--batch-size", "2"])
    got = (cfg.warmup_epochs, cfg.mixing_rate, cfg.hue, cfg.holdout, cfg.lr, cfg.center_crop, cfg.batch_size)
    assert got == (0, 1.0, 0.5, 0.0, 0.0, 1.0, 2)
    cfg, _ = ae.parse_config(["--batch-size", "2", "--epochs", "1", "--limit", "1", "--weight-decay", "0"])
    assert (cfg.batch_size, cfg.epochs, cfg.limit, cfg.weight_decay) == (2, 1, 1, 0.0)
    cfg, _ = siamese.parse_config(["--batch-size", "2", "--image-size", "8", "--margin", "0.01"])
    assert (cfg.batch_size, cfg.image_size, cfg.margin) == (2, 8, 0.01)


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_trainers_wait_passively_unless_the_user_chose(given, expected):
    """torch's and numba's OpenMP pools spin against each other in one training process (train/__init__.py):
    importing the trainers sets passive waiting before either runtime loads, and keeps a value the user set."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys; import train.la; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [expected, "True"]
