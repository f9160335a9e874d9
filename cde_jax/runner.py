"""The stage runner: parameters on the mesh, the compiled stages, batches in and rows out.

A process hands in its own rows (numpy); the runner pads them to a multiple of its data
shards, assembles the global batch from every process's rows (`distributed.put_rows`), runs
the compiled stage and gives each process back its own rows (`distributed.get_rows`). `run`
does that for one batch; `run_buckets` for many, in length buckets (`buckets`), overlapping
host and device work (`IN_FLIGHT`).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from . import buckets, distributed, sharding
from .model import ContextualEmbedder, Prefix
from .params import for_stages
from .tokenization import pad_batch

Stage = Callable[[jax.Array, jax.Array], jax.Array]  # (ids_bs, mask_bs) -> (b, d), global

# Batches dispatched and not yet read back while the host builds the next one. Dispatch is
# asynchronous, so padding and placing batch i+1, and copying batch i-2's result back, run
# while the device computes batches i-1 and i: with two queued, the device always has the
# next batch when it finishes one, and host memory holds at most three batches' arrays.
IN_FLIGHT = 2


@functools.lru_cache(maxsize=8)
def stage_functions(graphdef: nnx.GraphDef, mesh) -> tuple[Callable, Callable, Callable]:
    """(first, prefix, second) of one architecture on one mesh, as jitted functions of
    (params, arrays), traced on the mesh (`sharding.traced_on`). Runners with equal
    graphdefs and meshes share them, so a second model of the same architecture (another
    checkpoint, a fine-tuned copy) runs the programs the first one compiled instead of
    compiling them again; `aot.compile_stage` lowers the same functions for a target."""
    rows, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def first_fn(params, input_ids_bs, attention_mask_bs):
        return nnx.merge(graphdef, params).first_stage_model(input_ids_bs, attention_mask_bs)

    def prefix_fn(params, dataset_embeddings_md):
        return nnx.merge(graphdef, params).second_stage_model.prefix(dataset_embeddings_md)

    def second_fn(params, input_ids_bs, attention_mask_bs, prefix):
        return nnx.merge(graphdef, params).second_stage_model(input_ids_bs, attention_mask_bs,
                                                              prefix)

    on_mesh = functools.partial(sharding.traced_on, mesh)
    return (jax.jit(on_mesh(first_fn), out_shardings=rows),
            jax.jit(on_mesh(prefix_fn), out_shardings=replicated),
            jax.jit(on_mesh(second_fn), out_shardings=rows))


class StageRunner:
    """Both stages of one model on one mesh, as compiled functions of (params, arrays)."""

    def __init__(self, graphdef: nnx.GraphDef, params: dict, mesh, compute_dtype="float32"):
        self.graphdef, self.params, self.mesh = graphdef, params, mesh
        self._first, self._prefix, self._second = stage_functions(graphdef, mesh)
        # What the stages read: the matmul weights cast to the compute dtype once, here.
        self._stage_params = for_stages(params, compute_dtype)

    @property
    def model(self) -> ContextualEmbedder:
        return nnx.merge(self.graphdef, self.params)

    # --- the stages on global arrays -----------------------------------------------------
    def first(self) -> Stage:
        return lambda ids_bs, mask_bs: self._first(self._stage_params, ids_bs, mask_bs)

    def second(self, prefix: Prefix) -> Stage:
        return lambda ids_bs, mask_bs: self._second(self._stage_params, ids_bs, mask_bs, prefix)

    def prefix(self, dataset_embeddings_md: np.ndarray | None) -> Prefix:
        """The second stage's prefix (None: null-dataset mode); the same on every process."""
        placed = None if dataset_embeddings_md is None else sharding.place(
            dataset_embeddings_md, sharding.replicated(self.mesh))
        return self._prefix(self._stage_params, placed)

    # --- batches -------------------------------------------------------------------------
    @property
    def rows_multiple(self) -> int:
        """A process's batch rows must be a multiple of this (its share of the data shards)."""
        return max(1, sharding.data_shards(self.mesh) // distributed.process_count())

    def place(self, *arrays_bs: np.ndarray) -> list[jax.Array]:
        """This process's rows of a batch -> global arrays split over "data"."""
        rows = sharding.batch_sharding(self.mesh)
        return [distributed.put_rows(a, rows) for a in arrays_bs]

    def local_rows(self, out: jax.Array) -> np.ndarray:
        """This process's rows of a batch-sharded global result, in the order it fed them."""
        rows = distributed.get_rows(out, self.mesh, sharding.batch_sharding(self.mesh))
        return rows.astype(np.float32, copy=False)

    def run(self, stage: Stage, input_ids_bs: np.ndarray,
            attention_mask_bs: np.ndarray) -> np.ndarray:
        """One batch of this process's rows (validated int32 arrays) -> (b, d) float32.
        Rows are added up to a multiple of the process's data shards, fully masked."""
        b, m = len(input_ids_bs), self.rows_multiple
        widths = ((0, max(1, -(-b // m)) * m - b), (0, 0))
        out = stage(*self.place(np.pad(input_ids_bs, widths), np.pad(attention_mask_bs, widths)))
        return self.local_rows(out)[:b]

    def run_buckets(self, token_ids: Sequence[Sequence[int]], stage: Stage, *,
                    plan: buckets.BucketPlan, pad_id: int, width: int, extra_len: int = 0,
                    progress: Callable[[int], None] | None = None,
                    in_flight: int | None = IN_FLIGHT) -> np.ndarray:
        """`stage` over all of this process's texts (token id lists) in length buckets;
        (len(token_ids), width) float32 in input order. `extra_len`: tokens the stage adds
        to each row (the second stage's prefix), which the batch sizes count. `in_flight`:
        batches left running while the next is built (None: all of them)."""
        n_data = sharding.data_shards(self.mesh)
        local_size = lambda length: (plan.batch_size(length, n_data, extra_len)  # noqa: E731
                                     // distributed.process_count())
        out = np.zeros((len(token_ids), width), np.float32)

        def collect(rows, result):
            keep = rows >= 0
            out[rows[keep]] = self.local_rows(result)[keep]
            if progress is not None:
                progress(int(keep.sum()))

        pending = collections.deque()
        for length, rows in buckets.plan_batches([len(t) for t in token_ids], plan,
                                                  local_size):
            pending.append((rows, stage(*self.place(*pad_batch(token_ids, rows, length,
                                                                pad_id)))))
            if in_flight is not None and len(pending) > in_flight:
                collect(*pending.popleft())
        while pending:
            collect(*pending.popleft())
        return out
