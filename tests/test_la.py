"""Local Aggregation: the loss and neighbour sets against slow explicit-loop references, the bank update order,
exact resume, and the encoder's round trip through a checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.memory_bank import MemoryBank
from train.models.la import LAEncoder, LocalAggregation, background_neighbours, close_neighbours, la_loss

TAU = 0.07


# --------------------------------------------------------------------------------------------------
# slow references


def ref_set_loss(scores: np.ndarray, close: np.ndarray) -> float:
    """mean_i -log(sum_{j close} exp(s_ij) / sum_j exp(s_ij)), explicit loops in float64 (shifted by the max)."""
    total = 0.0
    for i in range(scores.shape[0]):
        top = max(scores[i])
        num = 0.0
        den = 0.0
        for j in range(scores.shape[1]):
            e = math.exp(float(scores[i, j]) - top)
            den += e
            if close[i, j]:
                num += e
        total += -math.log(num / den)
    return total / scores.shape[0]


def ref_background(bank: np.ndarray, code: np.ndarray, row: int, k: int) -> list[int]:
    """The row itself, then its min(k, n-1) nearest other rows by cosine (ties: lower index first)."""
    n = len(bank)
    q = code / np.linalg.norm(code)
    sims = [(float(np.dot(bank[j].astype(np.float64), q)), j) for j in range(n) if j != row]
    sims.sort(key=lambda t: (-t[0], t[1]))
    return [row] + [j for _, j in sims[: min(k, n - 1)]]


def ref_close(labels: np.ndarray, row: int, members: list[int]) -> list[bool]:
    out = []
    for j in members:
        same = j == row
        for run in range(labels.shape[0]):
            if labels[run, j] == labels[run, row]:
                same = True
        out.append(same)
    return out


def ref_la_loss(bank: np.ndarray, codes: np.ndarray, rows, labels: np.ndarray, k: int, tau: float = TAU) -> float:
    """-log(P(C ∩ B | v) / P(B | v)) averaged over the batch, every set built by explicit loops."""
    total = 0.0
    for i, row in enumerate(rows):
        members = ref_background(bank, codes[i], int(row), k)
        close = ref_close(labels, int(row), members)
        s = [float(np.dot(bank[j].astype(np.float64), codes[i].astype(np.float64))) / tau for j in members]
        top = max(s)
        p_b = sum(math.exp(x - top) for x in s)
        p_cb = sum(math.exp(x - top) for x, c in zip(s, close) if c)
        total += -math.log(p_cb / p_b)
    return total / len(rows)


def ref_ir_loss(bank: np.ndarray, codes: np.ndarray, rows, tau: float = TAU) -> float:
    total = 0.0
    for i, row in enumerate(rows):
        s = [float(np.dot(bank[j].astype(np.float64), codes[i].astype(np.float64))) / tau for j in range(len(bank))]
        top = max(s)
        total += -(s[int(row)] - top - math.log(sum(math.exp(x - top) for x in s)))
    return total / len(rows)


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# la_loss on given sets


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_la_loss_matches_loop_reference(dtype, tol):
    rng = np.random.default_rng(3)
    scores = rng.normal(scale=5.0, size=(7, 13))
    close = rng.random((7, 13)) < 0.3
    close[:, 0] = True  # the image itself
    close[2] = False
    close[2, 0] = True  # a row whose C ∩ B is only the image itself
    close[4] = True  # C ⊇ B: loss 0
    got = la_loss(torch.tensor(scores, dtype=dtype), torch.tensor(close))
    want = ref_set_loss(scores, close)
    assert float(got) == pytest.approx(want, rel=tol, abs=tol)
    row4 = la_loss(torch.tensor(scores[4:5], dtype=dtype), torch.tensor(close[4:5]))
    assert float(row4) == pytest.approx(0.0, abs=tol)


def test_la_loss_large_scores_stay_finite():
    # exp(1/0.07) ~ 1.6e6 and beyond: a naive softmax ratio overflows at these logits, logsumexp does not
    scores = torch.tensor([[900.0, 899.0, -900.0], [1000.0, -1000.0, 999.0]], dtype=torch.float32)
    close = torch.tensor([[True, False, False], [True, False, False]])
    got = float(la_loss(scores, close))
    want = ref_set_loss(scores.double().numpy(), close.numpy())
    assert math.isfinite(got) and got == pytest.approx(want, abs=3e-4)  # float32 ulp at 1000 is 6e-5


def test_la_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    scores = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    close = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda s: la_loss(s, close), (scores,))


def test_la_loss_refuses_rows_without_close_members_and_bad_shapes():
    with pytest.raises(ValueError, match="rows \\[1\\] have none"):
        la_loss(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="close must have the shape of scores"):
        la_loss(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(batch_size, background_size\)"):
        la_loss(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        la_loss(torch.zeros(2, 3), torch.ones(2, 3))


# --------------------------------------------------------------------------------------------------
# neighbour sets on a tiny bank


@pytest.mark.parametrize("k", [1, 3, 9, 10, 11, 50])
def test_background_neighbours_match_reference(k):
    rng = np.random.default_rng(k)
    n, d = 11, 5
    bank = unit(rng, n, d)
    rows = np.array([0, 4, 10, 7], np.int64)
    codes = unit(rng, 4, d)
    codes[1] = -bank[4]  # the row itself scores lowest: it is still in its background set, first
    got = background_neighbours(codes @ bank.T, rows, k)
    assert got.shape == (4, 1 + min(k, n - 1)) and got.dtype == np.int64
    for i, row in enumerate(rows):
        want = ref_background(bank, codes[i], int(row), k)
        assert got[i, 0] == row and sorted(got[i].tolist()) == sorted(want)
    with pytest.raises(ValueError, match=r"scores must have shape \(b, n\)"):
        background_neighbours(codes @ bank.T, rows[:2], k)


def test_close_neighbours_union_over_runs_match_reference():
    rng = np.random.default_rng(5)
    n = 16
    labels = np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n), rng.integers(0, 5, n)]).astype(np.int64)
    rows = np.array([3, 9, 15], np.int64)
    background = np.stack([np.r_[r, rng.permutation(np.setdiff1d(np.arange(n), [r]))[:7]] for r in rows])
    got = close_neighbours(background, rows, labels)
    for i, row in enumerate(rows):
        assert got[i].tolist() == ref_close(labels, int(row), background[i].tolist())
    # singleton clusters in every run: only the image itself is close
    alone = close_neighbours(background, rows, np.arange(n)[None, :].repeat(2, axis=0))
    assert alone[:, 0].all() and not alone[:, 1:].any()


def _objective(n=12, d=6, k=5, seed=0):
    rng = np.random.default_rng(seed)
    bank = MemoryBank(n, d, seed=seed)
    bank.fill(unit(rng, n, d))
    return LocalAggregation(bank, background=k, temperature=TAU), rng


@pytest.mark.parametrize("k", [4, 11, 4096])
def test_la_objective_matches_reference(k):
    obj, rng = _objective(k=k)
    n, d = len(obj.bank), obj.bank.dim
    obj.cluster_labels = np.stack([rng.integers(0, 3, n), rng.integers(0, 4, n)]).astype(np.int64)
    rows = np.array([1, 5, 8, 11, 0], np.int64)
    codes = unit(rng, len(rows), d)
    got = obj.loss(rows, torch.tensor(codes), mode="la")
    want = ref_la_loss(obj.bank.vectors, codes, rows, obj.cluster_labels, k)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_la_objective_when_only_the_image_itself_is_close():
    obj, rng = _objective(k=6)
    n, d = len(obj.bank), obj.bank.dim
    obj.cluster_labels = np.arange(n, dtype=np.int64)[None, :]  # every image alone in its cluster
    rows = np.array([2, 7], np.int64)
    codes = unit(rng, 2, d)
    got = float(obj.loss(rows, torch.tensor(codes), mode="la"))
    want = ref_la_loss(obj.bank.vectors, codes, rows, obj.cluster_labels, 6)
    assert got == pytest.approx(want, rel=1e-5) and got > 0
    # ... which is instance recognition restricted to the background set
    b = background_neighbours(codes @ obj.bank.vectors.T, rows, 6)
    s = codes.astype(np.float64) @ obj.bank.vectors.astype(np.float64).T / TAU
    alone = np.mean([-(s[i, r] - np.log(np.exp(s[i, b[i]]).sum())) for i, r in enumerate(rows)])
    assert got == pytest.approx(alone, rel=1e-5)


def test_ir_objective_matches_reference():
    obj, rng = _objective()
    rows = np.array([0, 3, 3, 9], np.int64)
    codes = unit(rng, 4, obj.bank.dim)
    got = obj.loss(rows, torch.tensor(codes), mode="ir")
    assert float(got) == pytest.approx(ref_ir_loss(obj.bank.vectors, codes, rows), rel=1e-5)


def test_la_mode_needs_clusters_and_codes_of_the_right_shape():
    obj, rng = _objective()
    with pytest.raises(RuntimeError, match="recluster"):
        obj.loss(np.array([0]), torch.tensor(unit(rng, 1, obj.bank.dim)), mode="la")
    with pytest.raises(ValueError, match=r"codes must have shape \(2, 6\)"):
        obj.loss(np.array([0, 1]), torch.zeros(2, 5), mode="ir")
    with pytest.raises(ValueError, match="mode must be one of"):
        obj.loss(np.array([0]), torch.zeros(1, 6), mode="nce")


def test_recluster_labels_every_row_once_per_run():
    obj, _ = _objective(n=30, d=4)
    labels = obj.recluster(4, repeats=3, seed=2)
    assert labels.shape == (3, 30) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 4


# --------------------------------------------------------------------------------------------------
# one training step: the loss sees the old bank, then the bank mixes in the new codes


def test_bank_is_updated_after_the_loss_with_mixing_half():
    from train.la import train_step

    torch.manual_seed(0)
    model = LAEncoder(backbone="conv", dim=128, image_size=16, code_dim=32)
    n = 10
    obj, rng = _objective(n=n, d=128, k=4)
    obj.cluster_labels = np.stack([np.arange(n) % 3, np.arange(n) % 4]).astype(np.int64)
    old = obj.bank.vectors.copy()
    rows = torch.tensor([6, 1, 8, 3])
    views = torch.randn(4, 3, 16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss, codes = train_step(model, obj, opt, views, rows, mode="la")
    c = codes.numpy()
    # the loss was computed against the bank before the update
    assert loss == pytest.approx(ref_la_loss(old, c, rows.numpy(), obj.cluster_labels, 4), rel=1e-5)
    # then v <- normalise(0.5 new + 0.5 old) for the batch rows; the others untouched
    new = obj.bank.vectors
    for i, r in enumerate(rows.tolist()):
        mix = 0.5 * c[i].astype(np.float64) + 0.5 * old[r].astype(np.float64)
        np.testing.assert_allclose(new[r], mix / np.linalg.norm(mix), rtol=0, atol=1e-6)
    others = np.setdiff1d(np.arange(n), rows.numpy())
    np.testing.assert_array_equal(new[others], old[others])
    # the codes are the forward pass's, taken before the optimiser step changed the weights
    with torch.no_grad():
        assert not torch.allclose(model.train()(views), codes)


# --------------------------------------------------------------------------------------------------
# augmentation


def test_augment_shape_and_constant_image_oracle():
    from train.la import augment

    img = np.full((5, 20, 24, 3), (200, 100, 50), np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    g = torch.Generator().manual_seed(0)
    x = augment(torch.from_numpy(img), out_size=16, mean=mean, std=std, crop_scale=0.2, jitter=0.0, generator=g)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    want = (np.array([200, 100, 50]) / 255.0 - mean) / std
    np.testing.assert_allclose(x.numpy(), np.broadcast_to(want[None, :, None, None], x.shape), atol=1e-5)
    # grey views of a constant image: every channel holds the luma
    x = augment(torch.from_numpy(img), out_size=8, mean=(0, 0, 0), std=(1, 1, 1), jitter=0.0, grayscale=1.0,
                generator=g)
    np.testing.assert_allclose(x.numpy(), (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0, atol=1e-5)


def test_augment_is_reproducible_from_its_generator_and_refuses_float_input():
    from train.la import augment

    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8))
    kw = dict(out_size=12, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2), jitter=0.4, hue=0.1, grayscale=0.3)
    a = augment(img, generator=torch.Generator().manual_seed(7), **kw)
    b = augment(img, generator=torch.Generator().manual_seed(7), **kw)
    c = augment(img, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"uint8 tensor of shape \(b, H, W, 3\)"):
        augment(img.float(), **kw)


# --------------------------------------------------------------------------------------------------
# the trainer end to end (embedded 8x8 digits, a few steps)

TINY = ["--data", "digits", "--limit", "48", "--image-size", "16", "--train-side", "16", "--code-dim", "32",
        "--batch-size", "16", "--warmup-epochs", "1", "--kmeans-k", "4", "--background", "20", "--no-progress"]


def _ckpt(path):
    from train.checkpoint import load_checkpoint

    return load_checkpoint(path / "checkpoint.pt")


class Crash(Exception):
    pass


@pytest.mark.parametrize("cluster_every", [1, 2])  # 2: the resumed epoch uses the checkpoint's clusters
def test_resume_continues_exactly(tmp_path, monkeypatch, cluster_every):
    from train.common import Run
    from train.la import main

    straight = tmp_path / "straight"
    split = tmp_path / "split"
    tiny = TINY + ["--cluster-every", str(cluster_every), "--checkpoint-every", "0"]  # a checkpoint every epoch
    m_straight = main(tiny + ["--epochs", "3", "--out", str(straight)])

    # the same run, killed right after its second checkpoint, then resumed
    real_save = Run.save

    def save_then_crash(self, **kw):
        digest = real_save(self, **kw)
        if kw["epoch"] == 2:
            raise Crash
        return digest

    monkeypatch.setattr(Run, "save", save_then_crash)
    with pytest.raises(Crash):
        main(tiny + ["--epochs", "3", "--out", str(split)])
    monkeypatch.setattr(Run, "save", real_save)
    assert _ckpt(split)["epoch"] == 2
    m_split = main(tiny + ["--epochs", "3", "--out", str(split), "--resume"])
    a, b = _ckpt(straight), _ckpt(split)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"] == 9
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    np.testing.assert_array_equal(a["extra"]["bank"]["vectors"], b["extra"]["bank"]["vectors"])
    np.testing.assert_array_equal(a["extra"]["cluster_labels"], b["extra"]["cluster_labels"])
    assert m_straight["loss_per_epoch"] == m_split["loss_per_epoch"]
    assert m_straight["mode_per_epoch"] == ["ir", "la", "la"]
    assert m_straight["knn1_accuracy"] == m_split["knn1_accuracy"]
    # metrics.json: loss per epoch, the time split and the baselines
    saved = json.loads((straight / "metrics.json").read_text())
    assert len(saved["loss_per_epoch"]) == 3 and all(math.isfinite(v) for v in saved["loss_per_epoch"])
    assert {"encoder", "neighbours", "bank_update", "cluster", "machinery_fraction"} <= set(saved["time_split"])
    assert {"knn1_accuracy_raw_pixels", "kmeans_nmi_hsv_histogram"} <= set(saved)
    assert (straight / "clusters.png").stat().st_size > 0


def test_resume_refuses_other_settings(tmp_path):
    from train.la import main

    main(TINY + ["--epochs", "1", "--max-steps", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="other settings .*dim: checkpoint 128, now 64"):
        main(TINY + ["--dim", "64", "--epochs", "2", "--out", str(tmp_path), "--resume"])
    # the bank's mixing rate and the loss temperature shape the saved state: a change is refused, not ignored
    # (the bank rebuilt from the checkpoint would keep its old rate while config.json showed the new one)
    with pytest.raises(SystemExit, match=r"mixing_rate: checkpoint 0\.5, now 0\.9\)"):
        main(TINY + ["--mixing-rate", "0.9", "--epochs", "2", "--out", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--temperature", "0.1", "--mixing-rate", "0.25", "--epochs", "2", "--out", str(tmp_path),
                     "--resume"])
    assert "mixing_rate: checkpoint 0.5, now 0.25" in str(e.value.code)
    assert "temperature: checkpoint 0.07, now 0.1" in str(e.value.code)
    # settings that only act on a fresh run would be recorded but not applied: refused too
    with pytest.raises(SystemExit, match=r"init_from: checkpoint None, now '.*ae'"):
        main(TINY + ["--init-from", str(tmp_path / "ae"), "--epochs", "2", "--out", str(tmp_path), "--resume"])
    # refused before the run folder was touched: config.json still describes the checkpoint's run
    config = json.loads((tmp_path / "config.json").read_text())["config"]
    assert (config["dim"], config["mixing_rate"], config["temperature"], config["init_from"]) == (128, 0.5, 0.07, None)
    # the same settings resume (2 epochs of 1 step: one more step), and the bank keeps the run's rate
    main(TINY + ["--epochs", "2", "--max-steps", "1", "--out", str(tmp_path), "--resume"])
    state = _ckpt(tmp_path)
    assert (state["epoch"], state["step"]) == (2, 2)
    assert MemoryBank.from_state_dict(state["extra"]["bank"]).mixing_rate == 0.5


def test_load_encoder_round_trip_gives_unit_128d_embeddings(tmp_path):
    from train import evaluate as ev
    from train.data import load_images
    from train.la import LAConfig, main
    from train.registry import load_encoder

    main(TINY + ["--epochs", "1", "--max-steps", "2", "--out", str(tmp_path)])
    model, info = load_encoder(tmp_path)
    assert info.name == "la" and info.arch == "la" and info.dim == 128
    assert info.preprocess.size == (16, 16)
    ckpt = _ckpt(tmp_path)
    twin = LAEncoder(**ckpt["encoder"]["kwargs"])
    twin.load_state_dict(ckpt["model"])
    images = load_images("digits", limit=20).images
    a = ev.embed(model, images, info.preprocess)
    b = ev.embed(twin, images, info.preprocess)
    assert a.shape == (20, 128) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, b)
    assert LAConfig().dim == 128


def test_resnet18_backbone_is_torchvisions_resnet18_without_its_classifier(tmp_path):
    """--arch resnet18 trains, saves and reloads; its embedding equals torchvision's resnet18 (same weights, fc
    dropped: the 512-d average-pooled features) through the head, L2-normalised."""
    import torchvision

    from train import evaluate as ev
    from train.data import load_images
    from train.la import main
    from train.registry import load_encoder

    argv = [a for a in TINY if a not in ("--code-dim", "32")]
    argv[argv.index("--image-size") + 1] = argv[argv.index("--train-side") + 1] = "32"
    main(argv + ["--arch", "resnet18", "--epochs", "1", "--max-steps", "1", "--out", str(tmp_path)])
    model, info = load_encoder(tmp_path)
    assert info.config["arch"] == "resnet18" and info.preprocess.size == (32, 32)
    ref = torchvision.models.resnet18(weights=None)
    state = {k.removeprefix("backbone.net."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(state)
    ref.eval()
    images = load_images("digits", limit=12).images
    x = torch.from_numpy(info.preprocess(images))
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.head(ref(x)), dim=1).numpy()
    got = ev.embed(model, images, info.preprocess)
    assert got.shape == (12, 128)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(SystemExit):
        main(["--arch", "resnet18", "--image-size", "24"])


def test_missing_data_and_a_truncated_checkpoint_print_an_error_and_exit_2(tmp_path, capsys):
    from resume_check import bad_data_and_damaged_checkpoint_exit_2
    from train.la import main

    bad_data_and_damaged_checkpoint_exit_2(capsys, main, tmp_path, "la", TINY + ["--epochs", "1"])


def test_bad_options_are_refused_with_a_clear_message(capsys):
    from train.la import main

    for argv, says in ((["--image-size", "30"], "--image-size must be a multiple of 8 for the conv backbone, got 30"),
                       (["--kmeans-k", "0"], "argument --kmeans-k: expected an integer >= 1, got '0'"),
                       (["--crop-scale", "0"], "argument --crop-scale: expected a number in (0, 1], got '0'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and f"train.la: error: {says}" in capsys.readouterr().err


def test_config_defaults_are_the_default_data_sets_and_cifar_has_its_own():
    from dataclasses import asdict

    from train.la import DATA_DEFAULTS, LAConfig, parse_config

    cfg = asdict(LAConfig())
    assert cfg["data"] == "photos"
    assert {k: cfg[k] for k in DATA_DEFAULTS["photos"]} == DATA_DEFAULTS["photos"]
    assert asdict(parse_config([])[0])["epochs"] == DATA_DEFAULTS["photos"]["epochs"]
    cifar, _ = parse_config(["--data", "cifar10", "--lr", "0.5"])
    assert cifar.holdout == 0.2 and cifar.image_size == 32 and cifar.lr == 0.5
    assert cifar.batch_size == DATA_DEFAULTS["cifar10"]["batch_size"]


def test_init_from_an_autoencoder_starts_from_its_encoder_and_preprocessing(tmp_path):
    from train.ae import main as ae_main
    from train.checkpoint import load_checkpoint
    from train.la import main

    ae_main(["--arch", "conv", "--data", "digits", "--limit", "40", "--image-size", "16", "--code-dim", "32",
             "--epochs", "1", "--max-steps", "2", "--no-progress", "--out", str(tmp_path / "ae")])
    # lr 0 and no weight decay: one step leaves the parameters where --init-from put them
    main(TINY + ["--epochs", "1", "--max-steps", "1", "--lr", "0", "--weight-decay", "0",
                 "--init-from", str(tmp_path / "ae"), "--out", str(tmp_path / "la")])
    ae = load_checkpoint(tmp_path / "ae" / "checkpoint.pt")
    la = load_checkpoint(tmp_path / "la" / "checkpoint.pt")
    params = [k for k, _ in LAEncoder(backbone="conv", image_size=16, code_dim=32).named_parameters()]
    backbone = [k for k in params if k.startswith("backbone.")]
    assert backbone
    for k in backbone:
        assert torch.equal(la["model"][k], ae["model"]["encoder." + k[len("backbone."):]]), k
    assert la["encoder"]["preprocess"]["mean"] == ae["encoder"]["preprocess"]["mean"]
    assert la["encoder"]["preprocess"]["std"] == ae["encoder"]["preprocess"]["std"]
    with pytest.raises(SystemExit, match="does not fit"):
        main(TINY + ["--code-dim", "64", "--epochs", "1", "--max-steps", "1", "--init-from", str(tmp_path / "ae"),
                     "--out", str(tmp_path / "la2")])


def test_center_crop_is_recorded_in_the_exported_preprocessing(tmp_path):
    from train.la import main
    from train.registry import load_encoder

    main(TINY + ["--center-crop", "0.5", "--epochs", "1", "--max-steps", "1", "--out", str(tmp_path)])
    _, info = load_encoder(tmp_path)
    assert info.preprocess.size == (16, 16) and info.preprocess.resize_to == 32 and info.preprocess.crop == "center"


def test_bank_starts_from_the_codes_of_the_exported_preprocessing(tmp_path, monkeypatch):
    # center crop 0.5: the training views are already the central half, so cropping them again with the eval
    # preprocessing would start the bank from the central quarter; the bank must start from exactly what
    # evaluation and the exported encoder feed the network for each training image
    import train.la as la
    from train.data import load_images
    from train.registry import load_encoder

    bank_init_inputs, bank_init_codes = [], []

    class Recording(la.LAEncoder):
        def forward(self, x):
            out = super().forward(x)
            if self.training and not torch.is_grad_enabled():  # the bank-init pass (training steps need grads)
                bank_init_inputs.append(x.detach().clone())
                bank_init_codes.append(out.detach().clone())
            return out

    monkeypatch.setattr(la, "LAEncoder", Recording)
    real_save = la.Run.save
    first_bank = []

    def save(self, **kw):
        first_bank.append(np.array(kw["extra"]["bank"]["vectors"]))
        return real_save(self, **kw)

    monkeypatch.setattr(la.Run, "save", save)
    la.main(TINY + ["--center-crop", "0.5", "--epochs", "1", "--max-steps", "1", "--out", str(tmp_path)])
    _, info = load_encoder(tmp_path)
    assert info.preprocess.resize_to == 32  # 16 / 0.5
    want = info.preprocess(load_images("digits", limit=48).images)  # the 48 training images (no hold-out)
    got = torch.cat(bank_init_inputs).numpy()
    assert got.shape == want.shape == (48, 3, 16, 16)
    np.testing.assert_array_equal(got, want)
    # and the bank was filled with those codes (one step then updated only the rows of its batch)
    codes = torch.cat(bank_init_codes).numpy()
    unit_codes = codes / np.linalg.norm(codes, axis=1, keepdims=True)
    kept = np.all(np.abs(first_bank[0] - unit_codes) < 1e-6, axis=1)
    assert kept.sum() >= 48 - 16


def test_for_export_folds_the_linear_tail_into_one_layer_with_the_same_output():
    torch.manual_seed(0)
    model = LAEncoder(backbone="conv", image_size=16, code_dim=48, dim=8)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # give the batch norms running statistics that are not the identity
            model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    model.eval()
    assert model.for_export() is not model
    folded = model.for_export()
    linears = [m for m in folded.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and tuple(linears[0].weight.shape) == (8, 128 * 2 * 2)  # 128 maps of 2 x 2
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        want, got = model(x), folded(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    model.train()
    assert model.for_export() is model  # training mode: batch statistics, nothing to fold
    vgg = LAEncoder(backbone="vgg16bn", dim=8).eval()
    assert vgg.for_export() is vgg
