"""An incomplete run (stopped by --max-steps, epochs cut short by it, a signal) says so in its checkpoint and
metrics; export refuses it unless --allow-incomplete, and then records it in the ONNX metadata, and
engine.Encoder warns when it loads such a file. Files without the key load as complete, silently."""

import json
import warnings

import onnx
import pytest

from engine.encoder import Encoder
from export.__main__ import main as export_main
from train.checkpoint import load_checkpoint

KEY_COMPLETE, KEY_PROGRESS = "lookalike.complete", "lookalike.progress"  # the metadata contract
MPNN = ["--size", "32", "--batch-size", "2", "--frame-step", "25", "--init-frames", "2", "--window", "2",
        "--eval-limit", "4", "--no-progress", "--device", "cpu"]


def _metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_an_incomplete_run_is_refused_by_export_unless_allowed_and_the_engine_warns(tmp_path, capsys):
    from engine.encoder import IncompleteModelWarning
    from train.mpnn import main

    runs, models = tmp_path / "runs", tmp_path / "models"
    m = main(MPNN + ["--levels", "2", "--level-steps", "2", "--max-steps", "1", "--out", str(runs / "mpnn")])
    ckpt = load_checkpoint(runs / "mpnn" / "checkpoint.pt")
    progress = "0 of 2 levels trained, level 1 at step 1 of at most 2 (stopped by --max-steps 1)"
    assert not m["complete"] and ckpt["complete"] is False and ckpt["progress"] == progress

    capsys.readouterr()
    rc = export_main(["all", "--runs", str(runs), "--out", str(models), "--check-images", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.startswith(f"error: mpnn: {runs / 'mpnn' / 'checkpoint.pt'}: the mpnn run is incomplete "
                          f"({progress})"), err
    assert "--allow-incomplete" in err and "without --max-steps" in err
    assert not list(models.glob("*.onnx"))

    rc = export_main(["all", "--runs", str(runs), "--out", str(models), "--check-images", "4", "--allow-incomplete"])
    assert rc == 0, capsys.readouterr()
    path = models / "mpnn.onnx"
    meta = _metadata(path)
    assert (meta[KEY_COMPLETE], meta[KEY_PROGRESS]) == ("false", progress)
    entry = json.loads((models / "export_report.json").read_text())["models"]["mpnn"]
    assert (entry["complete"], entry["progress"]) == (False, progress)
    with pytest.warns(IncompleteModelWarning) as record:
        enc = Encoder(path)
    assert len(record) == 1
    text = str(record[0].message)
    assert str(path) in text and progress in text and "incomplete training run" in text, text
    assert enc.info.complete is False and enc.info.progress == progress


def test_a_complete_run_and_an_older_file_without_the_key_load_silently(tmp_path):
    from engine.encoder import IncompleteModelWarning
    from export.onnx import _seal
    from train.mpnn import main

    runs, models = tmp_path / "runs", tmp_path / "models"
    m = main(MPNN + ["--levels", "1", "--level-steps", "1", "--out", str(runs / "mpnn")])
    assert m["complete"] and load_checkpoint(runs / "mpnn" / "checkpoint.pt")["complete"] is True
    assert export_main(["mpnn", "--runs", str(runs), "--out", str(models), "--check-images", "4"]) == 0
    path = models / "mpnn.onnx"
    assert _metadata(path)[KEY_COMPLETE] == "true"
    # a file written before the key existed: the same model, the keys removed, sealed again
    proto = onnx.load(str(path))
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in (KEY_COMPLETE, KEY_PROGRESS)]
    del proto.metadata_props[:]
    for k, v in keep:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    older = tmp_path / "older.onnx"
    older.write_bytes(_seal(proto))
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteModelWarning)
        for p in (path, older):
            assert Encoder(p).info.complete is True
    assert KEY_COMPLETE not in _metadata(older)


AE = ["--arch", "conv", "--data", "digits", "--image-size", "16", "--code-dim", "16", "--limit", "16",
      "--batch-size", "4", "--epochs", "1", "--no-progress"]  # 16 training images: 4 steps an epoch
LA = ["--data", "digits", "--limit", "24", "--image-size", "16", "--train-side", "16", "--code-dim", "16",
      "--batch-size", "8", "--warmup-epochs", "1", "--kmeans-k", "3", "--background", "10", "--epochs", "2",
      "--no-progress"]  # 3 steps an epoch


@pytest.mark.parametrize("trainer, argv, steps", [("train.ae", AE, 4), ("train.la", LA, 3)])
def test_epochs_cut_short_by_max_steps_make_an_epoch_run_incomplete(tmp_path, trainer, argv, steps):
    import importlib

    main = importlib.import_module(trainer).main
    epochs = int(argv[argv.index("--epochs") + 1])
    whole = main(argv + ["--max-steps", str(steps), "--out", str(tmp_path / "whole")])  # cuts nothing
    cut = main(argv + ["--max-steps", str(steps - 1), "--out", str(tmp_path / "cut")])
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (a["complete"], a["progress"]) == (True, f"{epochs} of {epochs} epochs")
    assert (whole["complete"], whole["progress"]) == (True, a["progress"])
    plural = "s" if epochs > 1 else ""
    words = f"{epochs} of {epochs} epochs; {epochs} epoch{plural} cut short by --max-steps {steps - 1}"
    assert (b["complete"], b["progress"]) == (False, words)
    assert (cut["complete"], cut["progress"]) == (False, words)
