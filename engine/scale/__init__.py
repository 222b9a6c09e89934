"""lookalike past one machine: Ray for embedding a collection and for sharded search.

- ``engine.scale.embed``: ``embed_collection(source, out)`` embeds a folder, a list of paths or a Parquet file
  of paths with a pool of ``engine.Encoder`` actors (Ray Data ``map_batches``), writing Parquet shards and a
  checksummed manifest, resumable; ``load_embeddings`` / ``searcher_from_embeddings`` read them back.
- ``engine.scale.sharded``: ``ShardedSearcher``, the ``Searcher`` contract over shards held by Ray actors.
- ``python -m engine.scale index DIR --out FOLDER``: the command line (``engine.scale.__main__.main``).

Ray (``pip install 'ray[data]>=2.9' pyarrow``) is imported only inside these modules' functions and classes,
so ``import engine`` never needs it.
"""
