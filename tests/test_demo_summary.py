"""demo.py's summary shows each model's real evaluation, read from the metrics.json its trainer wrote.

Runs: the tiny trainings of tests/trained_models.py (the five demo models), plus three tiny runs that reach
what those do not: an MPNN run that completes on the whole embedded bikes.mp4 (evaluation with cut recall) and
LA / autoencoder runs on labelled digits (1-NN accuracy). Oracle: the numbers in each metrics.json, read here with
json, and which of them each model's line must carry (the keys below).
"""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

import demo
from trained_models import TINY, ModelCache

pytestmark = pytest.mark.slow

# model -> (label in the summary, path of its number in metrics.json) that the line must carry when present
SHOWN = {
    "mpnn": [("mean max|cos|", ("eval", "per_level", -1, "mean_max_cos")),
             ("cut recall@5", ("eval", "consecutive_frames", "cut_recall_at_5")), ("stopped at step", ("steps",))],
    "siamese": [("pair accuracy", ("pair_accuracy",)), ("1-NN", ("knn1_accuracy",)),
                ("1-NN raw pixels", ("knn1_raw_pixels",))],
    "ae-conv": [("held-out MSE", ("test_mse",)), ("1-NN", ("knn1_accuracy",))],
    "ae-vgg16bn": [("held-out MSE", ("test_mse",))],
    "la": [("1-NN", ("knn1_accuracy",)), ("NMI", ("kmeans_nmi",)), ("1-NN raw pixels", ("knn1_accuracy_raw_pixels",))],
}
EXTRA = {  # (run folder, model whose keys apply, trainer, argv)
    "mpnn-bikes": ("mpnn", "train.mpnn", ["--size", "32", "--levels", "1", "--level-steps", "1", "--window", "1",
                                          "--init-frames", "2", "--shuffle-window", "1"]),
    "la-digits": ("la", "train.la", ["--data", "digits", "--limit", "30", "--image-size", "16", "--train-side", "16",
                                     "--max-steps", "1"]),
    "ae-digits": ("ae-conv", "train.ae", ["--data", "digits", "--limit", "30", "--image-size", "16",
                                          "--code-dim", "32", "--max-steps", "1"]),
}


def at(metrics: dict, path: tuple):
    v = metrics
    for k in path:
        if isinstance(k, int):
            if not isinstance(v, list) or not v:
                return None
        elif not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def shown(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def check_line(line: str, model: str, metrics: dict) -> int:
    """Assert ``line`` carries every number of SHOWN[model] that ``metrics`` holds; returns how many."""
    found = 0
    for label, path in SHOWN[model]:
        v = at(metrics, path)
        if v is None or (label == "stopped at step" and metrics.get("complete")):
            continue
        want = f"{label} {shown(v)}"
        assert want in line, (want, line)
        found += 1
    return found


@pytest.fixture(scope="module")
def out(request, tmp_path_factory):
    """A demo output folder whose runs/ holds the tiny runs of the five demo models and the three extra ones."""
    cache = ModelCache(request.config.cache.mkdir("lookalike-tiny-models"))
    out = tmp_path_factory.mktemp("demo")
    for name in TINY:
        shutil.copytree(cache.run(name), out / "runs" / name)
    for folder, (_, module, argv) in EXTRA.items():
        importlib.import_module(module).main(
            [*argv, "--epochs", "1", "--no-progress", "--device", "cpu", "--seed", "0",
             "--out", str(out / "extra" / folder)])
    return out


def test_every_demo_model_has_a_tiny_run_here():
    assert sorted(name for name, _, _ in demo.TRAINING) == sorted(TINY) == sorted(SHOWN)


def test_the_summary_lines_carry_the_numbers_in_each_metrics_json(out):
    training = demo.trained(out, {"la": 12.0})
    assert sorted(training) == sorted(TINY)
    lines = demo.training_lines(training)
    assert len(lines) == len(TINY)
    for line, (name, r) in zip(lines, training.items()):
        written = json.loads((out / "runs" / name / "metrics.json").read_text())
        assert r["metrics"] == written  # what the trainer wrote, not what its main returned
        assert line.startswith(f"  trained {name} ")
        assert (" in    12 s " in line) == (name == "la"), line
        found = check_line(line, name, written)
        if name == "la":  # photos: no labels, so the training loss is all there is
            assert found == 0 and f"final loss (no labels) {shown(written['loss_per_epoch'][-1])}" in line, line
        else:
            assert found >= 1, line
        if name == "mpnn":  # the tiny run stops after 2 steps: no evaluation, but how far its levels got
            assert not written["complete"]
            reached = sum(lv["reached"] for lv in written["per_level"])
            assert f"levels reached {reached}/{written['levels']}" in line, line


@pytest.mark.parametrize("folder", sorted(EXTRA))
def test_complete_and_labelled_runs_show_their_evaluation(out, folder):
    model = EXTRA[folder][0]
    written = json.loads((out / "extra" / folder / "metrics.json").read_text())
    line = demo.headline(written)
    labelled = {"mpnn-bikes": ["mean max|cos|", "cut recall@5"], "la-digits": ["1-NN", "NMI", "1-NN raw pixels"],
                "ae-digits": ["held-out MSE", "1-NN"]}[folder]
    assert check_line(line, model, written) == len(labelled), line
    for label in labelled:
        assert f"{label} " in line
    if folder == "mpnn-bikes":
        assert written["eval"]["consecutive_frames"]["cut_recall_at_5"] is not None and "stopped" not in line


def test_skip_training_summarises_the_run_folders_already_there(out, tmp_path):
    shutil.copytree(out / "runs" / "siamese", tmp_path / "runs" / "siamese")
    training = demo.trained(tmp_path)
    assert list(training) == ["siamese"] and training["siamese"]["seconds"] is None
    (line,) = demo.training_lines(training)
    written = json.loads((tmp_path / "runs" / "siamese" / "metrics.json").read_text())
    assert check_line(line, "siamese", written) >= 1 and " in " not in line, line


def test_the_printed_summary_carries_them(out):
    # the whole summary as main() prints it; the search and stream parts are as those steps report them
    training = {name: {"seconds": 3.0, "metrics": json.loads((out / "runs" / name / "metrics.json").read_text())}
                for name, _, _ in demo.TRAINING}
    report = {"seconds": 60.0, "training": training, "search": {"indexed": 22, "k": 5, "picture": "search.png"},
              "stream": {"report": {"frames": 250, "fps": 90.0, "transitions": [{}] * 5, "shots": [{}] * 6}}}
    text = demo.summary(report, out)
    for name, r in training.items():
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"  trained {name} ")]
        if name == "la":
            assert f"final loss (no labels) {shown(r['metrics']['loss_per_epoch'][-1])}" in line, line
        else:
            assert check_line(line, name, r["metrics"]) >= 1, line
    assert "22 photos indexed" in text and "5 transitions, 6 shots" in text
