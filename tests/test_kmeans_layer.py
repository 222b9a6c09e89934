"""The k-means patch layer (``train.la --arch kmeans``; Coates & Ng): its folded convolution against the textbook
computation patch by patch, and the whole path (fit, LA training, checkpoint, ONNX export) on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.models.layers import PatchKMeansBackbone


def reference_features(x: np.ndarray, fit: dict, *, patch: int, grid: int, alpha: float) -> np.ndarray:
    """Coates & Ng's features, one patch at a time in float64: normalise the patch (mean removed, divided by
    sqrt(variance + eps)), whiten it (W (p - mu)), score it against the unit centroids, soft-threshold both
    signs, average each cell of a grid x grid split of the positions (the border left over skipped)."""
    n, _, side, _ = x.shape
    positions = side - patch + 1
    cell = positions // grid
    o = (positions - grid * cell) // 2
    k = fit["centroids"].shape[0]
    out = np.zeros((n, 2, k, grid, grid))
    for i in range(n):
        for r in range(o, o + grid * cell):
            for c in range(o, o + grid * cell):
                p = x[i, :, r:r + patch, c:c + patch].astype(np.float64).ravel()  # (channel, row, column) order
                p = (p - p.mean()) / np.sqrt(p.var() + fit["eps"])
                z = fit["centroids"] @ (fit["whitening"] @ (p - fit["patch_mean"]))
                gi, gj = (r - o) // cell, (c - o) // cell
                out[i, 0, :, gi, gj] += np.maximum(z - alpha, 0.0) / cell ** 2
                out[i, 1, :, gi, gj] += np.maximum(-z - alpha, 0.0) / cell ** 2
    return out.reshape(n, -1)


@pytest.fixture(scope="module")
def photos():
    """The embedded photographs (real RGB photos from scikit-image / scikit-learn) at 16 x 16."""
    from engine.preprocess import Preprocess
    from train.data import load_images

    images = load_images("photos").images
    return torch.from_numpy(Preprocess(size=(16, 16), mean=(0.45,) * 3, std=(0.25,) * 3)(images))


def test_the_folded_convolution_equals_the_patch_by_patch_features(photos):
    """Whitening and patch-mean removal folded into zero-sum filters, statistics by box convolutions, pooling by
    avg_pool: the same numbers as the textbook computation; standardised with the fit images' mean and std."""
    layer = PatchKMeansBackbone(image_size=16, clusters=12, patch=5, grid=3)
    fit = layer.fit(photos, patches=4000, seed=3)
    assert layer.out_dim == 2 * 12 * 9
    np.testing.assert_allclose(np.linalg.norm(fit["centroids"], axis=1), 1.0, rtol=1e-9)
    ref = reference_features(photos.numpy(), fit, patch=5, grid=3, alpha=0.25)
    want = (ref - ref.mean(0)) / np.maximum(ref.std(0, ddof=1), 1e-3 * ref.std(ddof=1))
    with torch.no_grad():
        got = layer(photos).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3)  # float32 box statistics; a wrong fold is off by > 0.1
    with torch.no_grad():  # slices of the batch change nothing
        np.testing.assert_allclose(torch.cat([layer(photos[:5]), layer(photos[5:])]).numpy(), got, atol=1e-5)


def test_the_whitened_patches_the_centroids_come_from_are_decorrelated(photos):
    """ZCA (eigenvalue floor 0.1, the paper's) maps the normalised patches' covariance C to W C W = C (C + 0.1)^-1:
    the oracle is that matrix, computed from the same patches independently of the layer."""
    layer = PatchKMeansBackbone(image_size=16, clusters=4, patch=4, grid=2)
    fit = layer.fit(photos, patches=3000, seed=0)
    rng = np.random.default_rng(0)  # the layer's own draw of patches, repeated
    x = photos.numpy()
    pick, top, left = rng.integers(0, len(x), 3000), rng.integers(0, 13, 3000), rng.integers(0, 13, 3000)
    pts = np.stack([x[i, :, a:a + 4, b:b + 4].ravel() for i, a, b in zip(pick, top, left)]).astype(np.float64)
    pts = (pts - pts.mean(1, keepdims=True)) / np.sqrt(pts.var(1, keepdims=True) + fit["eps"])
    cov = np.cov(pts, rowvar=False)
    w = fit["whitening"]
    np.testing.assert_allclose(fit["patch_mean"], pts.mean(0), atol=1e-12)
    np.testing.assert_allclose(w @ cov @ w, cov @ np.linalg.inv(cov + 0.1 * np.eye(len(cov))), atol=1e-8)


def test_an_unfitted_layer_refuses_to_run_and_sizes_are_checked():
    layer = PatchKMeansBackbone(image_size=16)
    with pytest.raises(RuntimeError, match="has not been fitted"):
        layer(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected \(n, 3, 16, 16\) images, got \(2, 3, 8, 8\)"):
        layer.fit(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="image_size >= patch \\+ grid - 1"):
        PatchKMeansBackbone(image_size=7)


def test_train_la_on_the_kmeans_layer_saves_reloads_and_exports(tmp_path):
    """``train.la --arch kmeans``: the layer is fit before training and frozen (only the head trains), the
    checkpoint rebuilds the same encoder, and the ONNX file onnxruntime runs gives the same embeddings."""
    from engine import Encoder
    from export import verify
    from export.onnx import export_run
    from train import evaluate as ev
    from train.data import load_images
    from train.la import main
    from train.registry import load_encoder

    argv = ["--data", "digits", "--limit", "64", "--image-size", "16", "--train-side", "16", "--batch-size", "16",
            "--warmup-epochs", "1", "--epochs", "2", "--max-steps", "2", "--kmeans-k", "4", "--background", "20",
            "--no-progress", "--arch", "kmeans", "--out", str(tmp_path / "la")]
    main(argv)
    model, info = load_encoder(tmp_path / "la")
    assert info.config["arch"] == "kmeans" and info.preprocess.size == (16, 16)
    assert bool(model.backbone.fitted) and not list(model.backbone.parameters())  # frozen: buffers only
    assert [n for n, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    images = load_images("digits", limit=20).images
    torch_codes = ev.embed(model, images, info.preprocess)
    assert torch_codes.shape == (20, 128)
    np.testing.assert_allclose(np.linalg.norm(torch_codes, axis=1), 1.0, atol=1e-5)
    export_run(tmp_path / "la", tmp_path / "models", images=verify.real_images(4)[0], allow_incomplete=True)
    onnx_codes = Encoder(tmp_path / "models" / "la.onnx").encode(images)
    np.testing.assert_allclose(onnx_codes, torch_codes, atol=1e-4)


def test_cifar10_trains_on_the_kmeans_layer_by_default_and_other_data_sets_on_the_conv_backbone(capsys):
    from train.la import main, parse_config

    assert parse_config(["--data", "cifar10"])[0].arch == "kmeans"
    assert parse_config(["--data", "cifar10", "--arch", "conv"])[0].arch == "conv"
    for data in ("photos", "fungi", "digits", "folder"):
        assert parse_config(["--data", data])[0].arch == "conv"
    with pytest.raises(SystemExit) as e:
        main(["--data", "cifar10", "--init-from", "runs/ae-conv"])
    assert e.value.code == 2
    assert "--init-from needs an autoencoder's backbone (conv or vgg16bn); there is no kmeans autoencoder" in (
        capsys.readouterr().err)
