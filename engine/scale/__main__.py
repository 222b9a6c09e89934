"""python -m engine.scale: embed a collection with Ray, and split embeddings into a sharded index.

    python -m engine.scale index ~/Pictures --out pictures.emb                  # a local Ray on this machine
    python -m engine.scale index /data/photos --out /shared/photos.emb --ray ray://head:10001 --actors 16
    python -m engine.scale shard pictures.emb --out pictures.shards --shards 4  # for ShardedSearcher.load

``main(argv)`` returns the exit status (0, or 2 with ``error: ...`` on stderr), so other command lines can
reuse it (``lookalike index DIR --ray``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import LookalikeError

EPILOG = """\
index: every image under DIR (recursive; or a .parquet file with a 'path' column) is embedded by a pool of
Encoder actors (Ray Data) into Parquet shards (id int64, path string, embedding float32[dim]) and
OUT/manifest.json (model identity, shard files with row counts and sha256, unreadable images with reasons).
Ids are the images' positions in the sorted list. Run the same command again after an interruption: shards
already written (and matching their sha256) are kept, the rest is embedded.

shard: split the embeddings in EMB into N Searcher index files (id % N) plus sharded.json, for
engine.scale.sharded.ShardedSearcher.load(OUT).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.scale", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="embed the images under DIR with Ray into Parquet shards",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ix.add_argument("source", metavar="DIR", help="folder of images (recursive), or a .parquet file with a 'path' column")
    ix.add_argument("--out", required=True, help="folder for the Parquet shards and manifest.json")
    ix.add_argument("--ray", metavar="ADDRESS", default=None,
                    help="address of a running Ray cluster (ray://host:10001 or host:6379); default: a local Ray")
    ix.add_argument("--model", default=None, help="exported .onnx image encoder (default: the packaged one)")
    ix.add_argument("--actors", type=int, default=None,
                    help="Encoder actors (default: one per --threads CPUs, or one per GPU)")
    ix.add_argument("--batch-size", type=int, default=32, help="images per network run")
    ix.add_argument("--rows-per-shard", type=int, default=8192, help="images per Parquet shard")
    ix.add_argument("--threads", type=int, default=1, help="onnxruntime threads (and CPUs) per CPU actor")
    ix.add_argument("--gpus-per-actor", type=float, default=None,
                    help="GPUs per actor (CUDA provider); default 1 when the cluster has GPUs, else 0")
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")
    sh = sub.add_parser("shard", help="split embeddings into N Searcher index files for ShardedSearcher")
    sh.add_argument("embeddings", metavar="EMB", help="folder written by `index`")
    sh.add_argument("--out", required=True, help="folder for the shard index files and sharded.json")
    sh.add_argument("--shards", type=int, required=True, help="number of shards (id %% N)")
    sh.add_argument("--storage", choices=("float32", "float16", "int8"), default="float32",
                    help="what each shard searches: float32 rows, or 2-byte / 1-byte codes with the float32 rows "
                         "kept on disk for search(..., rerank=R) (default: float32)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "index":
            return _index(args)
        return _shard(args)
    except (LookalikeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 2


def _index(args) -> int:
    from engine.scale.embed import embed_collection

    if args.model is None:
        from engine.default_models import default_model

        print(f"using the default image model {default_model('image')}", file=sys.stderr)
    res = embed_collection(args.source, args.out, model=args.model, actors=args.actors, batch_size=args.batch_size,
                           rows_per_shard=args.rows_per_shard, gpus_per_actor=args.gpus_per_actor,
                           threads=args.threads, address=args.ray, progress=not args.no_progress,
                           log=lambda m: print(m, file=sys.stderr))
    man = res["manifest"]
    rate = res["embedded"] / res["seconds"] if res["seconds"] > 0 and res["embedded"] else 0.0
    print(f"embedded {res['embedded']} images this run ({rate:.1f} img/s over {res['actors']} actors, "
          f"{res['seconds']:.1f} s); kept {res['shards_kept']} shards, wrote {res['shards_written']}")
    print(f"{args.out}: {man['embedded']} embeddings (dim {man['dim']}, {man['model']['model']}) in "
          f"{len(man['shards'])} shards; {man['skipped']} unreadable images skipped (listed in manifest.json)")
    for s in [s for e in man["shards"] for s in e["skipped"]][:10]:
        print(f"  skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


def _shard(args) -> int:
    from engine.scale.embed import load_embeddings
    from engine.scale.sharded import ShardedSearcher

    emb = load_embeddings(args.embeddings)
    out = Path(args.out)
    # build() writes the files without Ray; opening them needs it, so the split is written and checked here.
    with _local_ray():
        s = ShardedSearcher.build(out, emb.vectors, emb.ids, shards=args.shards, storage=args.storage)
        n = len(s)
        s.close()
    print(f"{out}: {n} vectors of dim {emb.vectors.shape[1]} in {args.shards} shards (id % {args.shards}), "
          f"{args.storage}")
    return 0


def _local_ray():
    from engine.scale.embed import RaySession

    return RaySession(None)


if __name__ == "__main__":
    sys.exit(main())
