"""Siamese network: losses and mining against slow explicit loops, the tower, and tiny training runs."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resume_check import bad_data_and_damaged_checkpoint_exit_2, cli_error, split_run_equals_whole
from train import siamese as trainer
from train.checkpoint import load_checkpoint
from train.models.siamese import (SiameseNet, SiameseTower, contrastive_loss, mine_triplets, pairwise_distances,
                                  triplet_loss)
from train.registry import build_encoder, load_encoder

# -- slow references ----------------------------------------------------------------------------------


def ref_dist(e):
    n = len(e)
    return [[math.sqrt(sum((float(e[i][k]) - float(e[j][k])) ** 2 for k in range(len(e[i])))) for j in range(n)]
            for i in range(n)]


def ref_mine(D, y, mining):
    n = len(y)
    out = []
    for a in range(n):
        P = [p for p in range(n) if p != a and y[p] == y[a]]
        N = [q for q in range(n) if y[q] != y[a]]
        if not P or not N:
            continue
        if mining == "hard":
            p = max(P, key=lambda p: (D[a][p], -p))  # farthest positive, lowest index on ties
            q = min(N, key=lambda q: (D[a][q], q))  # nearest negative
            out.append((a, p, q))
        else:
            for p in P:
                farther = [q for q in N if D[a][q] > D[a][p]]
                if farther:
                    q = min(farther, key=lambda q: (D[a][q], q))
                else:
                    q = max(N, key=lambda q: (D[a][q], -q))
                out.append((a, p, q))
    return out


def ref_loss(e, y, kind, mining, margin):
    D = ref_dist(e)
    trips = ref_mine(D, y, mining)
    if not trips:
        return 0.0
    if kind == "triplet":
        vals = [max(0.0, D[a][p] - D[a][q] + margin) for a, p, q in trips]
    else:
        vals = [D[a][p] ** 2 + max(0.0, margin - D[a][q]) ** 2 for a, p, q in trips]
    return sum(vals) / len(vals)


def _batch(n, dim, n_classes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=1)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return e, y


# -- distances, mining, losses ------------------------------------------------------------------------


def test_pairwise_distances_match_loops_and_have_finite_grads_on_duplicates():
    e, _ = _batch(7, 5, 2, 0, torch.float64)
    np.testing.assert_allclose(pairwise_distances(e).numpy(), np.array(ref_dist(e.numpy())), atol=1e-12)
    dup = torch.cat([e[:3], e[:1]]).requires_grad_(True)
    d = pairwise_distances(dup)
    assert d[0, 3] == 0 and torch.all(torch.diagonal(d) == 0)
    d.sum().backward()
    assert torch.isfinite(dup.grad).all()


@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("n,dim,n_classes,seed", [(2, 3, 2, 0), (9, 5, 3, 1), (17, 4, 4, 2), (24, 16, 5, 3)])
def test_mining_matches_reference(mining, n, dim, n_classes, seed):
    e, y = _batch(n, dim, n_classes, seed, torch.float64)
    a, p, q = mine_triplets(pairwise_distances(e), y, mining)
    got = sorted(zip(a.tolist(), p.tolist(), q.tolist()))
    want = sorted(ref_mine(ref_dist(e.numpy()), y.tolist(), mining))
    assert got == want


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("kind", ["contrastive", "triplet"])
@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_reference(kind, mining, seed, dtype, tol):
    e, y = _batch(12, 6, 3, seed, dtype)
    margin = 1.0 if kind == "contrastive" else 0.3
    fn = contrastive_loss if kind == "contrastive" else triplet_loss
    got = fn(e, y, margin=margin, mining=mining)
    assert got.dtype == dtype
    assert float(got) == pytest.approx(ref_loss(e.double().numpy(), y.tolist(), kind, mining, margin), abs=tol)


@pytest.mark.parametrize("fn", [contrastive_loss, triplet_loss])
@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3], [5]])
def test_no_valid_triplets_gives_zero_loss_that_backpropagates(fn, mining, labels):
    e = torch.randn(len(labels), 4, requires_grad=True)
    loss = fn(e, torch.tensor(labels), mining=mining)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(e.grad, torch.zeros_like(e))


def test_loss_bad_input_messages():
    with pytest.raises(ValueError, match=r"shape \(batch_size, embedding_size\)"):
        triplet_loss(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels must be a 1D tensor of shape \(3,\)"):
        contrastive_loss(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="mining must be one of"):
        triplet_loss(torch.zeros(3, 2), torch.zeros(3), mining="easy")


# -- the network ----------------------------------------------------------------------------------------


def test_tower_averages_channels_and_encoder_gives_unit_vectors():
    torch.manual_seed(0)
    tower = SiameseTower(image_size=12, dim=7).eval()
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        a = tower(x)
        b = tower(x[:, [2, 0, 1]])  # channel order does not matter
        c = tower(x.mean(1, keepdim=True).expand(-1, 3, -1, -1))  # grey replicated = the same
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    enc = build_encoder("siamese", image_size=12, dim=7).eval()
    with torch.no_grad():
        e = enc(x)
    assert e.shape == (5, 7)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match=r"expects \(n, 3, 12, 12\)"):
        tower(torch.zeros(1, 3, 10, 12))


def test_pair_network_binary_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    net = SiameseNet(image_size=8, dim=16)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(32, 3, 8, 8, generator=g), torch.randn(32, 3, 8, 8, generator=g)
    x2[:16] = x1[:16] + 0.1 * torch.randn(16, 3, 8, 8, generator=g)  # 16 positives, 16 negatives
    same = torch.cat([torch.ones(16), torch.zeros(16)])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.binary_cross_entropy_with_logits(net(x1, x2), same)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- the trainer ----------------------------------------------------------------------------------------

TINY = ["--data", "digits", "--image-size", "8", "--dim", "16", "--no-progress", "--test-pairs", "200"]


def test_triplet_training_loss_decreases_on_a_fixed_batch(tmp_path):
    # --limit <= --batch-size: every epoch is one step on the same 40 images
    m = trainer.main(TINY + ["--loss", "triplet", "--mining", "hard", "--limit", "40", "--batch-size", "40",
                             "--epochs", "6", "--lr", "0.01", "--out", str(tmp_path)])
    losses = m["loss_per_epoch"]
    assert len(losses) == 6 and m["steps"] == 6
    assert losses[-1] < losses[0]


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path, capsys):
    base = TINY + ["--limit", "64", "--batch-size", "16", "--max-steps", "2"]
    full, resumed, _, _ = split_run_equals_whole(trainer, base, tmp_path)
    assert full["pair_accuracy"] == resumed["pair_accuracy"]
    # a resume with other model settings is refused
    with pytest.raises(SystemExit, match="other settings"):
        trainer.main(base + ["--epochs", "3", "--dim", "8", "--resume", "--out", str(tmp_path / "part")])
    assert json.loads((tmp_path / "part" / "config.json").read_text())["config"]["dim"] == 16  # left as it was
    # a checkpoint of another model is refused
    from train import ae

    cli_error(capsys, lambda: ae.main(["--arch", "conv", "--data", "digits", "--image-size", "8", "--resume",
                                       "--no-progress", "--out", str(tmp_path / "part")]),
              "holds model 'siamese', not 'ae-conv'")


def test_missing_data_and_a_truncated_checkpoint_print_an_error_and_exit_2(tmp_path, capsys):
    bad_data_and_damaged_checkpoint_exit_2(capsys, trainer.main, tmp_path, "siamese", TINY + ["--limit", "40"])


def test_load_encoder_round_trip_and_metrics(tmp_path):
    m = trainer.main(TINY + ["--limit", "80", "--batch-size", "16", "--max-steps", "3", "--epochs", "1",
                             "--out", str(tmp_path)])
    for k in ("pair_accuracy", "pair_accuracy_cosine", "knn1_accuracy", "knn1_raw_pixels"):
        assert 0.0 <= m[k] <= 1.0
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "nearest_neighbours.png").is_file()
    enc, info = load_encoder(tmp_path)
    assert info.name == "siamese" and info.dim == 16 and info.preprocess.size == (8, 8) and info.preprocess.grayscale
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    net = SiameseNet(image_size=8, dim=16)
    net.load_state_dict(ckpt["model"])
    net.eval()
    x = torch.from_numpy(info.preprocess(np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)))
    with torch.no_grad():
        e = enc(x)
        torch.testing.assert_close(e, net.embed(x), rtol=0, atol=0)
    assert e.shape == (6, 16)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(6))


def test_unlabelled_data_is_refused_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        trainer.build_parser().parse_args(["--data", "photos"])
    assert "invalid choice: 'photos'" in capsys.readouterr().err
    import cv2

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):  # images directly in the folder: no classes
        cv2.imwrite(str(folder / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    cli_error(capsys, lambda: trainer.main(["--data", "folder", "--data-root", str(folder), "--out",
                                            str(tmp_path / "run"), "--no-progress"]), "has no labels")
    with pytest.raises(SystemExit) as e:
        trainer.main(TINY + ["--batch-size", "1", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "argument --batch-size: expected an integer >= 2 (a batch needs a pair), got '1'" in capsys.readouterr().err
