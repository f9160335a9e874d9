"""Exact top-k inner-product search, sharded over the mesh and chunked over the corpus.

The corpus is the large side (millions of documents against thousands of queries), so its
rows are split over the mesh's "data" axis while the queries are replicated: each device
scores the query block against its slice of a corpus chunk and keeps its local top-k; only
those (q, k) candidates per device are gathered and reduced to the chunk's top-k, which is
merged into the running top-k. No device ever holds more than one (query block x chunk rows
per device) score tile, so a corpus whose full score matrix would not fit in memory works;
each chunk is sent to the devices once, and at most two chunks are in flight. Every chunk has
the same padded shape, so the whole search compiles one program. Ties go to the lower corpus
index, as in a stable argsort of -score.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py): r is a chunk's
rows on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .. import sharding, validation
from ..validation import UserError


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """Tile sizes: `query_block` queries at a time against chunks of `rows_per_device` corpus
    rows on each device (None: as many as keep a tile within `tile_elements` scores)."""

    query_block: int = 1024
    rows_per_device: int | None = None
    tile_elements: int = 1 << 25  # 128 MiB of float32 scores per device

    def chunk_rows(self, n: int, k: int, queries: int, shards: int) -> int:
        """Corpus rows per device per chunk: at least k, at most the corpus's share."""
        rows = self.rows_per_device or self.tile_elements // min(queries, self.query_block)
        return max(k, min(rows, -(-n // shards)))


@functools.lru_cache(maxsize=8)
def _merge_step(mesh, k: int):
    """(best scores, best ids, queries, chunk, chunk start, n) -> the new (best, ids)."""

    def local_top_k(queries_qd, chunk_rd, start, n):
        rows = chunk_rd.shape[0]
        first = start + jax.lax.axis_index(sharding.DATA) * rows
        ids_r = first + jnp.arange(rows, dtype=jnp.int32)
        scores_qr = jnp.matmul(queries_qd, chunk_rd.T, precision=jax.lax.Precision.HIGHEST)
        scores_qr = jnp.where(ids_r[None, :] < n, scores_qr, -jnp.inf)  # padding rows
        top_qk, pos_qk = jax.lax.top_k(scores_qr, k)
        return top_qk, first + pos_qk

    # Gathered along axis 1 in device order = corpus order, so ties keep the lower id.
    candidates = jax.shard_map(
        local_top_k, mesh=mesh, in_specs=(P(), P(sharding.DATA, None), P(), P()),
        out_specs=(P(None, sharding.DATA), P(None, sharding.DATA)))

    def step(best_qk, best_ids_qk, queries_qd, chunk_nd, start, n):
        top, ids = candidates(queries_qd, chunk_nd, start, n)
        scores = jnp.concatenate([best_qk, top], axis=1)  # earlier chunks first: lower ids
        ids = jnp.concatenate([best_ids_qk, ids], axis=1)
        best_qk, pos_qk = jax.lax.top_k(scores, k)
        return best_qk, jnp.take_along_axis(ids, pos_qk, axis=1)

    out = sharding.replicated(mesh)
    return jax.jit(step, out_shardings=(out, out), donate_argnums=(0, 1))


def exact_top_k(queries_qd, corpus_nd, k: int, *, mesh=None, plan: SearchPlan = SearchPlan(),
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k highest inner products of each query with the corpus: (scores (q, k) float32,
    corpus row indices (q, k) int64), best first. k above the corpus size returns every row."""
    queries_qd = validation.embedding_rows(queries_qd, "queries")
    corpus_nd = np.asarray(corpus_nd, dtype=np.float32)  # a float32 memmap stays on disk
    if corpus_nd.ndim != 2 or corpus_nd.shape[0] == 0:
        raise UserError(f"corpus must be a non-empty 2-D array, got shape {corpus_nd.shape}")
    if queries_qd.shape[1] != corpus_nd.shape[1]:
        raise UserError(f"queries have width {queries_qd.shape[1]}, corpus "
                        f"{corpus_nd.shape[1]}")
    if k < 1:
        raise UserError(f"k must be positive, got {k}")
    mesh = mesh if mesh is not None else sharding.make_mesh()
    (q, d), n = queries_qd.shape, len(corpus_nd)
    k = min(k, n)
    shards = sharding.data_shards(mesh)
    chunk = plan.chunk_rows(n, k, q, shards) * shards
    block = min(plan.query_block, q)
    step = _merge_step(mesh, k)
    replicated, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    padded_queries = np.zeros((-(-q // block) * block, d), np.float32)
    padded_queries[:q] = queries_qd
    blocks = [sharding.place(b, replicated) for b in padded_queries.reshape(-1, block, d)]
    best = [(sharding.place(np.full((block, k), -np.inf, np.float32), replicated),
             sharding.place(np.full((block, k), -1, np.int32), replicated)) for _ in blocks]
    n_dev = sharding.place(np.asarray(n, np.int32), replicated)
    for start in range(0, n, chunk):
        part = validation.finite_rows(corpus_nd[start:start + chunk], "corpus", start)
        if len(part) < chunk:  # the last chunk: zero rows, masked out by index
            part = np.concatenate([part, np.zeros((chunk - len(part), d), np.float32)])
        # Sent while the previous chunk is scored.
        part_dev = sharding.place(np.ascontiguousarray(part), rows)
        start_dev = sharding.place(np.asarray(start, np.int32), replicated)
        jax.block_until_ready(best)  # at most two chunks on the devices at a time
        best = [step(*state, b, part_dev, start_dev, n_dev) for state, b in zip(best, blocks)]
        if progress is not None:
            progress(min(chunk, n - start))
    scores = np.concatenate([np.asarray(s.addressable_data(0)) for s, _ in best])[:q]
    ids = np.concatenate([np.asarray(i.addressable_data(0)) for _, i in best])[:q]
    return scores, ids.astype(np.int64)
