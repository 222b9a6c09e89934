"""MPNN: the objective against slow numpy loops, frozen levels, looping video, resume, embeddings, registry.

Training runs here are tiny (32-48 px inputs, a handful of steps); ``python -m train.mpnn`` trains the real one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.models.mpnn import (MPNN, Level, MPNNEncoder, embedding_dim, max_abs_cosine, max_abs_cosine_per_image,
                               mean_max_abs_cosine, pairwise_cosine_loss, pairwise_cosines, patch_second_moment)

EPS = 1e-8


# -- slow references ------------------------------------------------------------------------------------

def ref_cosines(f: np.ndarray) -> np.ndarray:
    """(n, c, h, w) -> (n, c, c) with explicit loops; a zero map has cosine 0 with everything."""
    f = f.astype(np.float64)
    n, c = f.shape[:2]
    out = np.zeros((n, c, c))
    for b in range(n):
        for i in range(c):
            for j in range(c):
                a, v = f[b, i].ravel(), f[b, j].ravel()
                out[b, i, j] = (a @ v) / (max(np.sqrt(a @ a), EPS) * max(np.sqrt(v @ v), EPS))
    return out


def ref_loss(f: np.ndarray) -> float:
    cos = ref_cosines(f)
    n, c = cos.shape[:2]
    vals = [cos[b, i, j] ** 2 for b in range(n) for i in range(c) for j in range(c) if i != j]
    return float(np.mean(vals))


def ref_max_per_image(f: np.ndarray) -> np.ndarray:
    cos = ref_cosines(f)
    n, c = cos.shape[:2]
    return np.array([max(abs(cos[b, i, j]) for i in range(c) for j in range(c) if i != j) for b in range(n)])


def structured_maps(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Maps with known structure: some near-parallel pairs, an anti-parallel pair, noise."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, c, h, w))
    f[:, 1] = 2.5 * f[:, 0] + 0.1 * rng.normal(size=(n, h, w))  # near-parallel to map 0
    if c > 3:
        f[:, 3] = -f[:, 2]  # exactly anti-parallel: |cos| = 1
    return f


# -- the objective --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (3, 5, 7, 3), (2, 16, 9, 11)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_pairwise_cosine_loss_matches_loops(shape, dtype, tol):
    f = structured_maps(*shape, seed=sum(shape))
    got = pairwise_cosine_loss(torch.tensor(f, dtype=dtype)).item()
    assert got == pytest.approx(ref_loss(f), rel=tol, abs=tol)
    cos = pairwise_cosines(torch.tensor(f, dtype=dtype)).numpy()
    np.testing.assert_allclose(cos, ref_cosines(f), rtol=tol * 10, atol=tol * 10)


def test_loss_zero_map_and_orthogonal_maps():
    # a zero map has cosine 0 with every other map; orthogonal maps give loss 0 exactly
    f = np.zeros((1, 3, 2, 2))
    f[0, 0, 0, 0] = 1.0
    f[0, 1, 1, 1] = -2.0  # disjoint support: orthogonal to map 0; map 2 stays all zero
    t = torch.tensor(f)
    assert pairwise_cosine_loss(t).item() == 0.0
    assert max_abs_cosine(t).item() == 0.0
    f[0, 2] = f[0, 0] * 3.0  # now parallel to map 0: 2 of the 6 ordered pairs have cos 1
    assert pairwise_cosine_loss(torch.tensor(f)).item() == pytest.approx(2 / 6)


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(n, channels, h, w\)"):
        pairwise_cosine_loss(torch.zeros(2, 16, 9))
    with pytest.raises(ValueError, match="at least 2 maps"):
        pairwise_cosine_loss(torch.zeros(2, 1, 3, 3))


def test_max_abs_cosine_statistics_match_loops():
    f = structured_maps(4, 6, 5, 4, seed=3)
    f[2] = np.random.default_rng(9).normal(size=f[2].shape)  # one image without the planted pairs
    per_image = ref_max_per_image(f)
    t = torch.tensor(f)
    np.testing.assert_allclose(max_abs_cosine_per_image(t).numpy(), per_image, rtol=1e-12)
    assert max_abs_cosine(t).item() == pytest.approx(per_image.max(), rel=1e-12)
    assert mean_max_abs_cosine(t).item() == pytest.approx(per_image.mean(), rel=1e-12)
    assert per_image[0] == pytest.approx(1.0)  # the planted anti-parallel pair
    assert per_image[2] < 0.9


def test_loss_gradient_decorrelates_maps():
    # a few Adam steps on free maps drive the statistic down: the loss has the intended direction
    torch.manual_seed(0)
    f = torch.randn(2, 16, 6, 6) + 3.0  # a shared offset makes every pair nearly parallel
    f.requires_grad_(True)
    before = mean_max_abs_cosine(f.detach()).item()
    opt = torch.optim.Adam([f], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        pairwise_cosine_loss(f).backward()
        opt.step()
    assert before > 0.9
    assert mean_max_abs_cosine(f.detach()).item() < 0.3


# -- the network ----------------------------------------------------------------------------------------

def test_level_shapes_and_published_structure():
    lv = Level(3)
    assert (lv.conv.in_channels, lv.conv.out_channels, lv.conv.kernel_size) == (3, 64, (5, 5))
    assert (lv.mix.in_channels, lv.mix.out_channels, lv.mix.kernel_size) == (64, 16, (1, 1))
    assert lv(torch.zeros(2, 3, 10, 14)).shape == (2, 16, 5, 7)
    net = MPNN(levels=3)
    assert [lv.conv.in_channels for lv in net.levels] == [3, 16, 16]
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 8, 8)


@pytest.mark.parametrize("side", [(10, 14), (11, 13)])  # odd sides: both orders drop the last row / column
def test_level_computes_the_published_order_exactly(side):
    """conv 5x5 -> ReLU -> conv 1x1 -> AvgPool 2, computed here in that order, in float64."""
    torch.manual_seed(0)
    lv = Level(3).double()
    x = torch.randn(2, 3, *side, dtype=torch.float64)
    published = F.avg_pool2d(F.conv2d(F.relu(lv.conv(x)), lv.mix.weight, lv.mix.bias), 2)
    torch.testing.assert_close(lv(x), published, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("levels,size,n", [(1, 32, 1), (3, 48, 3), (5, 224, 2)])
def test_embeddings_are_unit_vectors_of_declared_dim(levels, size, n):
    torch.manual_seed(1)
    enc = MPNNEncoder(levels=levels, size=size).eval()
    side = size // 2**levels
    assert enc.dim == 16 * side * side == embedding_dim(size, levels)
    with torch.no_grad():
        e = enc(torch.randn(n, 3, size, size))
    assert e.shape == (n, enc.dim) and e.dtype == torch.float32
    np.testing.assert_allclose(e.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_encoder_rejects_wrong_input_and_too_many_levels():
    enc = MPNNEncoder(levels=2, size=32)
    with pytest.raises(ValueError, match=r"\(n, 3, 32, 32\), got \(2, 3, 31, 32\)"):
        enc(torch.zeros(2, 3, 31, 32))
    with pytest.raises(ValueError, match=r"\(n, 3, 32, 32\), got \(3, 32, 32\)"):
        enc(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="too small for 6 levels"):
        MPNNEncoder(levels=6, size=32)


def test_freeze_sets_requires_grad_and_eval():
    net = MPNN(levels=3)
    net.freeze(2)
    assert [lv.training for lv in net.levels] == [False, False, True]
    assert [all(not p.requires_grad for p in lv.parameters()) for lv in net.levels] == [True, True, False]


def test_patch_second_moment_matches_loops():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 2, 4, 5))
    k = 3
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = []
    for b in range(2):
        for i in range(4):
            for j in range(5):
                rows.append(pad[b, :, i : i + k, j : j + k].ravel())  # (channel, row, column) order
    p = np.array(rows)
    np.testing.assert_allclose(patch_second_moment(torch.tensor(x), k).numpy(), p.T @ p / len(p), rtol=1e-6)


def test_pca_init_whitens_the_sample_and_maps_start_as_components():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(3, 3, 20, 20))
    base[:, 1] = 0.8 * base[:, 0] + 0.2 * base[:, 1]  # correlated channels, like RGB
    x = torch.tensor(base, dtype=torch.float32)
    lv = Level(3)
    lam = lv.pca_init_(x)
    assert torch.all(lam[:-1] >= lam[1:])  # largest first
    with torch.no_grad():
        e = lv.conv(x)  # (n, 64, h, w) pre-activations
        resp = e[:, :32].permute(1, 0, 2, 3).reshape(32, -1).double()
        second = resp @ resp.T / resp.shape[1]
        np.testing.assert_allclose(second.numpy(), np.eye(32), atol=2e-4)  # whitened, uncorrelated
        np.testing.assert_allclose(e[:, 32:].numpy(), -e[:, :32].numpy(), atol=1e-6)  # the same with each sign
        maps = lv.mix(torch.relu(e))
        np.testing.assert_allclose(maps.numpy(), e[:, :16].numpy(), atol=1e-5)  # map i = component i


# -- training runs --------------------------------------------------------------------------------------

from train.mpnn import FrameStream, MPNNConfig, build_preprocess, main, train  # noqa: E402

# bikes.mp4 (250 frames) at every 25th frame: 10 frames per pass, so a few steps loop past its end.
TINY = ["--size", "32", "--levels", "2", "--batch-size", "4", "--frame-step", "25", "--shuffle-window", "6",
        "--init-frames", "4", "--window", "3", "--eval-limit", "12", "--no-progress", "--device", "cpu"]


def test_stream_loops_past_the_end_of_bikes_and_resumes_exactly():
    cfg = MPNNConfig(size=32, frame_step=25, shuffle_window=4)
    pre = build_preprocess(32)
    s = FrameStream(cfg, pre)
    assert s.pass_length == 10
    first = s.batch(12)  # windows of 4: frames 0-3, 4-7, 8-11 of the looped stream, each permuted
    state = s.state()
    rest = s.batch(23)  # into the 4th pass
    assert s.pass_index == 3
    whole = pre(s.first_pass(250)[::25])  # the 10 frames of one pass, in order, as network input
    got = pre.normalise(np.concatenate([first, rest]))
    # every item is a frame of the pass, and each window of 4 holds exactly its 4 consecutive looped frames
    match = [int(np.argmin(((whole - g) ** 2).sum(axis=(1, 2, 3)))) for g in got]
    for w in range(0, 32, 4):
        assert sorted(match[w : w + 4]) == sorted((w + i) % 10 for i in range(4))
    again = FrameStream(cfg, pre, start=state).batch(23)
    np.testing.assert_array_equal(again, rest)
    s.close()


def test_tiny_run_loops_video_and_records_metrics(tmp_path):
    out = tmp_path / "run"
    m = main(TINY + ["--level-steps", "5", "--threshold", "0.05", "--out", str(out)])
    # 2 levels x (4 init frames + 5 steps x 4 frames) = 48 frames of a 10-frame pass: looped 4 times
    assert m["complete"] and m["steps"] == 10 and m["passes"] > 4
    assert [lv["steps"] for lv in m["per_level"]] == [5, 5]
    assert all(len(lv["max_cos"]) == 5 and len(lv["loss"]) == 5 for lv in m["per_level"])
    assert not m["all_levels_reached"]  # threshold 0.05 is out of reach in 5 steps
    assert m["dim"] == 16 * 8 * 8 and m["eval"]["embedding"]["dim"] == m["dim"]
    assert (out / "curves.png").stat().st_size > 0 and (out / "metrics.json").is_file()


def test_earlier_levels_frozen_while_a_later_level_trains(tmp_path):
    from train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    main(TINY + ["--levels", "1", "--level-steps", "4", "--threshold", "0.01", "--out", str(out)])
    one = load_checkpoint(out / "checkpoint.pt")["model"]
    m = main(TINY + ["--levels", "2", "--level-steps", "4", "--threshold", "0.01", "--resume", "--out", str(out)])
    two = load_checkpoint(out / "checkpoint.pt")["model"]
    assert m["complete"] and [lv["steps"] for lv in m["per_level"]] == [4, 4]
    for k, v in one.items():
        assert torch.equal(two[k], v), f"{k} changed while level 2 trained"
    assert any(k.startswith("levels.1.") for k in two)


def test_resume_mid_level_matches_an_uninterrupted_run(tmp_path):
    from train.checkpoint import load_checkpoint

    args = TINY + ["--level-steps", "6", "--threshold", "0.01"]
    full = main(args + ["--out", str(tmp_path / "a")])
    part = main(args + ["--max-steps", "8", "--out", str(tmp_path / "b")])  # stops at level 2, step 2
    assert not part["complete"] and [lv["steps"] for lv in part["per_level"]] == [6, 2]
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert (state["extra"]["level"], state["extra"]["level_step"], state["step"]) == (1, 2, 8)
    resumed = main(args + ["--resume", "--out", str(tmp_path / "b")])
    assert resumed["complete"] and resumed["steps"] == full["steps"] == 12
    for a, b in zip(full["per_level"], resumed["per_level"]):
        assert a["loss"] == b["loss"] and a["max_cos"] == b["max_cos"]
    ma = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    mb = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_image_dataset_stream_and_registry_round_trip(tmp_path):
    from train.registry import load_encoder

    out = tmp_path / "run"
    m = main(["--data", "photos", "--limit", "5", "--size", "48", "--levels", "2", "--batch-size", "2",
              "--init-frames", "3", "--level-steps", "3", "--window", "2", "--no-progress", "--out", str(out)])
    assert m["complete"] and m["items_per_pass"] == 5 and m["dim"] == 16 * 12 * 12
    enc, info = load_encoder(out)
    assert info.arch == "mpnn" and info.dim == m["dim"] and info.preprocess == build_preprocess(48)
    from train.checkpoint import load_checkpoint

    trained = MPNNEncoder(levels=2, size=48)
    trained.net.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    trained.eval()
    x = torch.from_numpy(info.preprocess(np.random.default_rng(0).integers(0, 256, (3, 60, 80, 3), dtype=np.uint8)))
    with torch.no_grad():
        assert torch.equal(enc(x), trained(x))
        np.testing.assert_allclose(enc(x).norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_bad_options_are_refused(tmp_path, capsys):
    for argv, says in ((["--size", "32", "--levels", "4"], "--size 32 with --levels 4 leaves the last level 2x2 maps"),
                       (["--threshold", "0"], "argument --threshold: expected a number in (0, 1], got '0'")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(tmp_path / "x"), "--no-progress"])
        assert e.value.code == 2 and f"train.mpnn: error: {says}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    cfg = MPNNConfig(size=32, levels=4)  # train() itself still refuses what the command line would
    with pytest.raises(ValueError, match="2x2 = 4 values"):
        train(cfg, out=tmp_path / "y", show_progress=False)


class Crash(Exception):
    pass


def _record_saves(monkeypatch, crash_after: int | None = None) -> list[dict]:
    """Record (step, epoch, level, level_step) of every checkpoint written; optionally crash after a save."""
    from train.common import Run

    real_save = Run.save
    saves = []

    def save(self, **kw):
        digest = real_save(self, **kw)
        saves.append({"step": kw["step"], "epoch": kw["epoch"], "level": kw["extra"]["level"],
                      "level_step": kw["extra"]["level_step"]})
        if crash_after is not None and len(saves) == crash_after:
            raise Crash
        return digest

    monkeypatch.setattr(Run, "save", save)
    return saves


def test_a_checkpoint_is_written_every_pass_within_a_level(tmp_path, monkeypatch):
    # 10 frames a pass (every 25th of bikes' 250), consecutive (window 1), 5 a step, random init (no frames
    # read before the first step): step 1 reads frames 0-4 of pass 0, step 2 frames 5-9, step 3 starts pass 1
    # ... so passes 1..4 start at steps 3, 5, 7, 9, all within the 10-step level, whose end is saved at step 10
    saves = _record_saves(monkeypatch)
    m = main(TINY + ["--levels", "1", "--level-steps", "10", "--threshold", "0.01", "--init", "random",
                     "--shuffle-window", "1", "--batch-size", "5", "--out", str(tmp_path)])
    assert m["complete"] and m["steps"] == 10 and not m["all_levels_reached"]
    assert [(s["step"], s["epoch"]) for s in saves] == [(3, 1), (5, 2), (7, 3), (9, 4), (10, 4)]
    assert [(s["level"], s["level_step"]) for s in saves[:4]] == [(0, 3), (0, 5), (0, 7), (0, 9)]  # mid-level


def test_resume_from_a_pass_checkpoint_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from train.checkpoint import load_checkpoint
    from train.common import Run

    args = TINY + ["--levels", "1", "--level-steps", "8", "--threshold", "0.01"]
    real_save = Run.save
    full = main(args + ["--out", str(tmp_path / "a")])
    saves = _record_saves(monkeypatch, crash_after=1)  # killed right after the first checkpoint
    with pytest.raises(Crash):
        main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(Run, "save", real_save)
    assert saves[0]["level"] == 0 and 0 < saves[0]["level_step"] < 8  # a pass ended mid-level
    resumed = main(args + ["--resume", "--out", str(tmp_path / "b")])
    assert resumed["complete"] and resumed["steps"] == full["steps"] == 8
    a, b = full["per_level"][0], resumed["per_level"][0]
    assert a["loss"] == b["loss"] and a["max_cos"] == b["max_cos"] and len(a["loss"]) == 8
    ma = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    mb = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_resume_refuses_other_data_stream_or_model_settings_before_writing(tmp_path):
    import json

    out = tmp_path / "run"
    main(TINY + ["--level-steps", "2", "--threshold", "0.01", "--out", str(out)])
    config = (out / "config.json").read_bytes()
    base = TINY + ["--level-steps", "2", "--threshold", "0.01", "--resume", "--out", str(out)]
    for extra, named in [
        (["--size", "48"], ["size: checkpoint 32, now 48"]),
        (["--data", "photos"], ["data: checkpoint 'video', now 'photos'"]),
        (["--seed", "7", "--frame-step", "5"], ["seed: checkpoint 0, now 7", "frame_step: checkpoint 25, now 5"]),
        (["--shuffle-window", "3", "--limit", "20"], ["shuffle_window: checkpoint 6, now 3",
                                                       "limit: checkpoint None, now 20"]),
        (["--data-root", str(tmp_path / "other.mp4")], ["data_root: checkpoint None, now '"]),
        (["--levels", "1"], ["levels: checkpoint 2, now 1 (may only grow)"]),
    ]:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        msg = str(e.value.code)
        assert msg.startswith("--resume: ") and "other settings" in msg, msg
        for n in named:
            assert n in msg, (n, msg)
        assert (out / "config.json").read_bytes() == config  # left as the checkpoint's run wrote it
    assert json.loads(config)["config"]["size"] == 32


def test_missing_data_and_a_truncated_checkpoint_print_an_error_and_exit_2(tmp_path, capsys):
    from resume_check import bad_data_and_damaged_checkpoint_exit_2

    bad_data_and_damaged_checkpoint_exit_2(capsys, main, tmp_path, "mpnn", TINY + ["--level-steps", "2"])
