"""The near-duplicate threshold of ``python -m engine.search dups``, measured on real photos and real edits.

    .venv/bin/python benchmarks/dups_threshold.py                     # the packaged default image model
    .venv/bin/python benchmarks/dups_threshold.py --model models/la.onnx

Photos: the shared fungi sample (/work/shared/data/fungi-sample/images, 158 iNaturalist photos; found through
LOOKALIKE_SHARED_DATA or ../shared/data, skipped with a note when absent) and the photographs bundled with
scikit-image and scikit-learn (``train.data.photo_files``, drawings left out; ``motorcycle_right`` left out too,
being the stereo twin of ``motorcycle_left``, a true near-duplicate of it).

Each photo gets these real edits, each a duplicate of its original (a positive pair):
  crop80   the centre 80 % of each side            crop60   60 % of each side at a seeded random place
  half     resized to 1/2 (INTER_AREA)             third    resized to 1/3
  jpeg30   re-encoded as JPEG at quality 30        rot5     rotated by 5 degrees (edges reflected)
  bright   brightness +30 % (x1.3, clipped)        flip     mirrored left-right (a mirrored copy of a photo is
                                                            counted as a duplicate here: the same picture)
Negative pairs: any two images (originals or edits) of different photos, except two photos of the same
iNaturalist observation (the same specimen photographed twice: neither duplicate nor clearly different, left
out). Pairs of two edits of the same photo are left out too.

For each threshold t the script counts the pairs scoring >= t (cosine similarity of the embeddings) and prints
precision and recall of the duplicate pairs, then the chosen default: the highest recall at precision >= 0.99
(ties: the higher threshold), with each edit's recall there. The score matrix is computed with numpy in float64
from the encoder's embeddings, independently of engine.dups.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EDITS = ("crop80", "crop60", "half", "third", "jpeg30", "rot5", "bright", "flip")
MIN_PRECISION = 0.99
MAX_SIDE = 512  # photos larger than this are resized first (the fungi sample is already 512)


def shared_data() -> Path:
    return Path(os.environ.get("LOOKALIKE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def photos() -> tuple[list[str], list[np.ndarray], list[str]]:
    """(names, RGB uint8 images, group keys: the iNaturalist observation, or the name)."""
    from engine.preprocess import read_image
    from train.data import photo_files

    names, images, groups = [], [], []
    fungi = shared_data() / "fungi-sample"
    if (fungi / "images").is_dir():
        obs = {}
        with open(fungi / "metadata.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                obs[row["image_path"]] = row.get("source_url") or row["image_path"]
        for p in sorted((fungi / "images").glob("*.jpg")):
            names.append(p.name)
            images.append(read_image(p))
            groups.append(obs.get(p.name, p.name))
    else:
        print(f"note: no fungi sample at {fungi}; the bundled photos only", file=sys.stderr)
    for p in photo_files():
        if p.stem == "motorcycle_right":
            continue
        names.append(p.name)
        images.append(read_image(p))
        groups.append(p.name)
    out = []
    for img in images:
        h, w = img.shape[:2]
        s = MAX_SIDE / max(h, w)
        out.append(cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else img)
    return names, out, groups


def edit(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if kind == "crop80":
        dh, dw = round(h * 0.1), round(w * 0.1)
        return img[dh : h - dh, dw : w - dw].copy()
    if kind == "crop60":
        ch, cw = round(h * 0.6), round(w * 0.6)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return img[y : y + ch, x : x + cw].copy()
    if kind in ("half", "third"):
        f = 2 if kind == "half" else 3
        return cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    if kind == "jpeg30":
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
        assert ok
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy()
    if kind == "rot5":
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 5.0, 1.0)
        return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if kind == "bright":
        return np.clip(img.astype(np.float32) * 1.3, 0, 255).astype(np.uint8)
    if kind == "flip":
        return img[:, ::-1].copy()
    raise ValueError(kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="exported encoder (default: the packaged default image model)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    from engine.default_models import default_model
    from engine.encoder import Encoder

    model = Path(args.model) if args.model else default_model("image")
    enc = Encoder(model, batch_size=args.batch_size)
    t0 = time.time()
    _, originals, groups = photos()
    rng = np.random.default_rng(0)
    images, photo, kind = [], [], []
    for i, img in enumerate(originals):
        images.append(img)
        photo.append(i)
        kind.append("original")
        for e in EDITS:
            images.append(edit(img, e, rng))
            photo.append(i)
            kind.append(e)
    emb = enc.encode(images).astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    t_embed = time.time() - t0
    photo, kind = np.array(photo), np.array(kind)
    group = np.array([groups[p] for p in photo])
    sim = emb @ emb.T  # (n, n) cosine similarities
    iu, ju = np.triu_indices(len(images), k=1)
    s = sim[iu, ju]
    same_photo = photo[iu] == photo[ju]
    positive = same_photo & ((kind[iu] == "original") != (kind[ju] == "original"))  # an edit vs its original
    negative = (~same_photo) & (group[iu] != group[ju])
    left_out_obs = int(((~same_photo) & (group[iu] == group[ju])).sum())
    edit_of_pos = np.where(kind[iu][positive] == "original", kind[ju][positive], kind[iu][positive])
    print(f"model {enc.name} ({model}), dim {enc.dim}: {len(originals)} photos x (1 + {len(EDITS)} edits) = "
          f"{len(images)} images embedded in {t_embed:.0f} s")
    print(f"{int(positive.sum())} duplicate pairs (edit vs its original), {int(negative.sum())} different-photo "
          f"pairs ({left_out_obs} pairs of two photos of one iNaturalist observation left out)")
    best = table(s[positive], s[negative], edit_of_pos, f"{enc.name} embeddings")
    # a named peer in the same run: cosine of 32 x 32 grey thumbnails, mean-centred (no learning at all)
    thumbs = np.stack([cv2.resize(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
                       .astype(np.float64).ravel() for im in images])
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.maximum(np.linalg.norm(thumbs, axis=1, keepdims=True), 1e-12)
    ts = (thumbs @ thumbs.T)[iu, ju]
    table(ts[positive], ts[negative], edit_of_pos, "peer: 32x32 grey thumbnails", brief=True)
    if best is None:
        return 1
    print(f"chosen default (the {enc.name} model): {best[0]:.4f}")
    return 0


def table(pos, neg, edit_of_pos, what: str, brief: bool = False):
    """Print precision / recall per threshold and the highest recall at precision >= MIN_PRECISION; returns that
    row (threshold, precision, recall, TP, FP) or None."""
    pos_s, neg_s = np.sort(pos), np.sort(neg)
    n_pos, n_neg = len(pos_s), len(neg_s)

    def at(t):
        tp = n_pos - int(np.searchsorted(pos_s, t, side="left"))
        fp = n_neg - int(np.searchsorted(neg_s, t, side="left"))
        return (float(t), tp / (tp + fp) if tp + fp else 1.0, tp / n_pos, tp, fp)

    best = None
    for t in np.unique(pos_s):  # recall changes only at a duplicate's score: every candidate is exact
        row = at(t)
        if row[1] >= MIN_PRECISION and (best is None or row[2] > best[2] or (row[2] == best[2] and t > best[0])):
            best = row
    print(f"\n{what}:")
    if not brief:
        print(f"{'threshold':>9} {'precision':>9} {'recall':>7} {'TP':>6} {'FP':>8} {'FN':>5}")
        grid = np.round(np.concatenate([np.arange(0.50, 0.90, 0.05), np.arange(0.90, 1.0001, 0.01)]), 2)
        rows = sorted({*(tuple(at(t)) for t in grid), *([best] if best else [])})
        for t, prec, rec, tp, fp in rows:
            mark = "  <- highest recall at precision >= 0.99" if best is not None and t == best[0] else ""
            print(f"{t:>9.4f} {prec:>9.4f} {rec:>7.4f} {tp:>6} {fp:>8} {n_pos - tp:>5}{mark}")
    print(f"highest different-photo score {neg_s[-1]:.4f}; lowest duplicate score {pos_s[0]:.4f}")
    if best is None:
        print(f"no threshold reaches precision {MIN_PRECISION}")
        return None
    print(f"highest recall at precision >= {MIN_PRECISION}: threshold {best[0]:.4f}, precision {best[1]:.4f}, "
          f"recall {best[2]:.4f} ({best[3]} of {n_pos} duplicate pairs, {best[4]} false pairs)")
    # the default is written with 4 decimals: the 4-decimal value at or below it when that keeps the precision,
    # else the one above it
    down, up = np.floor(best[0] * 1e4) / 1e4, np.ceil(best[0] * 1e4) / 1e4
    chosen = at(down) if at(down)[1] >= MIN_PRECISION else at(up)
    print(f"as a 4-decimal default: threshold {chosen[0]:.4f}, precision {chosen[1]:.4f}, recall {chosen[2]:.4f}")
    per = ", ".join(f"{e} {np.mean(pos[edit_of_pos == e] >= chosen[0]):.3f}" for e in EDITS)
    print(f"recall per edit there: {per}")
    return chosen


if __name__ == "__main__":
    sys.exit(main())
