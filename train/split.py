"""What trainers share about their data: the split into training and held-out images, and the order and batches
of an epoch (both depend on the seed and the epoch only, so a resumed run repeats them)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from train.data import DataError, ImageSet, load_images

if TYPE_CHECKING:  # torch loads where it is used: a trainer's --help reads SHUFFLED_DATASETS without it
    import torch

SHUFFLED_DATASETS = ("mnist", "cifar10")  # stored in a shuffled order: hold out the tail


def load_split(data: str, root, *, limit: int | None, holdout: float | None, progress_bar: bool = False,
               min_train: int = 2, who: str = "training") -> tuple[ImageSet, ImageSet | None]:
    """Load ``data`` and split it into (train, held-out).

    MNIST and CIFAR-10 are stored shuffled, so the tail is held out (the 10,000 MNIST / CIFAR-10 test images
    give train = first 8,000, held-out = last 2,000); other data sets are often stored sorted by class, so
    evenly spread items are held out. With ``holdout`` 0 (or None) nothing is held out: held-out is None. With
    ``limit``, about ``limit / (1 - holdout)`` images are loaded (spread evenly over the data set) so that at
    most ``limit`` remain for training. Fewer than ``min_train`` training images: ``DataError`` (``who``
    names what needs them)."""
    from train import evaluate as ev

    h = float(holdout or 0.0)
    load_limit = None if limit is None else int(math.ceil(limit / (1.0 - h)))
    full = load_images(data, root, limit=load_limit, progress=progress_bar)
    if h == 0.0:
        train = full if limit is None else full.subset(slice(0, limit))
        if len(train) < min_train:
            raise DataError(f"data set {data!r} gave {len(train)} training image(s){full.skipped_note()}; "
                            f"{who} needs at least {min_train}")
        return train, None
    if len(full) < 2:
        raise DataError(f"data set {data!r} gave {len(full)} image(s){full.skipped_note()}; "
                        f"{who} needs at least {min_train}")
    tr, te = ev.holdout_split(len(full), fraction=h, tail=data in SHUFFLED_DATASETS)
    if limit is not None:
        tr = tr[:limit]
    if len(tr) < min_train:  # batch norm needs two images in a training batch
        raise DataError(f"data set {data!r} gave {len(tr)} training image(s) ({len(te)} held out)"
                        f"{full.skipped_note()}; {who} needs at least {min_train} (raise --limit)")
    return full.subset(tr), full.subset(te)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: depends on (seed, epoch) only, so a resumed run repeats it."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def batches(order: torch.Tensor, batch_size: int, max_steps: int | None = None, *,
            min_last: int | None = None) -> list[torch.Tensor]:
    """Index batches of one epoch. A short last batch (under ``min_last`` images; by default under half a batch,
    or a single image) is dropped: batch norm statistics of a couple of images are too noisy; the order changes
    each epoch, so no image is left out for good. A single batch is never dropped."""
    if min_last is None:
        min_last = max(2, batch_size // 2)
    out = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) < min_last:
        out = out[:-1]
    return out[:max_steps] if max_steps is not None else out
