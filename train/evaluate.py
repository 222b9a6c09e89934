"""Evaluation helpers shared by the trainers, demo and benchmarks.

- ``embed``: run an encoder over images with its exact ``Preprocess`` -> (n, dim) float32.
- ``knn1_accuracy`` / ``loo_knn1_accuracy``: 1-nearest-neighbour label accuracy under cosine similarity
  (ties go to the lowest index, as ``argmax`` does).
- ``kmeans_nmi``: k-means on L2-normalised embeddings, normalised mutual information against the labels.
- ``raw_pixels`` / ``hsv_histogram``: the label-free baselines every learned encoder must beat.
- ``balanced_pairs``, ``pair_accuracy``, ``best_threshold``: same / different pair verification.

Zero vectors: cosine similarity with a zero vector is 0 (normalisation leaves it at zero).
"""

from __future__ import annotations

import numpy as np

from engine.preprocess import Preprocess, to_rgb


def _as_labels(labels, n: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{what} must have shape ({n},), got {y.shape}")
    return y


def _as_emb(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{what} must have shape (n, dim), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return a


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def embed(model, images, preprocess: Preprocess | None, *, batch_size: int = 128, device="cpu") -> np.ndarray:
    """Embed images with ``model`` -> (n, dim) float32.

    ``images``: uint8 RGB images (an (n, H, W, 3) array or a list of (H, W[, 3]) arrays), preprocessed
    batch by batch with ``preprocess``; or, with ``preprocess=None``, an already preprocessed float32
    (n, 3, h, w) array. Runs under ``torch.no_grad`` in eval mode (the model's mode is restored after).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if preprocess is None:
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[1] != 3 or arr.dtype != np.float32:
            raise ValueError(f"with preprocess=None, images must be a float32 (n, 3, h, w) array, got {arr.dtype} {arr.shape}")
        n = len(arr)
    else:
        n = len(images)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, n, batch_size):
                chunk = images[s : s + batch_size]
                x = np.asarray(chunk) if preprocess is None else preprocess(chunk)
                y = model(torch.from_numpy(np.ascontiguousarray(x)).to(device))
                out.append(y.detach().float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def _nearest(queries: np.ndarray, base: np.ndarray, *, exclude_self: bool = False, block: int = 1024) -> np.ndarray:
    """Index of the cosine-nearest base row for each query row (ties: lowest index)."""
    q = l2_normalize(queries)
    b = l2_normalize(base)
    out = np.empty(len(q), np.int64)
    for s in range(0, len(q), block):
        sims = q[s : s + block] @ b.T  # (block, nb)
        if exclude_self:
            r = np.arange(s, min(s + block, len(q)))
            sims[r - s, r] = -np.inf
        out[s : s + block] = sims.argmax(1)
    return out


def knn1_accuracy(train_emb, train_labels, test_emb, test_labels) -> float:
    """Fraction of test rows whose cosine-nearest training row has the same label."""
    tr = _as_emb(train_emb, "train_emb")
    te = _as_emb(test_emb, "test_emb")
    if tr.shape[1] != te.shape[1]:
        raise ValueError(f"train_emb and test_emb must have the same dim, got {tr.shape[1]} and {te.shape[1]}")
    if len(tr) == 0 or len(te) == 0:
        raise ValueError(f"need at least one training and one test row, got {len(tr)} and {len(te)}")
    ytr = _as_labels(train_labels, len(tr), "train_labels")
    yte = _as_labels(test_labels, len(te), "test_labels")
    nn_idx = _nearest(te, tr)
    return float(np.mean(ytr[nn_idx] == yte))


def loo_knn1_accuracy(emb, labels) -> float:
    """Leave-one-out 1-NN accuracy: each row against all the others (cosine)."""
    e = _as_emb(emb, "emb")
    if len(e) < 2:
        raise ValueError(f"leave-one-out needs at least 2 rows, got {len(e)}")
    y = _as_labels(labels, len(e), "labels")
    nn_idx = _nearest(e, e, exclude_self=True)
    return float(np.mean(y[nn_idx] == y))


def kmeans_nmi(emb, labels, *, n_clusters: int | None = None, seed: int = 0) -> float:
    """NMI between the labels and k-means clusters of the L2-normalised embeddings (k = number of labels)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    e = _as_emb(emb, "emb")
    y = _as_labels(labels, len(e), "labels")
    k = int(n_clusters) if n_clusters is not None else len(np.unique(y))
    if not 1 <= k <= len(e):
        raise ValueError(f"n_clusters must be between 1 and the number of rows ({len(e)}), got {k}")
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(l2_normalize(e))
    return float(normalized_mutual_info_score(y, pred))


def raw_pixels(images, size: int = 32) -> np.ndarray:
    """Baseline: each image resized (stretched) to size x size RGB, scaled to [0, 1], flattened
    -> (n, size*size*3) float32 (channel-major: all R, then G, then B)."""
    pre = Preprocess(size=(size, size), resize="exact", crop="none")
    x = pre(images)  # (n, 3, size, size)
    return np.ascontiguousarray(x.reshape(len(x), -1))


def hsv_histogram(images, bins: tuple[int, int, int] = (8, 4, 4)) -> np.ndarray:
    """Baseline: joint hue/saturation/value histogram (OpenCV 8-bit HSV: H in 0..179, S and V in 0..255,
    equal-width bins), normalised to sum 1 -> (n, prod(bins)) float32, hue-major."""
    import cv2

    bins = tuple(int(b) for b in bins)
    if len(bins) != 3 or min(bins) < 1:
        raise ValueError(f"bins must be three positive ints (hue, saturation, value), got {bins}")
    items = list(images) if not (isinstance(images, np.ndarray) and images.ndim == 3) else [images]
    out = np.zeros((len(items), int(np.prod(bins))), np.float32)
    for i, im in enumerate(items):
        hsv = cv2.cvtColor(np.ascontiguousarray(to_rgb(im)), cv2.COLOR_RGB2HSV)
        h = cv2.calcHist([hsv], [0, 1, 2], None, list(bins), [0, 180, 0, 256, 0, 256]).ravel()
        out[i] = h / max(float(h.sum()), 1.0)
    return out


def balanced_pairs(labels, n_pairs: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_pairs`` index pairs (i, j), i != j, half of them same-label (the first n_pairs // 2 ... in a shuffled
    order) -> (i, j, same) with same a bool array. Needs a label seen twice and two distinct labels."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(y, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    multi = [c for c, m in enumerate(members) if len(m) >= 2]
    if not multi or len(classes) < 2:
        raise ValueError(f"balanced pairs need a label seen at least twice and two distinct labels; got {len(classes)} labels")
    n_pos = n_pairs // 2
    n_neg = n_pairs - n_pos
    # positives: a class (weighted by size among classes with >= 2 members), then two distinct members
    sizes = np.array([len(members[c]) for c in multi], float)
    pc = rng.choice(len(multi), size=n_pos, p=sizes / sizes.sum())
    pi = np.empty(n_pos, np.int64)
    pj = np.empty(n_pos, np.int64)
    for t, c in enumerate(pc):
        a, b = rng.choice(members[multi[c]], size=2, replace=False)
        pi[t], pj[t] = a, b
    # negatives: two indices with different labels (rejection sampling)
    ni = rng.integers(0, len(y), size=n_neg)
    nj = rng.integers(0, len(y), size=n_neg)
    bad = y[ni] == y[nj]
    while bad.any():
        nj[bad] = rng.integers(0, len(y), size=int(bad.sum()))
        bad = y[ni] == y[nj]
    i = np.concatenate([pi, ni])
    j = np.concatenate([pj, nj])
    same = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
    order = rng.permutation(n_pairs)
    return i[order], j[order], same[order]


def pair_accuracy(scores, same, *, threshold: float) -> float:
    """Fraction of pairs classified right when ``score >= threshold`` means "same" (scores: higher = more alike)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(same, dtype=bool)
    if s.ndim != 1 or s.shape != t.shape:
        raise ValueError(f"scores and same must be 1-D of equal length, got {s.shape} and {t.shape}")
    if len(s) == 0:
        raise ValueError("pair_accuracy needs at least one pair")
    return float(np.mean((s >= threshold) == t))


def best_threshold(scores, same) -> tuple[float, float]:
    """The threshold maximising ``pair_accuracy`` on these pairs -> (threshold, accuracy).

    Candidates are the midpoints between consecutive distinct scores plus one above the maximum
    (everything "different"); the lowest best candidate wins."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(same, dtype=bool)
    if s.ndim != 1 or s.shape != t.shape or len(s) == 0:
        raise ValueError(f"scores and same must be 1-D of equal, non-zero length, got {s.shape} and {t.shape}")
    order = np.argsort(s, kind="stable")
    ss, tt = s[order], t[order]
    uniq, first = np.unique(ss, return_index=True)
    # threshold at uniq[k] (and any value in (uniq[k-1], uniq[k]]): predicted same = rows from first[k] on
    neg_before = np.concatenate([[0], np.cumsum(~tt)])  # negatives below position i
    pos_from = np.concatenate([np.cumsum(tt[::-1])[::-1], [0]])  # positives at or above position i
    starts = np.concatenate([first, [len(ss)]])
    correct = neg_before[starts] + pos_from[starts]
    k = int(np.argmax(correct))
    if k == 0:
        thr = uniq[0]
    elif k == len(uniq):
        thr = uniq[-1] + 1.0
    else:
        thr = 0.5 * (uniq[k - 1] + uniq[k])
    return float(thr), float(correct[k] / len(ss))


def holdout_split(n: int, *, fraction: float = 0.2, tail: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out indices of ``n`` items, held-out = ``round(n * fraction)`` (at least 1 when n >= 2).

    ``tail=True``: the last items are held out (data sets stored in a shuffled order: MNIST, CIFAR-10 —
    10,000 items give train 0..7999, held-out 8000..9999). ``tail=False``: items spread evenly over the
    data set are held out (data sets stored sorted by class), so both parts see every class."""
    if n < 2:
        raise ValueError(f"a train / held-out split needs at least 2 items, got {n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_test = min(n - 1, max(1, int(round(n * fraction))))
    if tail:
        idx = np.arange(n)
        return idx[: n - n_test], idx[n - n_test :]
    test = np.unique((np.arange(n_test) * n) // n_test + (n // n_test) - 1).clip(0, n - 1)
    mask = np.zeros(n, bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
