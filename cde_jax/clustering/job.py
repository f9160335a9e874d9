"""`cluster(cfg)`: the job behind `cde-jax cluster`, run the same way by every process.

    claim OUT (`outputs.claim`); read and check the training file (ids: 1-based line
        numbers, or `id_field`)
    vectors of every pair's query and positive: a cde-jax model's first stage, through the
        corpus job into OUT.queries.zarr and OUT.documents.zarr (resumable, any number of
        processes; a finished file of the same model, input and settings is reused), or
        precomputed files in any `read_embeddings` format, matched to lines by id
    each process: its share of the pairs -> paired points (`pairs`) -> the mesh
    spherical k-means over every device of every process (`kmeans`), k = ceil(pairs /
        cluster_size) unless given
    process 0: a pair's cluster is its [q; d] point's; batches packed along the tour
        (`packing`); OUT = each input line's object plus "cluster" and "batch", atomically

A run killed during k-means starts again from the embedding files, not from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .. import distributed, outputs, prompts, sharding
from ..config import setting
from ..corpus import job as corpus_job
from ..corpus import sinks
from ..corpus.source import Source, jsonl_records, open_chunks
from ..ops import l2_normalize
from ..validation import UserError, finite_rows, int_in_range
from .kmeans import KMeansConfig, place_points, spherical_kmeans
from .packing import NO_BATCH, Packing, pack_batches
from .pairs import paired_points

log = logging.getLogger(__name__)

CHUNK_ROWS = 4096  # lines per chunk of the embedding step (its unit of work and commit)
SIDES = (("query", "queries", prompts.QUERY), ("positive", "documents", prompts.DOCUMENT))


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    data: str = setting(help="training JSONL (query, positive, ...), one pair a line")
    out: str = setting(help="the JSONL to write: each line plus 'cluster' and 'batch'")
    batch_size: int = setting(help="examples per batch, as `cde-jax train --batch-size`")
    model: str | None = setting(None, help="embed queries and positives with this cde-jax "
                                           "model's first stage (into OUT.queries.zarr and "
                                           "OUT.documents.zarr, kept for reuse)")
    query_embeddings: str | None = setting(
        None, help="precomputed query vectors (.npy + ids, .parquet, .zarr), ids = the "
                   "training file's line numbers (or --id-field values)")
    document_embeddings: str | None = setting(None, help="precomputed positive vectors, ids "
                                                         "as --query-embeddings")
    id_field: str | None = setting(None, help="the JSONL field holding each line's id "
                                              "(default: the 1-based line number)")
    cluster_size: int | None = setting(None, help="pairs per cluster on average: k = "
                                                  "ceil(pairs / cluster_size) (default: "
                                                  "the batch size)")
    k: int | None = setting(None, help="the number of clusters (instead of cluster_size)")
    svd_dims: int = setting(128, help="reduce the vectors to this many SVD directions first "
                                      "(0, or not below their width: keep them all)")
    seed: int = setting(0, help="k-means initialization, cluster splits, tour start and "
                                "packing")
    kmeans: KMeansConfig = setting(KMeansConfig(), help="the k-means runs")

    def __post_init__(self):
        int_in_range(self.batch_size, "batch_size")
        int_in_range(self.svd_dims, "svd_dims", 0)
        if self.k is not None and self.cluster_size is not None:
            raise UserError("give k or cluster_size, not both")
        for name in ("k", "cluster_size"):
            if getattr(self, name) is not None:
                int_in_range(getattr(self, name), name)
        files = (self.query_embeddings, self.document_embeddings)
        if (self.model is None) == (None in files) or (None in files and any(files)):
            raise UserError("give --model, or both --query-embeddings and "
                            "--document-embeddings")
        if Path(self.data).suffix.lower() != ".jsonl":
            raise UserError(f"{self.data}: the training data must be .jsonl")

    def clusters(self, pairs: int) -> int:
        k = self.k or math.ceil(pairs / (self.cluster_size or self.batch_size))
        if k > pairs:
            raise UserError(f"k {k} is more than the {pairs} pairs")
        return k


class ClusterResult(NamedTuple):
    out: Path
    pairs: int
    clusters: int           # clusters that hold pairs
    batches: int
    unbatched: int          # pairs in no batch (the last n mod batch_size along the tour)
    objective: float        # mean cosine similarity of the points to their centroids
    history: list[dict]     # k-means progress, per iteration
    embeddings: tuple[str, str]  # the query and document vector files used


def _line_ids(source: Source) -> list:
    """Every line's id (each process reads them all; `validate` already checked them)."""
    return [record_id for i in range(len(source)) for record_id in source[i].ids]


def _embedding_key(model, source: Source, prompt: str) -> str:
    """What the vector file's bytes depend on: a file with another key is not reused."""
    parts = {"input": source.sha256, "field": source.field, "id_field": source.id_field,
             "chunk_rows": source.chunk_rows, "model": model.fingerprint, "stage": "first",
             "prompt": prompt, "dtype": model.backbone_config.dtype,
             "attention": model.backbone_config.attention}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _embed_side(model, source: Source, path: str, prompt: str, *, overwrite: bool,
                show_progress: bool) -> None:
    """The first stage's unit vectors of one field into `path` (.zarr) by the corpus job:
    reused when finished with the same key, resumed when unfinished."""
    key = _embedding_key(model, source, prompt)
    try:
        sinks.open_sink(path, rows=source.rows, width=model.hidden_size,
                        chunk_rows=source.chunk_rows, key=key, id_kind=source.id_kind)
        if sinks.exists(path):
            return
    except sinks.OutputError:
        if not overwrite:
            raise outputs.OutputExistsError(path, "it holds vectors of another model, input "
                                                  "or setting; pass --overwrite to replace "
                                                  "it") from None
        if distributed.is_main():
            sinks.remove(path)
        distributed.barrier(f"removed {path}")

    def embed(token_ids, progress):
        return l2_normalize(model.run_texts(token_ids, model.runner.first(), batch_size=None,
                                            show_progress_bar=False, desc="", progress=progress))

    with corpus_job.claim(path, overwrite=True):
        corpus_job.embed_corpus(source, path, key=key, width=model.hidden_size, embed=embed,
                                prepare=lambda texts: model.tokenize(texts, prompt),
                                show_progress=show_progress)


def _rows_for(path: str, line_ids: list, lines: range) -> np.ndarray:
    """The vectors of these lines (0-based), matched by id; every line must have one."""
    return finite_rows(sinks.embeddings_by_id(path, [line_ids[i] for i in lines]),
                       f"{path}: vectors", first=lines.start)


def _write(cfg: ClusterConfig, packing: Packing) -> None:
    with outputs.atomic_file(cfg.out, "w") as f:
        for number, row in jsonl_records(Path(cfg.data)):
            batch = int(packing.batch_n[number - 1])
            row.update(cluster=int(packing.cluster_n[number - 1]),
                       batch=None if batch == NO_BATCH else batch)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def cluster(cfg: ClusterConfig, *, load_model=None, overwrite: bool = False,
            show_progress: bool = True) -> ClusterResult:
    """Runs the job (module docstring) on every process; `load_model()` gives the cde-jax
    model when `cfg.model` is set."""
    with outputs.claim(cfg.out, overwrite=overwrite):
        return _cluster(cfg, load_model, overwrite, show_progress)


def _cluster(cfg, load_model, overwrite, show_progress) -> ClusterResult:
    sources = [distributed.all_succeed(lambda field=field: open_chunks(
        cfg.data, CHUNK_ROWS, field=field, id_field=cfg.id_field), "indexing the input")
        for field, _, _ in (SIDES if cfg.model else SIDES[:1])]
    pairs = sources[0].rows
    # Every process must cluster the same file with the same settings, before any work.
    distributed.agree({"settings": dataclasses.asdict(cfg), "data sha256": sources[0].sha256,
                       "processes": distributed.process_count()}, "the run")
    k = cfg.clusters(pairs)
    if pairs < cfg.batch_size:
        raise UserError(f"{cfg.data}: {pairs} pairs do not fill one batch of {cfg.batch_size}")
    for source in sources:
        corpus_job.validate(source)
    files = (cfg.query_embeddings, cfg.document_embeddings)
    if cfg.model:
        model = load_model()
        files = tuple(f"{cfg.out}.{name}.zarr" for _, name, _ in SIDES)
        for source, path, (_, _, prompt) in zip(sources, files, SIDES):
            _embed_side(model, source, path, prompt, overwrite=overwrite,
                        show_progress=show_progress)
    line_ids = _line_ids(sources[0])
    share = range(pairs)[distributed.process_share(pairs)]
    queries_nd, documents_nd = (distributed.all_succeed(lambda f=f: _rows_for(f, line_ids, share),
                                                        "reading the vectors") for f in files)
    mesh = sharding.make_mesh()
    ids = np.concatenate([np.asarray(share), pairs + np.asarray(share)]).astype(np.int32)
    points = place_points(paired_points(queries_nd, documents_nd, cfg.svd_dims), ids, mesh,
                          cfg.kmeans.tile_rows)
    with tqdm(desc="k-means", unit="it", file=sys.stderr,
              disable=not show_progress or not distributed.is_main()) as bar:
        def progress(entry):
            log.info("k-means run %(run)d iteration %(iteration)d: objective %(objective).6f, "
                     "moved %(moved)d, empty %(empty)d", entry)
            bar.update(1)
            bar.set_postfix(objective=f"{entry['objective']:.4f}", moved=entry["moved"])

        result = spherical_kmeans(points, k, cfg.kmeans, seed=cfg.seed, mesh=mesh,
                                  progress=progress)
    cluster_n = distributed.gather_rows(result.cluster_n[:len(share)], pairs)  # [q; d] points
    packing = pack_batches(cluster_n, result.centroids_ud, cfg.batch_size, cfg.seed)
    if distributed.is_main():
        _write(cfg, packing)
    unbatched = int((packing.batch_n == NO_BATCH).sum())
    return ClusterResult(Path(cfg.out), pairs, packing.clusters,
                         (pairs - unbatched) // cfg.batch_size, unbatched, result.objective,
                         result.history, files)
