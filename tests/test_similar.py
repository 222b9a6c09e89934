"""What "similar" means (train.la --similar): the copy-detection augmentations against OpenCV, the preset's
settings and their overrides, and the preset carried from a run through the exported model to the engine."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest
import torch

from train.augment import augment, down_up, gaussian_blur, rotate


def _smooth(rng, h, w, c=3) -> np.ndarray:
    """A float32 (h, w, c) picture in [0, 1] with structure at every scale a test looks at."""
    return cv2.GaussianBlur(rng.random((h, w, c)).astype(np.float32), (0, 0), 1.5).reshape(h, w, c)


def _batch(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([im.transpose(2, 0, 1) for im in images]).copy())  # (b, c, h, w)


def _image(x: torch.Tensor, i: int) -> np.ndarray:
    return x[i].numpy().transpose(1, 2, 0)


# --------------------------------------------------------------------------------------------------
# the edits against OpenCV, one parameter per image of the batch


def test_rotate_matches_opencv_warp_affine_per_image():
    rng = np.random.default_rng(0)
    images = [_smooth(rng, 24, 32) for _ in range(4)]  # not square: the aspect ratio must not shear the turn
    angles = [10.0, -7.5, 90.0, 0.0]
    got = rotate(_batch(images), torch.tensor(angles))
    assert got.shape == (4, 3, 24, 32) and got.dtype == torch.float32
    for i, (im, deg) in enumerate(zip(images, angles)):
        m = cv2.getRotationMatrix2D(((32 - 1) / 2, (24 - 1) / 2), deg, 1.0)  # about the pixel grid's centre
        want = cv2.warpAffine(im, m, (32, 24), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        np.testing.assert_allclose(_image(got, i), want, atol=1e-5, err_msg=f"rotation by {deg} degrees")
    np.testing.assert_allclose(_image(got, 3), images[3], atol=1e-6)  # 0 degrees: unchanged
    with pytest.raises(ValueError, match=r"degrees must have shape \(4,\)"):
        rotate(_batch(images), torch.tensor([1.0]))


def test_rotate_turns_a_known_picture_counter_clockwise():
    # a bright column right of the centre, turned 90 degrees counter-clockwise, is a bright row above it
    img = np.zeros((9, 9, 1), np.float32)
    img[:, 6] = 1.0
    got = rotate(_batch([img]), torch.tensor([90.0]))[0, 0].numpy()
    want = np.zeros((9, 9), np.float32)
    want[2, :] = 1.0
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gaussian_blur_matches_opencv_per_image():
    rng = np.random.default_rng(1)
    images = [_smooth(rng, 20, 28) for _ in range(3)]
    sigmas = [0.5, 1.3, 2.0]
    got = gaussian_blur(_batch(images), torch.tensor(sigmas))
    r = int(np.ceil(3 * max(sigmas)))  # one kernel radius for the batch: the largest sigma's
    for i, (im, s) in enumerate(zip(images, sigmas)):
        want = cv2.GaussianBlur(im, (2 * r + 1, 2 * r + 1), s, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(_image(got, i), want, atol=1e-5, err_msg=f"sigma {s}")
    with pytest.raises(ValueError, match="positive"):
        gaussian_blur(_batch(images), torch.tensor([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("factor", [0.5, 0.25])
def test_down_up_matches_opencv_area_then_linear(factor):
    im = _smooth(np.random.default_rng(2), 24, 32)
    small = (round(32 * factor), round(24 * factor))
    want = cv2.resize(cv2.resize(im, small, interpolation=cv2.INTER_AREA), (32, 24), interpolation=cv2.INTER_LINEAR)
    got = down_up(_batch([im]), factor)
    np.testing.assert_allclose(_image(got, 0), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"factor must be in \(0, 1\], got 1.5"):
        down_up(_batch([im]), 1.5)


def _pooled(im: np.ndarray, h: int, w: int) -> np.ndarray:
    """Adaptive average pooling by loops: output cell (i, j) is the mean of input rows
    [floor(i H / h), ceil((i + 1) H / h)) and the same for columns."""
    big_h, big_w = im.shape[:2]
    out = np.zeros((h, w, im.shape[2]), np.float64)
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * big_h) // h, -((-(i + 1) * big_h) // h)
            c0, c1 = (j * big_w) // w, -((-(j + 1) * big_w) // w)
            out[i, j] = im[r0:r1, c0:c1].mean(axis=(0, 1))
    return out.astype(np.float32)


def test_down_up_by_a_fraction_pools_whole_pixels_then_enlarges_bilinearly():
    im = _smooth(np.random.default_rng(5), 24, 32)
    want = cv2.resize(_pooled(im, 7, 10), (32, 24), interpolation=cv2.INTER_LINEAR)  # 0.3 of 24 x 32
    np.testing.assert_allclose(_image(down_up(_batch([im]), 0.3), 0), want, atol=1e-5)


def test_augment_with_the_copy_edits_keeps_a_constant_image_and_is_reproducible():
    img = torch.from_numpy(np.full((6, 20, 20, 3), (200, 100, 50), np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    kw = dict(out_size=16, mean=mean, std=std, jitter=0.0, rotation=30.0, blur=1.0, downscale=1.0)
    x = augment(img, generator=torch.Generator().manual_seed(0), **kw)
    want = (np.array([200, 100, 50]) / 255.0 - mean) / std  # a flat picture stays flat under every edit
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(want[None, :, None, None], x.shape), atol=1e-5)
    rnd = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8))
    a = augment(rnd, generator=torch.Generator().manual_seed(5), **kw)
    b = augment(rnd, generator=torch.Generator().manual_seed(5), **kw)
    plain = augment(rnd, generator=torch.Generator().manual_seed(5), **{**kw, "rotation": 0.0, "blur": 0.0,
                                                                         "downscale": 0.0})
    assert torch.equal(a, b) and not torch.allclose(a, plain)


def test_augment_without_the_copy_edits_draws_what_it_drew_before_them():
    # rotation / blur / downscale at 0 draw no random numbers: views (and the generator after them) are those of
    # a call that does not name them, so runs of the content preset repeat earlier runs exactly
    rnd = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8))
    kw = dict(out_size=12, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2), jitter=0.4, hue=0.1, grayscale=0.3)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = augment(rnd, generator=g1, **kw)
    b = augment(rnd, generator=g2, rotation=0.0, blur=0.0, downscale=0.0, **kw)
    assert torch.equal(a, b) and torch.equal(g1.get_state(), g2.get_state())


# --------------------------------------------------------------------------------------------------
# the preset on the command line


def test_content_is_the_default_and_leaves_every_data_sets_settings_as_they_were():
    from dataclasses import asdict

    from train.la import DATA_DEFAULTS, parse_config

    for data in ("photos", "fungi", "cifar10", "digits"):
        plain = asdict(parse_config(["--data", data])[0])
        content = asdict(parse_config(["--data", data, "--similar", "content"])[0])
        assert plain == content and plain["similar"] == "content"
        assert {k: plain[k] for k in DATA_DEFAULTS[data]} == DATA_DEFAULTS[data]
        assert (plain["rotation"], plain["blur"], plain["downscale"]) == (0.0, 0.0, 0.0)


def test_copies_preset_sets_its_augmentations_and_explicit_options_override_it():
    from train.la import SIMILAR, parse_config

    from train.la import DATA_DEFAULTS

    cfg, _ = parse_config(["--data", "fungi", "--similar", "copies"])
    preset = SIMILAR["copies"]
    for k, v in preset.items():
        if k not in ("warmup_epochs", "epochs_factor"):
            assert getattr(cfg, k) == v, f"{k}: preset {v!r}, config {getattr(cfg, k)!r}"
    assert cfg.similar == "copies" and cfg.rotation > 0 and cfg.blur > 0 and cfg.downscale > 0
    assert cfg.epochs == DATA_DEFAULTS["fungi"]["epochs"] * preset["epochs_factor"]
    assert cfg.warmup_epochs == cfg.epochs  # instance recognition throughout
    cfg, _ = parse_config(["--data", "fungi", "--similar=copies", "--blur", "0", "--epochs", "7", "--crop-scale", "0.6"])
    assert (cfg.blur, cfg.epochs, cfg.warmup_epochs, cfg.crop_scale) == (0.0, 7, 7, 0.6)
    assert cfg.rotation == preset["rotation"]
    cfg, _ = parse_config(["--similar", "copies", "--warmup-epochs", "3"])
    assert cfg.warmup_epochs == 3


def test_unknown_preset_is_refused_naming_the_choices(capsys):
    from train.la import main

    with pytest.raises(SystemExit) as e:
        main(["--similar", "styles"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--similar: invalid choice: 'styles'" in err and "'copies'" in err


# --------------------------------------------------------------------------------------------------
# a tiny run: the preset's augmentations are applied, recorded, exported and read back by the engine

TINY = ["--data", "digits", "--limit", "40", "--image-size", "16", "--train-side", "16", "--code-dim", "32",
        "--batch-size", "16", "--kmeans-k", "4", "--background", "20", "--no-progress"]


def test_copies_run_applies_its_augmentations_and_the_exported_model_says_copies(tmp_path, monkeypatch, capsys):
    from engine import Encoder
    from engine.modelfile import KEY_SIMILAR, KEY_TRAINING
    from export import verify
    from export.onnx import export_run
    from train import la

    seen = []
    real = la.augment

    def recording(images, **kw):  # the real augmentation, its settings noted
        seen.append({k: v for k, v in kw.items() if k != "generator"})
        return real(images, **kw)

    monkeypatch.setattr(la, "augment", recording)
    la.main(TINY + ["--similar", "copies", "--epochs", "1", "--max-steps", "2", "--out", str(tmp_path / "run")])
    assert len(seen) == 2
    preset = la.SIMILAR["copies"]
    for k in ("crop_scale", "jitter", "hue", "grayscale", "rotation", "blur", "downscale"):
        assert seen[0][k] == preset[k], f"{k}: preset {preset[k]!r}, augment got {seen[0][k]!r}"
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["similar"] == "copies" and config["warmup_epochs"] == 1 and config["rotation"] == preset["rotation"]

    images, source = verify.real_images(4)
    export_run(tmp_path / "run", tmp_path / "models", name="la", images=images, image_source=source,
               allow_incomplete=True, log=lambda *_: None)
    path = tmp_path / "models" / "la.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta[KEY_SIMILAR] == "copies"
    assert json.loads(meta[KEY_TRAINING])["config"]["config"]["similar"] == "copies"  # config.json as written
    with pytest.warns(Warning, match="incomplete"):
        enc = Encoder(path)
    assert enc.info.similar == enc.similar == "copies" and "similar: copies" in enc.describe
    assert enc.info.extra[KEY_SIMILAR] == "copies"


def test_models_without_the_key_read_as_unrecorded_and_a_damaged_value_is_refused():
    from engine.errors import ModelError
    from engine.modelfile import KEY_SIMILAR, ModelInfo, model_metadata
    from engine.preprocess import Preprocess

    meta = model_metadata("la", arch="la", dim=8, preprocess=Preprocess(size=(16, 16)), checkpoint_sha256="0" * 64)
    meta["lookalike.sha256"] = "a" * 64
    assert KEY_SIMILAR not in meta and ModelInfo.from_metadata(meta, "m.onnx").similar == ""
    meta[KEY_SIMILAR] = "copies"
    assert ModelInfo.from_metadata(meta, "m.onnx").similar == "copies"
    meta[KEY_SIMILAR] = "x" * 65
    with pytest.raises(ModelError, match=f"m.onnx: metadata {KEY_SIMILAR} must be a short printable word"):
        ModelInfo.from_metadata(meta, "m.onnx")
    with_key = model_metadata("la", arch="la", dim=8, preprocess=Preprocess(size=(16, 16)),
                              checkpoint_sha256="0" * 64, similar="content")
    assert with_key[KEY_SIMILAR] == "content"
