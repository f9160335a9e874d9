"""Exact top-k inner-product search, sharded over the mesh and tiled over the corpus.

The corpus is the large side (millions of documents against thousands of queries), so its
rows are split over the mesh's "data" axis while the queries are replicated: each device
scores the query block against its slice of a corpus tile and keeps its local top-k; only
those (q, k) candidates per device are gathered and reduced to the tile's top-k, which is
merged into the running top-k. No device ever holds more than one (query block x tile rows
per device) score tile, so a corpus whose full score matrix would not fit in memory works;
each tile is sent to the devices once, and at most two tiles are in flight. Every tile has
the same padded shape, so the whole search compiles one program. Ties go to the lower corpus
index, as in a stable argsort of -score.

`quantized_top_k` searches a quantized corpus (`cde_jax.quantize`) the same way: by the
quantized scores, whose code vectors are plain float32 rows for this search, then, as an
option, rescoring the best candidates with the float32 queries.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py): r is a tile's
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

from .. import distributed, sharding, validation
from ..quantize import Quantization
from ..validation import UserError

RESCORE_BLOCK = 256  # queries whose candidates are dequantized at a time
RESCORE_DOCUMENTS = ("dequantized", "float32")  # what rescoring compares the queries with


@dataclasses.dataclass(frozen=True)
class SearchTiles:
    """Tile sizes: `query_block` queries at a time against tiles of `rows_per_device` corpus
    rows on each device (None: as many as keep a tile within `tile_elements` scores)."""

    query_block: int = 1024
    rows_per_device: int | None = None
    tile_elements: int = 1 << 25  # 128 MiB of float32 scores per device

    def tile_rows(self, n: int, k: int, queries: int, shards: int) -> int:
        """Corpus rows per device per tile: at least k, at most the corpus's share."""
        rows = self.rows_per_device or self.tile_elements // min(queries, self.query_block)
        return max(k, min(rows, -(-n // shards)))


@functools.lru_cache(maxsize=8)
def _merge_step(mesh, k: int):
    """(best scores, best ids, queries, tile, tile row ids) -> the new (best, ids)."""

    def local_top_k(queries_qd, tile_rd, ids_r):
        scores_qr = jnp.matmul(queries_qd, tile_rd.T, precision=jax.lax.Precision.HIGHEST)
        scores_qr = jnp.where(ids_r[None, :] >= 0, scores_qr, -jnp.inf)  # padding rows
        top_qk, pos_qk = jax.lax.top_k(scores_qr, k)  # ties: the lower position = lower id
        return top_qk, ids_r[pos_qk]

    candidates = jax.shard_map(
        local_top_k, mesh=mesh, in_specs=(P(), P(sharding.DATA, None), P(sharding.DATA)),
        out_specs=(P(None, sharding.DATA), P(None, sharding.DATA)))

    def step(best_qk, best_ids_qk, queries_qd, tile_nd, ids_n):
        top, ids = candidates(queries_qd, tile_nd, ids_n)
        scores = jnp.concatenate([best_qk, top], axis=1)
        ids = jnp.concatenate([best_ids_qk, ids], axis=1)
        # Best first and, among equal scores, the lower corpus row, wherever it came from.
        neg_scores, ids = jax.lax.sort((-scores, ids), dimension=1, num_keys=2)
        return -neg_scores[:, :k], ids[:, :k]

    out = sharding.replicated(mesh)
    return jax.jit(step, out_shardings=(out, out), donate_argnums=(0, 1))


def exact_top_k(queries_qd, corpus_nd, k: int, *, mesh=None, tiles: SearchTiles = SearchTiles(),
                first_row: int = 0, progress: Callable[[int], None] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The k highest inner products of each query with the corpus: (scores (q, k) float32,
    corpus row indices (q, k) int64), best first. k above the corpus size returns every row.

    With several processes, every process passes the same queries and its own rows of the
    corpus, which start at row `first_row` of the whole; each gets the whole result.
    """
    queries_qd = validation.embedding_rows(queries_qd, "queries")
    corpus_nd = np.asarray(corpus_nd, dtype=np.float32)  # a float32 memmap stays on disk
    (q, d) = queries_qd.shape
    if corpus_nd.ndim != 2:
        raise UserError(f"corpus must be a 2-D array, got shape {corpus_nd.shape}")
    if len(corpus_nd) and corpus_nd.shape[1] != d:
        raise UserError(f"queries have width {d}, corpus {corpus_nd.shape[1]}")
    if k < 1:
        raise UserError(f"k must be positive, got {k}")
    mesh = mesh if mesh is not None else sharding.make_mesh()
    n = int(distributed.sum_all(np.asarray(len(corpus_nd))))
    if n == 0:
        raise UserError("corpus must be a non-empty 2-D array, got 0 rows")
    k = min(k, n)
    shards = sharding.data_shards(mesh)
    local = tiles.tile_rows(n, k, q, shards) * shards // distributed.process_count()
    steps = int(distributed.max_all(np.asarray(-(-len(corpus_nd) // local))))
    block = min(tiles.query_block, q)
    step = _merge_step(mesh, k)
    replicated, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    padded_queries = np.zeros((-(-q // block) * block, d), np.float32)
    padded_queries[:q] = queries_qd
    blocks = [sharding.place(b, replicated) for b in padded_queries.reshape(-1, block, d)]
    best = [(sharding.place(np.full((block, k), -np.inf, np.float32), replicated),
             sharding.place(np.full((block, k), -1, np.int32), replicated)) for _ in blocks]
    for start in range(0, steps * local, local):
        part = validation.finite_rows(corpus_nd[start:start + local], "corpus",
                                      first_row + start)
        ids = np.full(local, -1, np.int32)
        ids[:len(part)] = first_row + start + np.arange(len(part))
        part = np.concatenate([part, np.zeros((local - len(part), d), np.float32)])
        # Sent while the previous tile is scored.
        part_dev, ids_dev = (distributed.put_rows(x, rows) for x in (part, ids))
        jax.block_until_ready(best)  # at most two tiles on the devices at a time
        best = [step(*state, b, part_dev, ids_dev) for state, b in zip(best, blocks)]
        if progress is not None:
            progress(int((ids >= 0).sum()))
    scores = np.concatenate([np.asarray(s.addressable_data(0)) for s, _ in best])[:q]
    ids = np.concatenate([np.asarray(i.addressable_data(0)) for _, i in best])[:q]
    return scores, ids.astype(np.int64)


def candidates(k: int, precision: str, rescore_multiplier: int | None) -> int:
    """How many rows the quantized search keeps per query before rescoring (k without it)."""
    if rescore_multiplier is None:
        return k
    if precision == "float32":
        raise UserError("rescoring needs a quantized corpus: a precision other than float32")
    if rescore_multiplier < 1:
        raise UserError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
    return k * rescore_multiplier


def quantized_top_k(queries_qd, stored_nd: np.ndarray, quantization: Quantization, k: int, *,
                    rescore_multiplier: int | None = None, rescore_nd: np.ndarray | None = None,
                    first_row: int = 0, **kw) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows of a stored corpus for each float32 query: (scores (q, k) float32,
    rows (q, k) int64), best first, ties to the lower row. Ranked by the quantized scores
    (`exact_top_k` over code vectors, the queries quantized like the corpus); with
    `rescore_multiplier` m the best k * m are rescored with the float32 queries against
    their dequantized rows (as sentence-transformers' rescoring does) or, when given, their
    float32 rows `rescore_nd` (a compact index searched, full embeddings kept beside it),
    and the best k of those kept. Processes pass their own rows as for `exact_top_k` (`kw`:
    its options); each rescores the candidates it holds. The code vectors are float32 rows
    in host memory, as large as the float32 corpus."""
    depth = candidates(k, quantization.precision, rescore_multiplier)
    queries_qd = validation.embedding_rows(queries_qd, "queries")
    scores_qk, rows_qk = exact_top_k(
        quantization.code_vectors(quantization.apply(queries_qd)),
        quantization.code_vectors(stored_nd), depth, first_row=first_row, **kw)
    if rescore_multiplier is None:
        return scores_qk, rows_qk
    mine_qk = (rows_qk >= first_row) & (rows_qk < first_row + len(stored_nd))
    rescored_qk = np.full(rows_qk.shape, -np.inf, np.float32)
    for start in range(0, len(rows_qk) if len(stored_nd) else 0, RESCORE_BLOCK):
        block = slice(start, start + RESCORE_BLOCK)
        local_qk = np.where(mine_qk[block], rows_qk[block] - first_row, 0)
        docs_qkd = (quantization.dequantize(stored_nd[local_qk]) if rescore_nd is None
                    else np.asarray(rescore_nd[local_qk], np.float32))
        scores_qk = np.einsum("qd,qkd->qk", queries_qd[block], docs_qkd)
        rescored_qk[block] = np.where(mine_qk[block], scores_qk, -np.inf)
    rescored_qk = distributed.max_all(rescored_qk)  # each row's score from the process holding it
    order_qk = np.lexsort((rows_qk, -rescored_qk))[:, :k]
    return (np.take_along_axis(rescored_qk, order_qk, axis=1),
            np.take_along_axis(rows_qk, order_qk, axis=1))


def run_dict(query_ids, doc_ids, scores_qk: np.ndarray, rows_qk: np.ndarray
             ) -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}} in rank order (MTEB's and pytrec_eval's run format) from
    `exact_top_k`'s scores and corpus rows."""
    return {q: {doc_ids[i]: float(s) for s, i in zip(srow, irow)}
            for q, srow, irow in zip(query_ids, scores_qk, rows_qk)}
