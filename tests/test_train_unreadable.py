"""The four trainers on a folder of real photographs holding unreadable image files: training skips them (a
warning names each), finishes, and lists exactly those files in metrics.json; too few readable images left is a
clear command-line refusal. Oracle: the files this test broke on purpose, and the photos it copied."""

from __future__ import annotations

import importlib
import json

import pytest

from resume_check import cli_error
from test_data import bad_images, real_photos

TINY = ["--epochs", "1", "--no-progress", "--device", "cpu", "--seed", "0"]
TRAINERS = {
    "ae": ["--arch", "conv", "--max-steps", "1"],
    "la": ["--image-size", "32", "--train-side", "32", "--max-steps", "1"],
    "siamese": ["--max-steps", "1", "--test-pairs", "8"],
    "mpnn": ["--size", "32", "--levels", "1", "--level-steps", "1", "--window", "1", "--init-frames", "2"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of three real photographs each, plus a truncated JPEG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("photos")
    good = real_photos(root / "a", ["coins.png", "moon.png", "rocket.jpg"])
    good += real_photos(root / "b", ["chelsea.png", "coffee.png", "flower.jpg"])
    bad = bad_images(root / "a", ["cut.jpg"]) + bad_images(root / "b", ["notes.jpg"])
    return root, good, bad


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_training_skips_unreadable_images_and_lists_them_in_metrics(name, folder, tmp_path, capsys):
    root, good, bad = folder
    out = tmp_path / "run"
    capsys.readouterr()
    returned = importlib.import_module(f"train.{name}").main(
        ["--data", "folder", "--data-root", str(root), *TRAINERS[name], *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "checkpoint.pt").is_file()
    assert [d["path"] for d in metrics["skipped_images"]] == [str(p) for p in bad]
    assert all("could not decode" in d["reason"] for d in metrics["skipped_images"]), metrics["skipped_images"]
    assert returned["skipped_images"] == metrics["skipped_images"]
    for p in bad:
        assert f"warning: skipped {p}: " in err, err
    # every readable photo was trained on
    n = metrics["items_per_pass"] if name == "mpnn" else metrics["n_train"] + metrics["n_test"]
    assert n == len(good)


def test_a_clean_data_set_lists_no_skipped_images(tmp_path):
    from train.ae import main

    metrics = main(["--data", "photos", "--limit", "4", "--max-steps", "1", *TINY, "--out", str(tmp_path)])
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_images"] == metrics["skipped_images"] == []


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_too_few_readable_images_left_is_refused_naming_the_skipped(name, tmp_path, capsys):
    # one readable photo per class is too few for every trainer but the MPNN; nothing readable is too few for all
    real_photos(tmp_path / "a", ["coins.png"])
    real_photos(tmp_path / "b", ["moon.png"])
    cut, text = bad_images(tmp_path / "a")
    main = importlib.import_module(f"train.{name}").main
    if name != "mpnn":
        cli_error(capsys, lambda: main(["--data", "folder", "--data-root", str(tmp_path), *TRAINERS[name], *TINY,
                                        "--out", str(tmp_path / "run")]),
                  "2 unreadable image file(s) skipped", str(cut), str(text))
    only_bad = tmp_path / "bad"
    bad_images(only_bad / "a")
    cli_error(capsys, lambda: main(["--data", "folder", "--data-root", str(only_bad), *TRAINERS[name], *TINY,
                                    "--out", str(tmp_path / "run2")]),
              "none of the 2 image files could be read", str(only_bad / "a" / "cut.jpg"))
    if name != "mpnn":  # the MPNN opens its run folder before it reads the data
        assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()
