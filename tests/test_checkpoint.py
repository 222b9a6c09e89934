"""Checkpoints hold no code: a crafted checkpoint (valid digests, an object whose unpickling calls os.system) is
refused by load_checkpoint, export and every trainer's --resume / --init-from before anything in it runs; what
the trainers write loads with torch's own weights-only reader; version 1 checkpoints (numpy arrays inside)
still load, and an LA run resumes from one exactly as from its version 2 twin."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.fileio import write_framed
from resume_check import cli_error
from train.checkpoint import MAGIC, CheckpointError, load_checkpoint, read_header, save_checkpoint
from trained_models import ModelCache
from train.registry import MODEL_NAMES


class Touch:
    """Unpickling this runs ``touch PATH``: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def crafted(folder, marker, *, name="la", version=1):
    """``folder/checkpoint.pt`` framed like the project's own (header digests recomputed), whose payload runs
    ``touch marker`` when unpickled without restriction. Version 1 by default: the format lookalike read with
    ``weights_only=False`` and still reads (with numpy's array reconstruction allowed besides)."""
    buf = io.BytesIO()
    torch.save({"name": name, "config": {}, "epoch": 1, "step": 1, "hook": Touch(marker)}, buf)
    path = folder / "checkpoint.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_framed(path, MAGIC, {"version": version}, buf.getvalue())
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_load_checkpoint_refuses_a_crafted_checkpoint_before_it_runs(tmp_path, version):
    marker = tmp_path / "PWNED"
    path = crafted(tmp_path / "run", marker, version=version)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert not marker.exists()
    msg = str(e.value)
    assert str(path) in msg and "posix.system" in msg and "could run code" in msg, msg


def test_export_refuses_a_crafted_checkpoint(tmp_path, capsys):
    from export.__main__ import main as export_main

    marker = tmp_path / "PWNED"
    crafted(tmp_path / "runs" / "la", marker)
    rc = export_main(["la", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "models"), "--check-images", "2"])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert rc == 1 and "Traceback" not in err  # one model failed: listed, as any model's failure is
    assert err.startswith("error: la: ") and "posix.system" in err, err
    assert not list((tmp_path / "models").glob("*.onnx"))


LA_TINY = ["--data", "digits", "--limit", "24", "--image-size", "16", "--train-side", "16", "--code-dim", "16",
           "--batch-size", "8", "--warmup-epochs", "1", "--kmeans-k", "3", "--background", "10", "--no-progress"]
TRAINERS = {  # tiny runs of each trainer, --out and --resume added by the tests
    "la": ("train.la", [*LA_TINY, "--epochs", "1", "--max-steps", "1"]),
    "ae-conv": ("train.ae", ["--arch", "conv", "--data", "digits", "--image-size", "16", "--code-dim", "16",
                             "--limit", "16", "--epochs", "1", "--max-steps", "1", "--no-progress"]),
    "siamese": ("train.siamese", ["--data", "digits", "--image-size", "8", "--dim", "8", "--limit", "32",
                                  "--batch-size", "8", "--test-pairs", "20", "--epochs", "1", "--max-steps", "1",
                                  "--no-progress"]),
    "mpnn": ("train.mpnn", ["--size", "32", "--levels", "1", "--batch-size", "2", "--frame-step", "25",
                            "--init-frames", "2", "--window", "2", "--eval-limit", "4", "--level-steps", "1",
                            "--no-progress", "--device", "cpu"]),
}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_resume_refuses_a_crafted_checkpoint_with_error_and_exit_2(tmp_path, capsys, name):
    import importlib

    module, argv = TRAINERS[name]
    main = importlib.import_module(module).main
    marker = tmp_path / "PWNED"
    path = crafted(tmp_path / "run", marker, name=name)
    cli_error(capsys, lambda: main([*argv, "--out", str(tmp_path / "run"), "--resume"]), str(path), "posix.system")
    assert not marker.exists()
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run folder was touched


def test_la_init_from_refuses_a_crafted_checkpoint_with_error_and_exit_2(tmp_path, capsys):
    from train.la import main

    marker = tmp_path / "PWNED"
    path = crafted(tmp_path / "ae", marker, name="ae-conv")
    line = cli_error(capsys, lambda: main([*TRAINERS["la"][1], "--init-from", str(tmp_path / "ae"),
                                           "--out", str(tmp_path / "la")]), "--init-from", str(path), "posix.system")
    assert not marker.exists(), line


def test_save_checkpoint_refuses_what_a_weights_only_reader_would_refuse(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TypeError, match=r"payload\['extra'\]\['bad'\]: .*Touch cannot be stored"):
        save_checkpoint(path, {"name": "la", "extra": {"ok": np.zeros(3), "bad": Touch(tmp_path / "x")}})
    assert not path.exists()
    # numpy arrays and numbers become tensors and Python numbers; tuples stay tuples
    save_checkpoint(path, {"a": np.arange(3, dtype=np.uint32), "f": np.float64(0.25), "t": (1, "x", None)})
    got = load_checkpoint(path)
    assert torch.equal(got["a"], torch.tensor([0, 1, 2], dtype=torch.uint32))
    assert type(got["f"]) is float and got["f"] == 0.25 and got["t"] == (1, "x", None)


@pytest.fixture(scope="module")
def cache(request) -> ModelCache:
    return ModelCache(request.config.cache.mkdir("lookalike-tiny-models"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_trainers_checkpoint_loads_with_torchs_weights_only_reader(cache, name):
    header, body = read_header(cache.run(name) / "checkpoint.pt")
    assert header["version"] == 2
    payload = torch.load(io.BytesIO(body), weights_only=True)  # torch's own reader, nothing allowed besides
    assert payload["name"] == name and isinstance(payload["complete"], bool) and payload["progress"]


def _as_version_1(state: dict) -> bytes:
    """The payload as lookalike wrote it before format 2: numpy arrays for the RNG key, the bank and the
    clusters, no completeness keys."""
    old = {k: v for k, v in state.items() if k not in ("complete", "progress") and not k.startswith("_")}
    kind, key, *rest = old["numpy_rng"]
    old["numpy_rng"] = (kind, key.numpy(), *rest)
    extra = dict(old["extra"])
    for k in ("position", "cut_short_epochs"):
        extra.pop(k, None)
    extra["bank"] = {**extra["bank"], "vectors": extra["bank"]["vectors"].numpy()}
    extra["cluster_labels"] = extra["cluster_labels"].numpy()
    old["extra"] = extra
    buf = io.BytesIO()
    torch.save(old, buf)
    return buf.getvalue()


def test_a_version_1_checkpoint_loads_and_resumes_like_its_version_2_twin(tmp_path):
    from train.checkpoint import run_progress
    from train.la import main

    tiny = [*LA_TINY, "--epochs"]  # whole epochs of 3 steps
    main(tiny + ["2", "--out", str(tmp_path / "v2")])
    state = load_checkpoint(tmp_path / "v2" / "checkpoint.pt")
    body = _as_version_1(state)
    (tmp_path / "v1").mkdir()
    write_framed(tmp_path / "v1" / "checkpoint.pt", MAGIC, {"version": 1}, body)
    v1 = load_checkpoint(tmp_path / "v1" / "checkpoint.pt")
    reference = torch.load(io.BytesIO(body), weights_only=False)  # oracle: what it holds (trusted, written here)
    np.testing.assert_array_equal(v1["extra"]["bank"]["vectors"].numpy(), reference["extra"]["bank"]["vectors"])
    np.testing.assert_array_equal(v1["numpy_rng"][1].numpy(), reference["numpy_rng"][1])
    assert run_progress(v1) == (True, "2 of 2 epochs")  # version 1: inferred from the epochs and --max-steps
    for k in ("v1", "v2"):
        main(tiny + ["3", "--out", str(tmp_path / k), "--resume"])
    a, b = load_checkpoint(tmp_path / "v1" / "checkpoint.pt"), load_checkpoint(tmp_path / "v2" / "checkpoint.pt")
    assert a["step"] == b["step"] and a["extra"]["losses"] == b["extra"]["losses"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["extra"]["bank"]["vectors"], b["extra"]["bank"]["vectors"])


def test_run_progress_of_version_1_payloads():
    from train.checkpoint import run_progress

    assert run_progress({"name": "mpnn", "config": {"levels": 3}, "extra": {"level": 1}}) == (False, "1 of 3 levels")
    assert run_progress({"name": "mpnn", "config": {"levels": 3, "max_steps": 9}, "extra": {"level": 3}})[0]
    assert run_progress({"name": "la", "config": {"epochs": 4, "max_steps": None}, "epoch": 4}) == (True, "4 of 4 epochs")
    assert run_progress({"name": "la", "config": {"epochs": 4, "max_steps": 2}, "epoch": 4}) == (
        False, "4 of 4 epochs, each at most --max-steps 2 steps")
    assert run_progress({"name": "la", "complete": False, "progress": "words"}) == (False, "words")


def test_pretrained_vgg_weights_placed_in_the_hub_cache_cannot_run_code(tmp_path, monkeypatch, capsys):
    # --pretrained's warning tells users to place vgg16_bn-6c64b313.pth in torch.hub's cache, which torch.hub
    # loads (without checking its hash) with weights_only=False unless told otherwise
    from train.models.layers import _load_pretrained_vgg16bn

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "PWNED"
    torch.save({"features.0.weight": Touch(marker)}, tmp_path / "hub" / "checkpoints" / "vgg16_bn-6c64b313.pth")
    assert _load_pretrained_vgg16bn() is None  # refused: training goes on from random initialisation
    assert not marker.exists()
    assert "cannot be had" in capsys.readouterr().err
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.slow
def test_pretrained_vgg_weights_in_the_hub_cache_are_what_the_backbone_gets(tmp_path, monkeypatch, capsys):
    # --pretrained without a network: a file in torchvision's own format (vgg16_bn's full state dict, saved by
    # torch.save) placed where torchvision looks for its download goes through the real loading path (torch.hub
    # cache lookup, weights-only load, load_state_dict), and the backbone's layers hold exactly those weights
    import torchvision

    from train.models.layers import build_backbone

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(7)
    state = torchvision.models.vgg16_bn(weights=None).state_dict()
    name = Path(torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url).name
    torch.save(state, tmp_path / "hub" / "checkpoints" / name)
    model, dim = build_backbone("vgg16bn", pretrained=True)
    assert dim == 512
    assert "cannot be had" not in capsys.readouterr().err
    got = model.features.state_dict()
    want = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
