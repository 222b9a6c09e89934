"""Train a Local Aggregation encoder (Zhuang, Zhai, Yamins, ICCV 2019) without labels.

    python -m train.la                                     # embedded photos: works on a fresh machine
    python -m train.la --data fungi --data-root ../shared/data/fungi-sample
    python -m train.la --data cifar10 --data-root ../shared/data/cifar-10-batches-py
    python -m train.la --arch vgg16bn --image-size 64 --init-from runs/ae-vgg16bn
    python -m train.la --data fungi --data-root ../shared/data/fungi-sample --similar copies

An encoder (VGG16-BN averaged over H, W, or the small conv encoder; then a linear head and L2 normalisation to
128-d) is trained so that each image's code moves towards the codes of its close neighbours (images that
k-means puts in its cluster) and away from the rest of its background neighbours (its nearest codes in a
memory bank); see ``train/models/la.py`` for the objective. The first ``--warmup-epochs`` train with
instance recognition (each image is its own class), since clusters of random codes mean nothing; then k-means
is refit on the memory bank every ``--cluster-every`` epochs (the published code refit on every batch).

Training sees augmented views (random resized crop, flip, colour jitter, random grey; with ``--similar copies``
also rotation, blur and downscale-upscale; done in torch on uint8 images resized once); evaluation and the
exported encoder see the plain ``Preprocess`` recorded in the checkpoint (shorter side to ``--image-size /
--center-crop``, centre crop of ``--image-size``, mean / std). Per-data-set defaults: ``DATA_DEFAULTS``
(``--help`` with ``--data`` shows them).

What "similar" means: ``--similar content`` (the default: the per-data-set settings above, category-level, colour
kept where it tells classes apart) or ``--similar copies`` (``SIMILAR["copies"]``: views invariant to the edits
a copy goes through: crops down to ~30% of the area, flips, small rotations, grey, brightness / contrast / colour
shifts, blur, downscaling; instance recognition for the whole run, since a copy's nearest neighbour must be its
original, not a look-alike of the same kind; 4 times the data set's epochs, which that objective needs). Options
given on the command line override the preset's values.
The preset is recorded in config.json and in the exported model (``lookalike.similar``).

Data: any ``train.data`` set (default: ``photos``, embedded in installed packages). MNIST and CIFAR-10 keep
their last 20% back for evaluation (CIFAR-10's 10,000 test images: train on the first 8,000, evaluate on the
last 2,000); other data sets train on everything and are evaluated leave-one-out. With labels, metrics.json
gets 1-NN accuracy and k-means NMI of the embedding and, measured on the same images, of two label-free
baselines (raw 32x32 pixels and an HSV colour histogram), and the time split between the encoder and the LA
machinery (neighbours, cluster mates, bank update, k-means). The run folder (default ``runs/la``) also gets
checkpoint.pt (every ``--checkpoint-every`` seconds, at the end and on SIGTERM / Ctrl-C, atomically, with the bank,
cluster labels and the position within the epoch; ``--resume`` continues exactly),
config.json and clusters.png (a row of thumbnails per cluster).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from train import split
from train.checkpoint import CheckpointError, load_checkpoint
from train.choices import LA_BACKBONES
from train.common import (ConfigError, EpochTally, Run, check_resume, check_run_folder, cli_main, config_from_args,
                          cut_short_epochs, default_out, encoder_spec, epoch_progress, make_parser, number,
                          pick_device, progress, seed_everything)
from train.data import DATASETS, ImageSet
from train.split import SHUFFLED_DATASETS, batches, epoch_order

NAME = "la"

# Per-data-set defaults (the command line overrides each one), measured in /work/notes/quality_la.md.
# Photos (fungi, the embedded photos, video frames, folders): few images, so many epochs at 64 px; mild colour
# jitter only, since colour tells species apart. CIFAR-10 / digits: thousands of images at 32 px, a few epochs;
# strong colour augmentation (SimCLR's) for CIFAR.
_PHOTO = {"image_size": 64, "train_side": 80, "center_crop": 1.0, "epochs": 60, "batch_size": 32, "warmup_epochs": 15,
          "lr": 0.03,
          "crop_scale": 0.3, "jitter": 0.2, "hue": 0.0, "grayscale": 0.0}
_SMALL = {"image_size": 32, "train_side": 32, "center_crop": 1.0, "epochs": 8, "batch_size": 64, "warmup_epochs": 3,
          "lr": 0.01,
          "crop_scale": 0.2, "jitter": 0.4, "hue": 0.1, "grayscale": 0.2}
_DIGITS = dict(_SMALL, crop_scale=0.3, jitter=0.2, hue=0.0, grayscale=0.0)  # grey already
DATA_DEFAULTS = {
    "fungi": dict(_PHOTO, center_crop=0.75),  # mushrooms sit in the middle of the photo: less background
    "photos": dict(_PHOTO, batch_size=22),  # 22 photographs: one batch per epoch
    "video": dict(_PHOTO, epochs=30, warmup_epochs=8),
    "folder": dict(_PHOTO, epochs=30, warmup_epochs=8),
    "cifar10": dict(_SMALL, arch="kmeans"),  # a k-means patch layer under the head: 1-NN 0.53 vs conv's 0.41
    "mnist": dict(_DIGITS, epochs=2, warmup_epochs=1),  # 56,000 training digits
    "mnist-5k": dict(_DIGITS, epochs=12),
    "digits": dict(_DIGITS, epochs=20, warmup_epochs=5),
}
# What "similar" means (--similar): settings laid over the data set's defaults; the command line overrides both.
# warmup_epochs None: instance recognition for every epoch (--epochs); epochs_factor: the data set's default
# epochs times this. Chosen by benchmarks/copy_detection.py (copy-detection top-1 over fungi-sample + the
# embedded photos, 8 edits): on fungi-sample, instance recognition with these views reached 0.940 / 0.971 / 0.987
# after 60 / 120 / 240 epochs (the content-trained default image model: 0.721).
SIMILAR = {
    "content": {},  # the data set's defaults: today's behaviour
    "copies": {"crop_scale": 0.3, "jitter": 0.4, "hue": 0.05, "grayscale": 0.3, "rotation": 10.0, "blur": 0.5,
               "downscale": 0.3, "center_crop": 1.0, "warmup_epochs": None, "epochs_factor": 4},
}
SIMILAR_CHOICES = tuple(SIMILAR)
VGG_IMAGE_SIZE = 64  # vgg16bn default input side: VGG16 costs ~(side/224)^2 of its 15 GFLOPs per image


@dataclass
class LAConfig:
    arch: str = "conv"  # backbone: "conv" (small CIFAR encoder, 1000-d), "vgg16bn" or "resnet18" (averaged, 512-d),
    # "kmeans" (a k-means patch layer fit before training, 7,200-d)
    data: str = "photos"  # a train.data data set; photos are embedded in installed packages
    data_root: str | None = None  # folder / file of the data set (None: the data set's default)
    # Defaults below marked "photos" are the embedded photos' entry of DATA_DEFAULTS; other data sets have theirs.
    epochs: int = 60  # passes over the training images, warm-up included (photos)
    batch_size: int = 22  # images per step (photos)
    image_size: int = 64  # square network input side for evaluation / export (photos)
    train_side: int = 80  # images are resized once to this square side; random crops are resized to image_size
    center_crop: float = 1.0  # the encoder sees the central square of this fraction of the shorter side (photos)
    dim: int = 128  # embedding size (the paper's 128)
    code_dim: int = 1000  # conv only: the backbone's code size before the head
    width: int = 16  # conv only: channels of the first conv layer (the others: 2x, 4x, 8x)
    temperature: float = 0.07  # tau in exp(v_j . v / tau) (the paper's 0.07)
    background: int = 4096  # k nearest bank rows in the background set B_i (capped at n - 1; the paper's 4096)
    kmeans_k: int | None = None  # clusters per k-means run (None: round(sqrt(n)) for n training images)
    kmeans_repeats: int = 3  # k-means runs whose cluster mates are united into C_i
    kmeans_iterations: int = 20  # Lloyd iterations per k-means run
    cluster_every: int = 1  # refit k-means on the bank every this many epochs (the published code: every batch)
    warmup_epochs: int = 15  # instance-recognition epochs before LA (photos)
    mixing_rate: float = 0.5  # bank update v <- normalise(r * new + (1 - r) * v) (the paper's 0.5)
    lr: float = 0.03  # SGD learning rate, cosine-annealed to 0 over the run (photos; the paper's 0.03)
    momentum: float = 0.9  # SGD momentum (the paper's 0.9)
    weight_decay: float = 5e-4  # SGD weight decay
    crop_scale: float = 0.3  # random resized crops keep between this fraction and all of the area (photos)
    jitter: float = 0.2  # brightness / contrast / saturation factors drawn from [1 - jitter, 1 + jitter] (photos)
    hue: float = 0.0  # hue rotation drawn from [-hue, hue] turns, 0.5 = half the colour circle (photos)
    grayscale: float = 0.0  # probability that a training view is turned grey (photos)
    similar: str = "content"  # what similar means: "content" (the data set's defaults) or "copies" (SIMILAR)
    rotation: float = 0.0  # training views rotated by an angle drawn from [-rotation, rotation] degrees
    blur: float = 0.0  # probability that a training view is blurred (Gaussian, sigma in augment.BLUR_SIGMA px)
    downscale: float = 0.0  # probability that a training view is shrunk (augment.DOWNSCALE) and enlarged back
    init_from: str | None = None  # an autoencoder checkpoint (run folder or file) whose encoder starts the backbone
    pretrained: bool = False  # vgg16bn only: start from torchvision's ImageNet weights when they can be had
    holdout: float | None = None  # fraction held out for evaluation (None: 0.2 for mnist / cifar10, else 0)
    limit: int | None = None  # at most this many training images (None: all)
    max_steps: int | None = None  # stop each epoch after this many steps (None: whole epoch)
    eval_every: int = 0  # with labels, also evaluate every this many epochs (0: only at the end)
    seed: int = 0  # fixes init, data order, augmentation and k-means; fixed seed + CPU gives identical runs
    device: str = "auto"  # auto / cpu / cuda


# Settings that shape the model, the data, the bank or the objective the saved state was trained under, or that
# only act on a fresh run (init_from, pretrained): a resumed run must keep them, since a changed value would be
# recorded in config.json yet not be applied (the bank keeps its saved mixing rate) or change what the saved
# bank and weights mean (temperature).
RESUME_KEYS = ("arch", "data", "data_root", "image_size", "train_side", "center_crop", "dim", "code_dim", "width",
               "limit",
               "holdout", "seed", "kmeans_k", "kmeans_repeats", "background", "mixing_rate", "temperature",
               "init_from", "pretrained")


# --------------------------------------------------------------------------------------------------
# command line


def default_arch(data: str) -> str:
    """The backbone a data set trains by default: the conv backbone, or its ``arch`` entry in DATA_DEFAULTS."""
    return DATA_DEFAULTS.get(data, DATA_DEFAULTS["folder"]).get("arch", "conv")


def data_defaults(data: str, arch: str, similar: str = "content") -> dict:
    """The defaults the command line starts from: the data set's, the backbone's input size, then the preset's."""
    d = dict(DATA_DEFAULTS.get(data, DATA_DEFAULTS["folder"]))
    if arch == "vgg16bn" and d["image_size"] < VGG_IMAGE_SIZE:
        d["image_size"] = d["train_side"] = VGG_IMAGE_SIZE
    d.update(rotation=0.0, blur=0.0, downscale=0.0)
    preset = dict(SIMILAR.get(similar, {}))
    d["epochs"] *= preset.pop("epochs_factor", 1)
    d.update(preset)
    return d


def build_parser(data: str = "photos", arch: str = "conv", similar: str = "content") -> argparse.ArgumentParser:
    d = data_defaults(data, arch, similar)
    warmup = "all the epochs" if d["warmup_epochs"] is None else d["warmup_epochs"]
    p = make_parser("train.la", "Train a Local Aggregation encoder (Zhuang et al., ICCV 2019) without labels.",
                    datasets=DATASETS, default_data="photos", epochs=d["epochs"], batch_size=d["batch_size"],
                    min_batch_size=2)
    p.add_argument("--arch", default=arch, choices=LA_BACKBONES,
                   help="backbone: conv (small CIFAR encoder), vgg16bn (VGG16-BN averaged over H, W), resnet18 "
                        "(torchvision's ResNet-18, random init, averaged over H, W) or kmeans (a layer of 400 "
                        "filters learned by k-means on whitened 6x6 patches before training, Coates & Ng 2011; "
                        f"frozen, LA trains the head on it) (default for this data set: {arch})")
    p.add_argument("--image-size", type=number(int, low=8), default=d["image_size"],
                   help=f"square network input side (default for this data set: {d['image_size']})")
    p.add_argument("--train-side", type=number(int, low=8), default=d["train_side"],
                   help=f"side the training images are resized to before random crops (default: {d['train_side']})")
    p.add_argument("--center-crop", type=number(float, low=0, high=1, low_open=True), default=d["center_crop"],
                   help=f"the encoder (training and export) sees the central square of this fraction of the "
                        f"shorter side (default for this data set: {d['center_crop']})")
    p.add_argument("--dim", type=number(int, low=1), default=128, help="embedding size (default: 128)")
    p.add_argument("--code-dim", type=number(int, low=1), default=1000,
                   help="conv: the backbone's code size (default: 1000)")
    p.add_argument("--width", type=number(int, low=1), default=16,
                   help="conv: channels of the first conv layer, doubled at each of the next three (default: 16)")
    p.add_argument("--temperature", type=number(float, low=0, low_open=True), default=0.07,
                   help="softmax temperature tau (default: 0.07)")
    p.add_argument("--background", "--k", dest="background", type=number(int, low=1), default=4096,
                   help="background neighbours: k nearest bank rows, capped at n - 1 (default: 4096)")
    p.add_argument("--kmeans-k", type=number(int, low=1), default=None,
                   help="clusters per k-means run (default: round(sqrt(n)) for n training images)")
    p.add_argument("--kmeans-repeats", type=number(int, low=1), default=3,
                   help="k-means runs united into close neighbours (default: 3)")
    p.add_argument("--kmeans-iterations", type=number(int, low=1), default=20,
                   help="Lloyd iterations per k-means run (default: 20)")
    p.add_argument("--cluster-every", type=number(int, low=1), default=1,
                   help="refit k-means every this many epochs (default: 1)")
    p.add_argument("--similar", default="content", choices=SIMILAR_CHOICES,
                   help="what similar means: content (the data set's defaults: categories, colour kept) or copies "
                        "(edited copies of one photo: adds rotation, blur, downscaling, grey, colour shifts and "
                        "trains instance recognition throughout, 4 times the data set's epochs); explicit options "
                        "override the preset "
                        "(default: content)")
    p.add_argument("--warmup-epochs", type=number(int, low=0), default=d["warmup_epochs"],
                   help=f"instance-recognition epochs before LA (default for this data set and preset: {warmup})")
    p.add_argument("--mixing-rate", type=number(float, low=0, high=1, low_open=True), default=0.5,
                   help="memory-bank mixing rate (default: 0.5)")
    p.add_argument("--lr", type=number(float, low=0), default=d["lr"],
                   help=f"SGD learning rate, cosine-annealed (default for this data set: {d['lr']})")
    p.add_argument("--momentum", type=number(float, low=0), default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=number(float, low=0), default=5e-4, help="SGD weight decay (default: 5e-4)")
    p.add_argument("--crop-scale", type=number(float, low=0, high=1, low_open=True), default=d["crop_scale"],
                   help=f"random resized crops keep between this fraction and all of the area "
                        f"(default: {d['crop_scale']})")
    p.add_argument("--jitter", type=number(float, low=0, high=1, high_open=True), default=d["jitter"],
                   help=f"brightness / contrast / saturation jitter strength (default: {d['jitter']})")
    p.add_argument("--hue", type=number(float, low=0, high=0.5), default=d["hue"],
                   help=f"hue jitter in turns, at most 0.5 (default: {d['hue']})")
    p.add_argument("--grayscale", type=number(float, low=0, high=1), default=d["grayscale"],
                   help=f"probability of a grey training view (default: {d['grayscale']})")
    p.add_argument("--rotation", type=number(float, low=0, high=180), default=d["rotation"],
                   help=f"rotate training views by up to this many degrees either way (default: {d['rotation']})")
    p.add_argument("--blur", type=number(float, low=0, high=1), default=d["blur"],
                   help=f"probability of a blurred training view (default: {d['blur']})")
    p.add_argument("--downscale", type=number(float, low=0, high=1), default=d["downscale"],
                   help=f"probability of a training view shrunk and enlarged back (default: {d['downscale']})")
    p.add_argument("--init-from", default=None,
                   help="start the backbone from this autoencoder checkpoint (run folder or file, e.g. runs/ae-conv)")
    p.add_argument("--pretrained", action="store_true",
                   help="vgg16bn: start from torchvision's ImageNet weights (needs them cached or a network)")
    p.add_argument("--holdout", type=number(float, low=0, high=1, high_open=True), default=None,
                   help="fraction held out for evaluation (default: 0.2 for mnist / cifar10, else 0: leave-one-out)")
    p.add_argument("--eval-every", type=number(int, low=0), default=0,
                   help="with labels, also evaluate (1-NN, NMI) every this many epochs (default: 0, only at the end)")
    return p


def parse_config(argv=None) -> tuple[LAConfig, argparse.Namespace]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", default="photos")
    pre.add_argument("--arch", default=None)
    pre.add_argument("--similar", default="content")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(known.data, known.arch or default_arch(known.data), known.similar)
    args = parser.parse_args(argv)
    if args.warmup_epochs is None:  # the preset's "every epoch"
        args.warmup_epochs = args.epochs
    if args.arch == "conv" and args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 for the conv backbone, got {args.image_size}")
    if args.arch in ("vgg16bn", "resnet18") and args.image_size < 32:
        parser.error(f"--image-size must be at least 32 for {args.arch} (stride 32), got {args.image_size}")
    if args.arch in ("resnet18", "kmeans") and args.init_from:
        parser.error(f"--init-from needs an autoencoder's backbone (conv or vgg16bn); there is no {args.arch} autoencoder")
    cfg = config_from_args(LAConfig, args)
    if cfg.holdout is None:
        cfg.holdout = 0.2 if cfg.data in SHUFFLED_DATASETS else 0.0
    return cfg, args


if __name__ == "__main__":  # python -m train.la: --help and argument errors answer here, before torch loads
    parse_config()

# the training machinery, imported once the command line has been read (torch alone takes seconds)
import torch  # noqa: E402

from engine.memory_bank import MemoryBank  # noqa: E402
from engine.preprocess import Preprocess  # noqa: E402
from train import evaluate as ev  # noqa: E402
from train.augment import (IMAGENET_MEAN, IMAGENET_STD, augment, epoch_generator, fitted_preprocess,  # noqa: E402
                           preprocess_all, resize_side, resized_uint8)
from train.models.ae import backbone_state_from_ae  # noqa: E402
from train.models.la import LAEncoder, LocalAggregation  # noqa: E402


# --------------------------------------------------------------------------------------------------
# data


def load_split(cfg: LAConfig, *, progress_bar: bool = False) -> tuple[ImageSet, ImageSet | None]:
    """(train, held-out) for ``cfg``: held-out is the tail of MNIST / CIFAR-10 (stored shuffled), evenly spread
    items of other data sets, or None with ``holdout == 0`` (evaluation is then leave-one-out on train)."""
    return split.load_split(cfg.data, cfg.data_root, limit=cfg.limit, holdout=cfg.holdout, progress_bar=progress_bar,
                            min_train=3, who="LA")


def make_preprocess(cfg: LAConfig, train_images, init_pre: Preprocess | None = None) -> Preprocess:
    """The evaluation / export preprocessing: shorter side to image_size / center_crop, centre crop of
    image_size, mean / std (ImageNet's for vgg16bn, the training images' own for conv, or the autoencoder's
    when starting from one)."""
    size = (cfg.image_size, cfg.image_size)
    geometry = dict(size=size, resize_to=resize_side(cfg.image_size, cfg.center_crop), extra={"model": NAME})
    if init_pre is not None:
        return Preprocess(mean=init_pre.mean, std=init_pre.std, color=init_pre.color, **geometry)
    if cfg.arch == "vgg16bn":
        return Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD, **geometry)
    return fitted_preprocess(train_images, **geometry)


# --------------------------------------------------------------------------------------------------
# training


def lr_at(cfg: LAConfig, step: int, total_steps: int) -> float:
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def _init_backbone(model: LAEncoder, cfg: LAConfig) -> Preprocess:
    """Load the autoencoder's encoder weights into the backbone; returns the autoencoder's Preprocess."""
    try:
        state = backbone_state_from_ae(cfg.init_from, cfg.arch)
        path = Path(cfg.init_from)
        ckpt = load_checkpoint(path / "checkpoint.pt" if path.is_dir() else path)
    except CheckpointError as e:  # missing, damaged, another model, or holding more than tensors: error + exit 2
        raise CheckpointError(f"--init-from: {e}") from None
    try:
        model.backbone.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(
            f"--init-from {cfg.init_from}: its encoder does not fit this {cfg.arch} backbone at --image-size "
            f"{cfg.image_size} / --code-dim {cfg.code_dim} ({str(e).splitlines()[0]})") from None
    pre = Preprocess.from_dict(ckpt["encoder"]["preprocess"])
    if cfg.arch == "conv" and tuple(pre.size) != (cfg.image_size, cfg.image_size):
        raise ConfigError(f"--init-from {cfg.init_from}: the autoencoder was trained at {pre.size}, "
                         f"this run at {cfg.image_size}x{cfg.image_size}")
    print(f"la: backbone initialised from {ckpt['_path']}", file=sys.stderr)
    return pre


def encoder_kwargs(cfg: LAConfig) -> dict:
    kw = {"backbone": cfg.arch, "dim": cfg.dim, "image_size": cfg.image_size, "code_dim": cfg.code_dim}
    return kw if cfg.width == 16 else {**kw, "width": cfg.width}  # checkpoints of the default width as before


def default_kmeans_k(n: int) -> int:
    """round(sqrt(n)), at least 2 and at most n: 13 for 158 fungi photos, 89 for 8,000 CIFAR images."""
    return int(min(n, max(2, round(math.sqrt(n)))))


def plain_inputs(images, pre: Preprocess) -> torch.Tensor:
    """Original images (uint8 RGB, an array or a list) -> (b, 3, s, s) float32 through ``pre``, the evaluation /
    export preprocessing, no augmentation: exactly what the exported encoder sees for these images."""
    return torch.from_numpy(pre(images))


@torch.no_grad()
def initial_codes(model, images, pre: Preprocess, device, batch_size: int) -> np.ndarray:
    """The bank's starting point: one pass of the (plain, unaugmented) training images through the encoder
    in training mode, batch by batch as training will see them. ``images`` are the original training images,
    taken through the evaluation / export preprocessing ``pre`` (not the ``resized_uint8`` views, which are
    already centre-cropped: ``pre`` would crop them a second time). (In eval mode a fresh network's batch norms
    use their initial running statistics and give codes unlike the training-mode codes the loss compares
    with the bank; the instance-recognition loss then starts above log n.) The pass also warms the batch-norm
    running statistics."""
    model.train()
    n = len(images)
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:  # batch norm needs two images: merge a last single
        del bounds[-2]
    out = [model(plain_inputs(images[a:b], pre).to(device)).cpu().numpy() for a, b in zip(bounds, bounds[1:])]
    return np.concatenate(out).astype(np.float32)


def _numpy(x):
    """A checkpoint's array (a tensor since checkpoint format 2) as numpy; None stays None."""
    return x.numpy() if isinstance(x, torch.Tensor) else (None if x is None else np.asarray(x))


class _Clock:
    """Accumulates wall time per category (seconds)."""

    def __init__(self, totals: dict | None = None):
        self.totals = dict(totals or {})

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds


def train_step(model, objective: LocalAggregation, optimizer, views: torch.Tensor, rows: torch.Tensor, *,
               mode: str, clock: _Clock | None = None) -> tuple[float, torch.Tensor]:
    """One step: codes of the views, loss from the bank as it is, backward + optimiser step, and only then the
    bank update with the (detached) codes. Returns (loss, codes)."""
    t0 = time.perf_counter()
    codes = model(views)  # (b, dim)
    t1 = time.perf_counter()
    before = objective.timings["neighbours"]
    loss = objective.loss(rows, codes, mode=mode)
    t2 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    t3 = time.perf_counter()
    objective.update_bank(rows, codes)
    if clock is not None:
        clock.add("encoder", (t1 - t0) + (t3 - t2))
        clock.add("loss", (t2 - t1) - (objective.timings["neighbours"] - before))
    return float(loss.detach()), codes.detach()


@cli_main
def main(argv=None) -> dict:
    cfg, args = parse_config(argv)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    t_start = time.time()
    out = Path(args.out or default_out(NAME))
    check_run_folder(out, ("clusters.png",))

    train_set, test_set = load_split(cfg, progress_bar=not args.no_progress)
    n = len(train_set)
    if cfg.kmeans_k is None:
        cfg.kmeans_k = default_kmeans_k(n)
    if cfg.kmeans_k > n:
        raise ConfigError(f"--kmeans-k must be at most the number of training images ({n}), got {cfg.kmeans_k}")
    batch_size = min(cfg.batch_size, n)

    if args.resume:
        check_resume(out, NAME, asdict(cfg), RESUME_KEYS)
    run = Run(out, name=NAME, config=asdict(cfg), resume=args.resume, checkpoint_every=args.checkpoint_every)
    state = run.resume_state()
    model = LAEncoder(backbone=cfg.arch, dim=cfg.dim, image_size=cfg.image_size, code_dim=cfg.code_dim, width=cfg.width,
                      pretrained=cfg.pretrained and state is None)
    if state is not None:
        pre = Preprocess.from_dict(state["encoder"]["preprocess"])
    else:
        init_pre = _init_backbone(model, cfg) if cfg.init_from else None
        pre = make_preprocess(cfg, train_set.images, init_pre)
        if cfg.arch == "kmeans":  # learned from the training images before LA, then frozen
            fit = model.backbone.fit(preprocess_all(pre, train_set.images), seed=cfg.seed)
            print(f"la: k-means layer fit: {fit['clusters']} clusters of {fit['patches']} whitened patches in "
                  f"{fit['seconds']} s", file=sys.stderr)
    model = model.to(device)
    views = resized_uint8(train_set.images, cfg.train_side, center_crop=cfg.center_crop)  # (n, S, S, 3) uint8
    print(f"la: {n} training images ({cfg.data}), {0 if test_set is None else len(test_set)} held out, "
          f"{cfg.arch} at {cfg.image_size}px, k-means k={cfg.kmeans_k} x{cfg.kmeans_repeats}, "
          f"background k={min(cfg.background, n - 1)}, device {device}", file=sys.stderr)

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    bank = MemoryBank(n, cfg.dim, mixing_rate=cfg.mixing_rate, seed=cfg.seed)
    objective = LocalAggregation(bank, background=cfg.background, temperature=cfg.temperature)
    start_epoch, step, losses, modes, epoch_times, evals = 0, 0, [], [], [], []
    evaluator = Evaluator(train_set, test_set)
    clock = _Clock()
    cut_short = cut_short_epochs(state)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        extra = state["extra"]
        objective.bank = bank = MemoryBank.from_state_dict({**extra["bank"],
                                                            "vectors": _numpy(extra["bank"]["vectors"])})
        objective.cluster_labels = _numpy(extra.get("cluster_labels"))
        losses, modes = list(extra.get("losses", [])), list(extra.get("modes", []))
        epoch_times = list(extra.get("epoch_seconds", []))
        evals = list(extra.get("eval_per_epoch", []))
        clock = _Clock(extra.get("time_split", {}))
        Run.restore_rng(state)
    else:
        t = time.perf_counter()
        bank.fill(initial_codes(model, train_set.images, pre, device, max(batch_size, 2)))  # the encoder's codes
        clock.add("bank_init", time.perf_counter() - t)

    steps_per_epoch = len(batches(torch.arange(n), batch_size, cfg.max_steps, min_last=2))
    total_steps = steps_per_epoch * cfg.epochs
    aug = dict(out_size=cfg.image_size, mean=pre.mean, std=pre.std, color=pre.color, crop_scale=cfg.crop_scale,
               jitter=cfg.jitter, hue=cfg.hue, grayscale=cfg.grayscale, rotation=cfg.rotation, blur=cfg.blur,
               downscale=cfg.downscale)

    def save(epoch_done: int, position: dict | None = None) -> str:
        complete, words = epoch_progress(epoch_done, cfg.epochs, cut_short=cut_short, max_steps=cfg.max_steps,
                                         position=position)
        t = time.perf_counter()
        encoder = encoder_spec(NAME, encoder_kwargs(cfg), model, cfg.dim, pre)  # shares the model's weights
        run.save(model=model, optimizer=opt, epoch=epoch_done, step=step, encoder=encoder, complete=complete,
                 progress=words,
                 extra={"bank": bank.state_dict(), "cluster_labels": objective.cluster_labels, "losses": losses,
                        "modes": modes, "epoch_seconds": epoch_times, "time_split": clock.totals,
                        "eval_per_epoch": evals, "position": position, "cut_short_epochs": cut_short})
        clock.add("checkpoint", time.perf_counter() - t)
        return words

    with run.stoppable():
        for epoch in range(start_epoch, cfg.epochs):
            tally = EpochTally(state, epoch, clock=time.perf_counter)  # or the rest of one a checkpoint stopped in
            model.train()
            mode = "ir" if epoch < cfg.warmup_epochs else "la"
            gen = epoch_generator(cfg.seed, epoch)
            every = batches(epoch_order(n, cfg.seed, epoch), batch_size, min_last=2)
            idx_batches = every[: cfg.max_steps] if cfg.max_steps is not None else every
            if tally.resumed:  # it keeps its clusters (refit at the epoch's start) and augmentation generator
                gen.set_state(tally.resumed["generator"])
            elif mode == "la" and ((epoch - cfg.warmup_epochs) % cfg.cluster_every == 0
                                   or objective.cluster_labels is None):
                t = time.perf_counter()
                objective.recluster(cfg.kmeans_k, repeats=cfg.kmeans_repeats, iterations=cfg.kmeans_iterations,
                                    seed=cfg.seed * 1000 + epoch)
                clock.add("cluster", time.perf_counter() - t)
            nb0, up0 = objective.timings["neighbours"], objective.timings["bank_update"]
            bar = progress(idx_batches[tally.done:], desc=f"la epoch {epoch + 1}/{cfg.epochs} ({mode})",
                           disable=args.no_progress)
            for i, idx in enumerate(bar, tally.done + 1):
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step, total_steps)
                t = time.perf_counter()
                xb = augment(views[idx], generator=gen, **aug).to(device)
                clock.add("augment", time.perf_counter() - t)
                loss, _ = train_step(model, objective, opt, xb, idx, mode=mode, clock=clock)
                step += 1
                tally.add(loss, len(idx))
                bar.set_postfix(loss=f"{tally.mean:.4f}")
                if run.due(boundary=False):
                    clock.add("neighbours", objective.timings["neighbours"] - nb0)
                    clock.add("bank_update", objective.timings["bank_update"] - up0)
                    nb0, up0 = objective.timings["neighbours"], objective.timings["bank_update"]
                    words = save(epoch, tally.position(i, len(idx_batches), cfg.batch_size, generator=gen.get_state()))
                    run.exit_if_stopped(f"after step {step} ({words})")
            clock.add("neighbours", objective.timings["neighbours"] - nb0)
            clock.add("bank_update", objective.timings["bank_update"] - up0)
            losses.append(tally.mean)
            modes.append(mode)
            cut_short += len(idx_batches) < len(every)
            epoch_times.append(tally.seconds())
            clock.add("epochs", epoch_times[-1])
            print(f"la epoch {epoch + 1}/{cfg.epochs} ({mode}): loss {losses[-1]:.4f} ({epoch_times[-1]:.1f}s)",
                  file=sys.stderr)
            if cfg.eval_every and evaluator.labelled and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
                evals.append({"epoch": epoch + 1, **evaluator.embedding(model, pre, device=device)})
                print(f"la epoch {epoch + 1}: 1-NN {evals[-1]['knn1_accuracy']:.4f}, "
                      f"NMI {evals[-1]['kmeans_nmi']:.4f}", file=sys.stderr)
            run.after_epoch(save, epoch=epoch, epochs=cfg.epochs)

    complete, words = epoch_progress(max(start_epoch, cfg.epochs), cfg.epochs, cut_short=cut_short,
                                     max_steps=cfg.max_steps)
    train_seconds = time.time() - t_start
    metrics = {"model": NAME, "data": cfg.data, "arch": cfg.arch, "n_train": n,
               "n_test": 0 if test_set is None else len(test_set), "epochs": cfg.epochs, "steps": step,
               "complete": complete, "progress": words,
               "kmeans_k": cfg.kmeans_k, "background": min(cfg.background, n - 1),
               "loss_per_epoch": losses, "mode_per_epoch": modes, "epoch_seconds": [round(s, 2) for s in epoch_times],
               "time_split": time_split(clock.totals), "train_seconds": round(train_seconds, 1),
               "skipped_images": train_set.skipped}
    metrics["eval_per_epoch"] = evals
    metrics.update(evaluator(model, pre, device=device))
    run.write_metrics(metrics)
    _clusters_figure(run, objective, views, cfg)
    report(metrics)
    return metrics


def time_split(totals: dict) -> dict:
    """Seconds per category over the epochs run here and the machinery's share of the epochs' wall time.

    encoder: forward + backward + optimiser step; loss: scores against the bank and the logsumexps;
    machinery: neighbours (top-k of the bank, cluster mates) + bank update + k-means."""
    out = {k: round(float(v), 3) for k, v in totals.items()}
    wall = float(totals.get("epochs", 0.0))
    machinery = sum(float(totals.get(k, 0.0)) for k in ("neighbours", "bank_update", "cluster"))
    out["machinery"] = round(machinery, 3)
    if wall > 0:
        out["machinery_fraction"] = round(machinery / wall, 4)
        out["machinery_and_loss_fraction"] = round((machinery + float(totals.get("loss", 0.0))) / wall, 4)
        out["encoder_fraction"] = round(float(totals.get("encoder", 0.0)) / wall, 4)
        out["augment_fraction"] = round(float(totals.get("augment", 0.0)) / wall, 4)
    return out


class Evaluator:
    """With labels: 1-NN accuracy (held-out against train, or leave-one-out on train) and k-means NMI (k =
    number of classes) of the embedding and of the raw-pixel and HSV-histogram baselines on the same images.
    The baselines are computed once, on first use."""

    def __init__(self, train_set: ImageSet, test_set: ImageSet | None):
        self.train_set, self.test_set = train_set, test_set
        self.held_out = test_set is not None and len(test_set) > 0
        self._baselines: dict | None = None

    @property
    def labelled(self) -> bool:
        return self.train_set.labels is not None

    def _scores(self, key: str, emb_tr: np.ndarray, emb_te: np.ndarray | None) -> dict:
        tr, te = self.train_set, self.test_set
        if self.held_out:
            return {f"knn1_accuracy{key}": ev.knn1_accuracy(emb_tr, tr.labels, emb_te, te.labels),
                    f"kmeans_nmi{key}": ev.kmeans_nmi(emb_te, te.labels, seed=0)}
        return {f"knn1_accuracy{key}": ev.loo_knn1_accuracy(emb_tr, tr.labels),
                f"kmeans_nmi{key}": ev.kmeans_nmi(emb_tr, tr.labels, seed=0)}

    def baselines(self) -> dict:
        if self._baselines is None:
            out = {}
            for key, fn in (("_raw_pixels", lambda im: ev.raw_pixels(im, size=32)),
                            ("_hsv_histogram", ev.hsv_histogram)):
                out.update(self._scores(key, fn(self.train_set.images),
                                        fn(self.test_set.images) if self.held_out else None))
            self._baselines = out
        return self._baselines

    def embedding(self, model, pre: Preprocess, *, device) -> dict:
        emb_tr = ev.embed(model, self.train_set.images, pre, device=device)
        emb_te = ev.embed(model, self.test_set.images, pre, device=device) if self.held_out else None
        return self._scores("", emb_tr, emb_te)

    def __call__(self, model, pre: Preprocess, *, device) -> dict:
        if not self.labelled:
            return {}
        out = {"eval": "held-out images, 1-NN against the training images" if self.held_out
               else "leave-one-out 1-NN and k-means NMI on the training images"}
        out.update(self.embedding(model, pre, device=device))
        out.update(self.baselines())
        out["beats_baselines"] = bool(
            all(out["knn1_accuracy"] > out[f"knn1_accuracy_{b}"] and out["kmeans_nmi"] > out[f"kmeans_nmi_{b}"]
                for b in ("raw_pixels", "hsv_histogram")))
        return out


def report(metrics: dict) -> None:
    ts = metrics["time_split"]
    if "machinery_fraction" in ts:
        print(f"la time split: encoder {ts.get('encoder', 0):.1f}s, machinery {ts['machinery']:.1f}s "
              f"({100 * ts['machinery_fraction']:.1f}% of {ts['epochs']:.1f}s of epochs)")
    if "knn1_accuracy" in metrics:
        print(f"la ({metrics['eval']}):")
        for name, key in (("LA", ""), ("raw 32x32 pixels", "_raw_pixels"), ("HSV histogram", "_hsv_histogram")):
            print(f"  {name:<18} 1-NN {metrics['knn1_accuracy' + key]:.4f}  NMI {metrics['kmeans_nmi' + key]:.4f}")


def _clusters_figure(run: Run, objective: LocalAggregation, views: torch.Tensor, cfg: LAConfig,
                     rows: int = 8, per_row: int = 10) -> None:
    """Contact sheet: the largest clusters of the final bank, one row each, members nearest the centroid first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bank = objective.bank
    k = min(cfg.kmeans_k, len(bank))
    labels = bank.cluster(k, repeats=1, iterations=cfg.kmeans_iterations, seed=cfg.seed)[0]
    centroids = bank.centroids[0]
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")[: min(rows, int((sizes > 0).sum()))]
    fig, axes = plt.subplots(len(order), per_row, figsize=(1.2 * per_row, 1.3 * len(order)), squeeze=False)
    for r, c in enumerate(order):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(-(bank.vectors[members] @ centroids[c]), kind="stable")][:per_row]
        for j in range(per_row):
            ax = axes[r][j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
            if j < len(members):
                ax.imshow(views[members[j]].numpy())
        axes[r][0].set_title(f"cluster {c} ({sizes[c]} images)", fontsize=7, loc="left")
    fig.suptitle(f"la on {cfg.data}: the {len(order)} largest of {k} clusters of the memory bank")
    run.save_figure(fig, "clusters.png")


if __name__ == "__main__":
    main()
