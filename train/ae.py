"""Train an autoencoder (pixel MSE) whose encoder becomes a search embedding.

    python -m train.ae --arch conv                          # CIFAR-sized conv AE, 1000-d code (embedded photos)
    python -m train.ae --arch conv --data cifar10 --data-root ../shared/data/cifar-10-batches-py
    python -m train.ae --arch vgg16bn [--pretrained]        # SegNet on VGG16-BN, 512-d embedding

Data: any ``train.data`` set (default: ``photos``, the photographs embedded in scikit-image / scikit-learn,
so a fresh machine needs no download). A held-out part is kept back for evaluation (see ``load_split``):
the last 20% for MNIST / CIFAR-10 (stored shuffled), every 5th item otherwise.

Every image goes through the run's ``Preprocess`` (recorded in the checkpoint and exported with the
encoder), so the engine sees exactly what training saw. The run folder (default ``runs/ae-<arch>``) gets
checkpoint.pt (every ``--checkpoint-every`` seconds, at the end and on SIGTERM / Ctrl-C, atomically; ``--resume``
continues exactly, mid-epoch included), config.json, metrics.json (loss per epoch,
held-out reconstruction error, and with labels 1-NN accuracy against the raw-pixel and HSV baselines) and
reconstructions.png (inputs above their reconstructions).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from train.choices import BACKBONES
from train.common import (EpochTally, Run, check_resume, check_run_folder, cli_main, config_from_args,
                          cut_short_epochs, default_out, encoder_spec, epoch_progress, make_parser, number,
                          pick_device, progress, seed_everything)
from train.data import DATASETS, ImageSet
from train.split import batches, epoch_order, load_split


# Per-architecture defaults (the command line overrides each one).
ARCH_DEFAULTS = {
    # 32: CIFAR's own size. 1-NN accuracy of the code peaks after a few hundred steps (more steps lower the
    # reconstruction error, not the search quality), so 3 epochs of the 8,000 CIFAR images (375 steps) do
    "conv": {"image_size": 32, "epochs": 3, "batch_size": 64, "lr": 1e-3},
    # 96 (not 224) keeps the default photos run within 10 minutes on 2 CPU cores: VGG16 costs ~(side/224)^2
    "vgg16bn": {"image_size": 96, "epochs": 40, "batch_size": 8, "lr": 1e-3},
}


@dataclass
class AEConfig:
    arch: str = "conv"  # "conv" (small CIFAR autoencoder, 1000-d code) or "vgg16bn" (SegNet on VGG16-BN, 512-d)
    data: str = "photos"  # a train.data data set; photos are embedded in installed packages
    data_root: str | None = None  # folder / file of the data set (None: the data set's default)
    epochs: int = 3  # passes over the training images (per-arch default: ARCH_DEFAULTS)
    batch_size: int = 64  # images per step (per-arch default)
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    image_size: int = 32  # square network input side (conv: 32, vgg16bn: 96 by default)
    code_dim: int = 1000  # conv only: size of the code (the embedding)
    pretrained: bool = False  # vgg16bn only: start from torchvision's ImageNet weights when they can be had
    holdout: float = 0.2  # fraction of the loaded images kept back for evaluation
    limit: int | None = None  # at most this many training images (None: all)
    max_steps: int | None = None  # stop each epoch after this many steps (None: whole epoch)
    seed: int = 0  # fixes init, data order and the split; fixed seed + CPU gives identical runs
    device: str = "auto"  # auto / cpu / cuda


# --------------------------------------------------------------------------------------------------


def build_parser(arch: str) -> argparse.ArgumentParser:
    d = ARCH_DEFAULTS[arch]
    p = make_parser("train.ae", "Train an autoencoder (pixel MSE); its encoder is the search embedding.",
                    datasets=DATASETS, default_data="photos", epochs=d["epochs"], batch_size=d["batch_size"],
                    default_out_help="runs/ae-ARCH: " + ", ".join(
                        f"{default_out(f'ae-{a}')} for --arch {a}" for a in sorted(BACKBONES)),
                    min_batch_size=2, batch_size_why="batch norm needs two images")
    p.add_argument("--arch", default="conv", choices=BACKBONES,
                   help="conv: small CIFAR autoencoder, 1000-d code; vgg16bn: SegNet on VGG16-BN, 512-d (default: conv)")
    p.add_argument("--image-size", type=number(int, low=8), default=d["image_size"],
                   help="square network input side (default: 32 for conv, 96 for vgg16bn)")
    p.add_argument("--lr", type=number(float, low=0), default=d["lr"], help=f"Adam learning rate (default: {d['lr']})")
    p.add_argument("--weight-decay", type=number(float, low=0), default=0.0, help="Adam weight decay (default: 0)")
    p.add_argument("--code-dim", type=number(int, low=1), default=1000,
                   help="conv: size of the code / embedding (default: 1000)")
    p.add_argument("--pretrained", action="store_true",
                   help="vgg16bn: start from torchvision's ImageNet weights (needs them cached or a network; "
                        "without them a warning is printed and training starts from random init)")
    return p


def parse_config(argv=None) -> tuple[AEConfig, argparse.Namespace]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--arch", default="conv", choices=BACKBONES)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.arch)
    args = parser.parse_args(argv)
    if args.arch == "conv" and args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 for the conv autoencoder, got {args.image_size}")
    if args.arch == "vgg16bn" and args.image_size < 32:
        parser.error(f"--image-size must be at least 32 for vgg16bn (five 2x2 pools), got {args.image_size}")
    return config_from_args(AEConfig, args), args


if __name__ == "__main__":  # python -m train.ae: --help and argument errors answer here, before torch loads
    parse_config()

# the training machinery, imported once the command line has been read (torch alone takes seconds)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.preprocess import Preprocess  # noqa: E402
from train import evaluate as ev  # noqa: E402
from train.augment import IMAGENET_MEAN, IMAGENET_STD, fitted_preprocess, preprocess_all, show  # noqa: E402
from train.models.ae import build_autoencoder  # noqa: E402
from train.models.layers import L2Normalized  # noqa: E402


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device) -> None:
    """Set every batch norm's running mean / variance to their average over ``x`` for the final weights
    (one forward pass in train mode, batches in a fixed order). The running averages kept during training
    lag behind weights that change fast (few steps, small batches: VGG on a few photos); without this the
    eval-mode network, the one exported and searched with, can reconstruct far worse than training showed."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) == 0:
        return
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for part in batches(torch.arange(len(x)), max(2, batch_size), None):
        model(x[part].to(device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)


def make_preprocess(cfg: AEConfig, train_images) -> Preprocess:
    if cfg.arch == "vgg16bn":  # ImageNet statistics, as the (optionally pretrained) VGG expects
        return Preprocess(size=(cfg.image_size, cfg.image_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          extra={"model": "ae-vgg16bn"})
    return fitted_preprocess(train_images, size=cfg.image_size, extra={"model": "ae-conv"})


def encoder_kwargs(cfg: AEConfig) -> dict:
    return {} if cfg.arch == "vgg16bn" else {"image_size": cfg.image_size, "code_dim": cfg.code_dim}


@cli_main
def main(argv=None) -> dict:
    cfg, args = parse_config(argv)
    name = f"ae-{cfg.arch}"
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    if device.type == "cpu":  # torch flags max_unpool2d as nondeterministic for CUDA; on the CPU it is deterministic
        warnings.filterwarnings("ignore", message="max_unpooling2d_forward_out does not have a deterministic")
    t0, c0 = time.time(), time.process_time()

    out = args.out or default_out(name)
    check_run_folder(out, ("reconstructions.png",))
    train_set, test_set = load_split(cfg.data, cfg.data_root, limit=cfg.limit, holdout=cfg.holdout,
                                     progress_bar=not args.no_progress)
    if args.resume:
        check_resume(out, name, asdict(cfg), ("arch", "data", "data_root", "image_size", "code_dim", "limit", "holdout", "seed"))
    run = Run(out, name=name, config=asdict(cfg), resume=args.resume, checkpoint_every=args.checkpoint_every)
    state = run.resume_state()
    if state is not None:
        pre = Preprocess.from_dict(state["encoder"]["preprocess"])
    else:
        pre = make_preprocess(cfg, train_set.images)
    x_train = preprocess_all(pre, train_set.images)  # (n, 3, s, s)
    x_test = preprocess_all(pre, test_set.images)
    print(f"{name}: {len(x_train)} training / {len(x_test)} held-out {cfg.data} images at {cfg.image_size}px, "
          f"device {device}", file=sys.stderr)

    model = build_autoencoder(cfg.arch, pretrained=cfg.pretrained and state is None,
                              image_size=cfg.image_size, code_dim=cfg.code_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, step, losses = Run.restore(state, model, opt)
    cut_short = cut_short_epochs(state)
    encoder = L2Normalized(model.encoder)  # shares the parameters; what the registry rebuilds

    def save(epochs_done: int, position: dict | None = None) -> str:
        complete, words = epoch_progress(epochs_done, cfg.epochs, cut_short=cut_short, max_steps=cfg.max_steps,
                                         position=position)
        run.save(model=model, optimizer=opt, epoch=epochs_done, step=step, complete=complete, progress=words,
                 encoder=encoder_spec(name, encoder_kwargs(cfg), encoder, model.encoder.out_dim, pre),
                 extra={"losses": losses, "position": position, "cut_short_epochs": cut_short})
        return words

    with run.stoppable():
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            every = batches(epoch_order(len(x_train), cfg.seed, epoch), cfg.batch_size, None)
            idx_batches = every[: cfg.max_steps] if cfg.max_steps is not None else every
            tally = EpochTally(state, epoch)  # a checkpoint written mid-epoch: go on from there
            bar = progress(idx_batches[tally.done:], desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                           disable=args.no_progress)
            for i, idx in enumerate(bar, tally.done + 1):
                xb = x_train[idx].to(device)
                loss = F.mse_loss(model(xb), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                tally.add(loss.item(), len(idx))
                bar.set_postfix(loss=f"{tally.mean:.4f}")
                run.after_step(save, epoch=epoch, step=step,
                               position=tally.position(i, len(idx_batches), cfg.batch_size))
            losses.append(tally.mean)
            cut_short += len(idx_batches) < len(every)
            if epoch + 1 == cfg.epochs:
                recalibrate_batchnorm(model, x_train, cfg.batch_size, device)
            print(f"{name} epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.5f} ({tally.seconds():.1f}s)",
                  file=sys.stderr)
            run.after_epoch(save, epoch=epoch, epochs=cfg.epochs)

    complete, words = epoch_progress(max(start_epoch, cfg.epochs), cfg.epochs, cut_short=cut_short,
                                     max_steps=cfg.max_steps)
    metrics = {"model": name, "data": cfg.data, "n_train": len(x_train), "n_test": len(x_test),
               "epochs": cfg.epochs, "steps": step, "complete": complete, "progress": words, "loss_per_epoch": losses,
               "preprocess": pre.to_dict(),
               "skipped_images": train_set.skipped}
    metrics.update(evaluate(model, encoder, pre, x_train, x_test, train_set, test_set, device=device))
    metrics["train_seconds"] = round(time.time() - t0, 1)  # wall clock, loading and evaluation included
    metrics["cpu_seconds"] = round(time.process_time() - c0, 1)  # CPU time of all threads (load-independent)
    run.write_metrics(metrics)
    _figure(run, model, pre, x_test if len(x_test) else x_train, device)
    for k in ("test_mse", "knn1_accuracy", "knn1_raw_pixels", "knn1_hsv_histogram", "kmeans_nmi"):
        if metrics.get(k) is not None:
            print(f"{name} {k}: {metrics[k]:.4f}")
    return metrics


@torch.no_grad()
def _recon_mse(model, x: torch.Tensor, device, batch: int = 64) -> float | None:
    if len(x) == 0:
        return None
    model.eval()
    total = 0.0
    for s in range(0, len(x), batch):
        xb = x[s : s + batch].to(device)
        total += float(F.mse_loss(model(xb), xb, reduction="sum"))
    return total / x.numel()


def evaluate(model, encoder, pre, x_train, x_test, train_set: ImageSet, test_set: ImageSet, *, device) -> dict:
    """Held-out reconstruction MSE; with labels, 1-NN accuracy (cosine) of held-out images against the
    training images for the embedding, raw pixels and HSV histograms, and k-means NMI on the held-out set."""
    out = {"train_mse": _recon_mse(model, x_train, device), "test_mse": _recon_mse(model, x_test, device)}
    if train_set.labels is None or len(test_set) == 0:
        return out
    emb_tr = ev.embed(encoder, x_train.numpy(), None, device=device)
    emb_te = ev.embed(encoder, x_test.numpy(), None, device=device)
    out["knn1_accuracy"] = ev.knn1_accuracy(emb_tr, train_set.labels, emb_te, test_set.labels)
    out["knn1_raw_pixels"] = ev.knn1_accuracy(ev.raw_pixels(train_set.images, size=32), train_set.labels,
                                              ev.raw_pixels(test_set.images, size=32), test_set.labels)
    out["knn1_hsv_histogram"] = ev.knn1_accuracy(ev.hsv_histogram(train_set.images), train_set.labels,
                                                 ev.hsv_histogram(test_set.images), test_set.labels)
    if len(np.unique(test_set.labels)) >= 2:
        out["kmeans_nmi"] = ev.kmeans_nmi(emb_te, test_set.labels, seed=0)
    return out


@torch.no_grad()
def _figure(run: Run, model, pre: Preprocess, x: torch.Tensor, device, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    xb = x[:n]
    rec = model(xb.to(device)).cpu().numpy()
    rows = [show(pre, xb.numpy()), show(pre, rec)]
    fig, axes = plt.subplots(2, len(xb), figsize=(1.6 * len(xb), 3.4), squeeze=False)
    for r, title in enumerate(("input", "reconstruction")):
        for c in range(len(xb)):
            ax = axes[r][c]
            ax.imshow(rows[r][c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title)
    fig.suptitle(f"{run.name}: held-out images and their reconstructions")
    run.save_figure(fig, "reconstructions.png")


if __name__ == "__main__":
    main()
