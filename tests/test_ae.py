"""Autoencoders: the SegNet decoder's unpooling, backbones, and tiny training runs of train.ae."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from resume_check import bad_data_and_damaged_checkpoint_exit_2, cli_error, split_run_equals_whole
from train import ae as trainer
from train.checkpoint import CheckpointError, load_checkpoint
from train.models import ae as models
from train.registry import build_encoder, load_encoder

# torch flags max_unpool2d as nondeterministic (true on CUDA); these tests run on the CPU, where it is not
pytestmark = pytest.mark.filterwarnings("ignore:max_unpooling2d_forward_out does not have a deterministic")


def test_segnet_reconstructs_the_input_shape_odd_sizes():
    torch.manual_seed(0)
    net = models.SegNetAutoencoder().eval()
    for h, w in ((32, 32), (45, 70)):  # 45 and 70 are not multiples of 32: pools floor, unpools restore
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            assert net(x).shape == (2, 3, h, w)
    last = net.decoder.stages[-1]
    assert isinstance(last[-1], nn.ConvTranspose2d) and last[-1].out_channels == 3  # no norm / ReLU at the end
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in net.decoder.modules()) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.decoder.modules()) == 12


def test_segnet_unpooling_uses_the_encoders_indices():
    torch.manual_seed(1)
    net = models.SegNetAutoencoder().eval()
    x = torch.randn(1, 3, 40, 36)
    calls = []
    net.decoder.unpool.register_forward_hook(lambda m, args, out: calls.append((args[0], args[1], out)))
    with torch.no_grad():
        net(x)
        _, indices, sizes = net.encoder.encode(x, with_indices=True)
    assert len(calls) == 5
    for (inp, idx, out), enc_idx, size in zip(calls, reversed(indices), reversed(sizes)):
        assert torch.equal(idx, enc_idx)  # the decoder got the encoder's argmax indices, in mirror order
        assert tuple(out.shape[-2:]) == tuple(size)
        # oracle: unpooling writes each value at its index of the (h*w) plane and zeros elsewhere
        ref = torch.zeros(out.shape[0], out.shape[1], out.shape[2] * out.shape[3])
        ref.scatter_(2, idx.flatten(2), inp.flatten(2))
        assert torch.equal(out.flatten(2), ref)


def test_backbones_shapes_and_registered_encoders_are_unit_vectors():
    torch.manual_seed(0)
    vgg, d = models.build_backbone("vgg16bn")
    assert d == 512
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        f = vgg.eval()(x)
        assert f.shape == (2, 512)
        torch.testing.assert_close(f, vgg.encode(x).mean(dim=(2, 3)))
    conv, d = models.build_backbone("conv")
    assert d == 1000
    with torch.no_grad():
        assert conv.eval()(torch.randn(3, 3, 32, 32)).shape == (3, 1000)
    for arch, size in (("ae-conv", 32), ("ae-vgg16bn", 32)):
        enc = build_encoder(arch).eval()
        with torch.no_grad():
            e = enc(torch.randn(3, 3, size, size))
        torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="backbone kind must be one of"):
        models.build_backbone("resnet")
    with pytest.raises(ValueError, match=r"expects \(n, 3, 32, 32\)"):
        conv(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(n, 3, H, W\)"):
        vgg(torch.zeros(1, 1, 64, 64))


def test_pretrained_weights_unavailable_warns_and_continues(monkeypatch, capsys):
    import torchvision

    def no_network(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16_bn", lambda weights=None, **k:
                        no_network() if weights is not None else torchvision.models.VGG(
                            torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)))
    m, d = models.build_backbone("vgg16bn", pretrained=True)
    assert d == 512 and isinstance(m.features, nn.Sequential)
    err = capsys.readouterr().err
    assert "cannot be had" in err and "random initialisation" in err


def test_recalibrate_batchnorm_sets_population_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    net = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(24, 3, 6, 6) * 3 + 1
    net.eval()
    trainer.recalibrate_batchnorm(net, x, 8, "cpu")  # three equal batches of 8
    assert not net.training and net[1].momentum == 0.1  # mode and momentum restored
    with torch.no_grad():
        y = conv(x)  # (24, 4, 4, 4)
    torch.testing.assert_close(net[1].running_mean, y.mean(dim=(0, 2, 3)))
    # running_var: the average of the three batches' unbiased variances
    want = torch.stack([y[i : i + 8].transpose(0, 1).reshape(4, -1).var(dim=1) for i in (0, 8, 16)]).mean(0)
    torch.testing.assert_close(net[1].running_var, want)


def test_batches_drop_a_short_tail():
    order = torch.arange(18)
    assert [len(b) for b in trainer.batches(order, 8, None)] == [8, 8]  # 2 < 8 // 2: dropped
    assert [len(b) for b in trainer.batches(torch.arange(13), 8, None)] == [8, 5]
    assert [len(b) for b in trainer.batches(torch.arange(1), 8, None)] == [1]  # never empty
    assert [len(b) for b in trainer.batches(torch.arange(40), 8, 2)] == [8, 8]


# -- the trainer ----------------------------------------------------------------------------------------

TINY = ["--arch", "conv", "--data", "digits", "--image-size", "16", "--code-dim", "24", "--no-progress"]


def test_conv_training_loss_decreases_on_a_fixed_batch(tmp_path):
    # --limit <= --batch-size: every epoch is one step on the same 12 images
    m = trainer.main(TINY + ["--limit", "12", "--batch-size", "12", "--epochs", "6", "--lr", "0.003",
                             "--out", str(tmp_path)])
    losses = m["loss_per_epoch"]
    assert len(losses) == 6 and m["steps"] == 6
    assert losses[-1] < 0.9 * losses[0]
    assert (tmp_path / "reconstructions.png").is_file()
    for k in ("knn1_accuracy", "knn1_raw_pixels", "knn1_hsv_histogram"):
        assert 0.0 <= m[k] <= 1.0


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    base = TINY + ["--limit", "40", "--batch-size", "8", "--max-steps", "2"]
    full, resumed, a, b = split_run_equals_whole(trainer, base, tmp_path)
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    assert full["test_mse"] == resumed["test_mse"]
    with pytest.raises(SystemExit, match="other settings"):
        trainer.main(base + ["--epochs", "3", "--image-size", "24", "--resume", "--out", str(tmp_path / "part")])


def test_load_encoder_round_trip_and_backbone_state(tmp_path):
    trainer.main(TINY + ["--limit", "16", "--batch-size", "8", "--max-steps", "1", "--epochs", "1",
                         "--out", str(tmp_path)])
    enc, info = load_encoder(tmp_path)
    assert (info.name, info.arch, info.dim, info.preprocess.size) == ("ae-conv", "ae-conv", 24, (16, 16))
    images = np.random.default_rng(0).integers(0, 256, (5, 20, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(info.preprocess(images))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    full = models.build_autoencoder("conv", image_size=16, code_dim=24)
    full.load_state_dict(ckpt["model"])
    full.eval()
    backbone, d = models.build_backbone("conv", image_size=16, code_dim=24)
    backbone.load_state_dict(models.backbone_state_from_ae(tmp_path, "conv"))
    backbone.eval()
    with torch.no_grad():
        e = enc(x)
        torch.testing.assert_close(e, F.normalize(full.encoder(x), dim=1), rtol=0, atol=0)
        torch.testing.assert_close(e, F.normalize(backbone(x), dim=1), rtol=0, atol=0)
    assert e.shape == (5, 24) and d == 24
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    with pytest.raises(CheckpointError, match="needs an 'ae-vgg16bn' checkpoint"):
        models.backbone_state_from_ae(tmp_path, "vgg16bn")


def test_vgg16bn_trainer_runs_and_round_trips(tmp_path):
    m = trainer.main(["--arch", "vgg16bn", "--data", "digits", "--image-size", "32", "--limit", "4",
                      "--batch-size", "2", "--max-steps", "1", "--epochs", "1", "--no-progress",
                      "--out", str(tmp_path)])
    assert m["model"] == "ae-vgg16bn" and m["steps"] == 1 and m["test_mse"] > 0
    enc, info = load_encoder(tmp_path)
    assert info.dim == 512 and info.preprocess.mean == trainer.IMAGENET_MEAN
    x = torch.from_numpy(info.preprocess(np.zeros((2, 8, 8, 3), np.uint8) + 100))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    full = models.build_autoencoder("vgg16bn")
    full.load_state_dict(ckpt["model"])
    full.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), F.normalize(full.encoder(x), dim=1), rtol=0, atol=0)
    backbone, _ = models.build_backbone("vgg16bn")
    backbone.load_state_dict(models.backbone_state_from_ae(tmp_path / "checkpoint.pt", "vgg16bn"))


def test_missing_data_and_a_truncated_checkpoint_print_an_error_and_exit_2(tmp_path, capsys):
    bad_data_and_damaged_checkpoint_exit_2(capsys, trainer.main, tmp_path, "ae-conv", TINY + ["--limit", "8"])


def test_fewer_than_two_training_images_are_refused_up_front(tmp_path, capsys):
    # --limit 1: one training image (batch norm cannot train on it); refused before any model is built
    cli_error(capsys, lambda: trainer.main(TINY + ["--limit", "1", "--out", str(tmp_path / "a")]),
              "gave 1 training image(s)", "at least 2")
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as e:
        trainer.main(TINY + ["--limit", "8", "--batch-size", "1", "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    assert "argument --batch-size: expected an integer >= 2 (batch norm needs two images), got '1'" in \
        capsys.readouterr().err
    # two training images train
    m = trainer.main(TINY + ["--limit", "2", "--epochs", "1", "--out", str(tmp_path / "c")])
    assert (m["n_train"], m["steps"]) == (2, 1)


def test_help_names_the_run_folder_main_really_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option: no path broken at its hyphen
    with pytest.raises(SystemExit):
        trainer.parse_config(["--help"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("--out"))
    assert "runs/ae-conv" in line and "runs/ae-vgg16bn" in line and "runs/ae/" not in line, line
    monkeypatch.chdir(tmp_path)  # without --out, the run lands where the help said
    trainer.main(TINY + ["--limit", "2", "--epochs", "1"])
    assert (tmp_path / "runs" / "ae-conv" / "checkpoint.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ae-conv"]


def test_help_lists_datasets_and_arch_defaults(capsys):
    with pytest.raises(SystemExit):
        trainer.parse_config(["--arch", "vgg16bn", "--help"])
    out = capsys.readouterr().out
    assert "photos" in out and "cifar10" in out and "--pretrained" in out
    cfg, _ = trainer.parse_config(["--arch", "vgg16bn"])
    assert (cfg.image_size, cfg.epochs) == (trainer.ARCH_DEFAULTS["vgg16bn"]["image_size"],
                                            trainer.ARCH_DEFAULTS["vgg16bn"]["epochs"])
    cfg, _ = trainer.parse_config([])
    assert (cfg.arch, cfg.data, cfg.image_size) == ("conv", "photos", 32)
