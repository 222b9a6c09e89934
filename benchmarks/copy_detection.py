"""Copy detection: is an edited copy of a photo closest to its original? Learned encoders beside pHash, raw pixels
and HSV histograms, on the same photos in the same run.

    .venv/bin/python benchmarks/copy_detection.py --model engine/models/image.onnx --model models/la.onnx

Photos: every image of ../shared/data/fungi-sample (when present) and the photos embedded in scikit-image and
scikit-learn. Each photo gets every edit of ``EDITS`` (crop 60%, flip, rotate 8 degrees, grayscale, brightness
+40%, blur, JPEG quality 25, resize to 1/3); each edited copy is a query against all originals, and top-1 is the
share of queries whose most similar original is their own (a tie counts as a miss unless the original is the only
one at the top: pHash's 64-bit codes tie often). Prints one table (overall, per source of the original and per
edit) and, with ``--json``, writes the figures. A model trained on fungi-sample has seen those originals (never
the edited copies); the embedded photos' column shows it on photos it never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _crop(im, fraction=0.6):
    h, w = im.shape[:2]
    ch, cw = max(1, round(h * np.sqrt(fraction))), max(1, round(w * np.sqrt(fraction)))
    y, x = (h - ch) // 3, (w - cw) // 2  # off-centre vertically, as a person's crop often is
    return im[y : y + ch, x : x + cw]


def _rotate(im, degrees=8.0):
    import cv2

    h, w = im.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(im, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _grey(im):
    import cv2

    g = cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)


def _jpeg(im, quality=25):
    import cv2

    ok, buf = cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


def _resize(im, factor=1 / 3):
    import cv2

    h, w = im.shape[:2]
    return cv2.resize(im, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)


def _blur(im, sigma=2.0):
    import cv2

    return cv2.GaussianBlur(im, (0, 0), sigma)


EDITS = {
    "crop60": _crop,
    "flip": lambda im: np.ascontiguousarray(im[:, ::-1]),
    "rotate8": _rotate,
    "grayscale": _grey,
    "brightness+40%": lambda im: np.clip(im.astype(np.float32) * 1.4, 0, 255).astype(np.uint8),
    "blur": _blur,
    "jpeg25": _jpeg,
    "resize1/3": _resize,
}


def phash(images) -> np.ndarray:
    """The DCT perceptual hash (grey 32x32, 2-D DCT, the 8x8 lowest frequencies above their median): (n, 64) bool."""
    import cv2

    out = np.zeros((len(images), 64), bool)
    for i, im in enumerate(images):
        g = cv2.resize(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
        low = cv2.dct(g.astype(np.float32))[:8, :8]
        out[i] = (low > np.median(low)).ravel()
    return out


def top1(similarity: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query (row): True when its own original (``truth``) is strictly the most similar."""
    best = similarity.max(axis=1)
    own = similarity[np.arange(len(truth)), truth]
    ties = (similarity == best[:, None]).sum(axis=1)
    return (own == best) & (ties == 1)


SHARED = Path(__import__("os").environ.get("LOOKALIKE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def load_photos(limit=None):
    """The fungi-sample photos (when ../shared/data is there) and the embedded photos, longest side <= 512: the
    images, a line naming how many of each, and each image's source ("fungi" or "photos")."""
    from train.data import DataError, load_images

    images, sources, origin = [], [], []
    for name, root in (("fungi", SHARED / "fungi-sample"), ("photos", None)):
        try:
            s = load_images(name, root, limit=limit, max_side=512)
        except DataError as e:  # the shared folder is optional
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        images += [np.ascontiguousarray(im) for im in s.images]
        sources.append(f"{len(s.images)} {name}")
        origin += [name] * len(s.images)
    return images, ", ".join(sources), np.asarray(origin)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="an exported encoder (.onnx); repeatable")
    p.add_argument("--flip-average", action="store_true", help="also each model with test-time flip averaging")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    from engine.encoder import Encoder
    from train.evaluate import hsv_histogram, l2_normalize, raw_pixels

    originals, source, origin = load_photos()
    queries, truth, kinds = [], [], []
    for kind, edit in EDITS.items():
        for i, im in enumerate(originals):
            queries.append(np.ascontiguousarray(edit(im)))
            truth.append(i)
            kinds.append(kind)
    truth, kinds = np.asarray(truth), np.asarray(kinds)
    print(f"{len(originals)} originals ({source}), {len(queries)} edited queries", file=sys.stderr)

    def cosine(f):
        a, b = l2_normalize(f(originals)), l2_normalize(f(queries))
        return b @ a.T

    methods = {}
    for path in args.model:
        enc = Encoder(path)
        methods[f"{Path(path).name} ({enc.name})"] = cosine(enc.encode)
        if args.flip_average:
            def both(ims, enc=enc):
                return l2_normalize(enc.encode(ims)) + l2_normalize(enc.encode([im[:, ::-1].copy() for im in ims]))
            methods[f"{Path(path).name} flip-avg"] = cosine(both)
    h_o, h_q = phash(originals), phash(queries)
    methods["pHash"] = -(h_q[:, None, :] != h_o[None, :, :]).sum(axis=2).astype(np.float32)
    methods["raw pixels 32x32"] = cosine(raw_pixels)
    methods["HSV histogram"] = cosine(hsv_histogram)

    results = {}
    groups = [g for g in ("fungi", "photos") if (origin == g).any()]
    cols = ["all", *(f"{g} only" for g in groups), *EDITS]
    print(f"| method | {' | '.join(cols)} |\n|---|{'---|' * len(cols)}")
    for name, sim in methods.items():
        hit = top1(sim, truth)
        row = {"all": float(hit.mean()), **{f"{g} only": float(hit[origin[truth] == g].mean()) for g in groups},
               **{k: float(hit[kinds == k].mean()) for k in EDITS}}
        results[name] = row
        print(f"| {name} | {' | '.join(f'{row[c]:.3f}' for c in cols)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"photos": source, "queries": len(queries), "top1": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
