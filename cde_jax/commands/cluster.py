"""`cde-jax cluster`: the contextual training recipe's batches. Every training pair's query
and positive are embedded (a cde-jax model's first stage, or precomputed vectors with ids),
clustered by paired spherical k-means in JAX over every device of every process, and packed
into batches of exactly --batch-size along a nearest-centroid tour of the clusters. OUT is
the training file with each line's "cluster" and "batch" (its index in epoch order; null
for the last n mod batch-size pairs); `cde-jax train --packed-batches` trains on it.

Every k-means setting is a field of `clustering.job.ClusterConfig` (and its `kmeans` part):
the flags are made from the config. With --model, the vectors go to OUT.queries.zarr and
OUT.documents.zarr through the corpus job: a killed run resumes them, and a finished one is
reused by the next run (pass them to `train --filter-query-embeddings` too).

example:
  cde-jax cluster --data pairs.jsonl --out pairs.clustered.jsonl --batch-size 64 \\
      --model cde-small-v2-jax
  cde-jax cluster --data pairs.jsonl --out pairs.clustered.jsonl --batch-size 64 \\
      --query-embeddings q.parquet --document-embeddings d.parquet --k 2000 --seed 1
"""

from __future__ import annotations

from .. import distributed, storage
from ..clustering.job import ClusterConfig, cluster
from . import flags, runtime


def register(subparsers) -> None:
    p = runtime.add_command(subparsers, "cluster", __doc__,
                            help="cluster training pairs into contextual batches (k-means)")
    flags.add_config_flags(p, ClusterConfig)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and vector files of another model)")
    runtime.add_compute_args(p)
    distributed.add_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = flags.config_from_args(ClusterConfig, args)
    storage.refuse("cluster", data=cfg.data, out=cfg.out)
    runtime.start(args)
    result = cluster(cfg, load_model=lambda: runtime.load_model(args),
                     overwrite=args.overwrite, show_progress=not args.quiet)
    if distributed.is_main():
        print(f"{result.pairs} pairs in {result.clusters} clusters (objective "
              f"{result.objective:.4f}), {result.batches} batches of {cfg.batch_size}, "
              f"{result.unbatched} pairs in no batch: {result.out}")
        if cfg.model:
            print(f"vectors: {result.embeddings[0]}, {result.embeddings[1]}")
    return 0
