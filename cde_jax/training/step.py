"""The train step: both stages end to end, the contrastive loss, AdamW; jit-compiled and
sharded (data parallel) over a `sharding.make_mesh` mesh.

Parameters are a pure nested dict (`nnx.split` then `nnx.to_pure_dict`) and the model is
rebuilt inside each pure function with `nnx.merge`, so optax, orbax and the shardings all
see plain pytrees. Randomness comes only from the key passed in: each row (query or
document) draws its own prefix order / sequence dropout from `split(key, rows)[row]`, so
splitting a batch into blocks never changes what a row sees.

Gradient cache (`grad_cache_rows`): the embeddings are computed block by block without
keeping activations, the loss gradient w.r.t. the embeddings is taken on the whole (global)
batch, then each block is recomputed under `jax.vjp` and its parameter gradients
accumulated; the second stage's blocks also accumulate the gradient w.r.t. the dataset
embeddings, which then flows back through the first stage the same way. Result: the
full-batch loss and gradient with the memory of one block. Gradient accumulation (a leading
micro-batch axis) averages the loss and gradients of separate contrastive batches.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py): q queries,
c documents, m minicorpus rows, g gradient-cache blocks, r rows of a block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .. import sharding
from ..config import setting
from ..model import Prefix
from ..params import map_params
from ..validation import UserError, int_in_range
from .loss import contrastive_loss

# The stages by their short names (flags, `freeze`) -> their modules in the model.
STAGE_MODULES = {"first": "first_stage_model", "second": "second_stage_model"}
DECAYED = ("kernel", "embedding")  # weight decay on these; not on norms, biases, vectors


@dataclasses.dataclass(frozen=True)
class StepConfig:
    total_steps: int = setting(help="optimizer steps")
    learning_rate: float = setting(2e-5, help="peak learning rate (AdamW)")
    warmup_steps: int = setting(
        0, help="steps of linear warmup from 0 to the learning rate (then linear decay to 0)")
    weight_decay: float = setting(0.01, help="AdamW weight decay, on kernels and embeddings")
    clip_norm: float = setting(1.0, help="global gradient norm limit, before AdamW")
    freeze: tuple[str, ...] = setting(
        (), help="keep a stage's parameters fixed (repeatable)", choices=tuple(STAGE_MODULES))
    grad_cache_rows: int | None = setting(
        None, help="gradient cache: rows per forward/backward block, so that a large batch "
                   "needs the memory of one block (default: no cache)")
    permute: bool = setting(True, help="shuffle the minicorpus order per row, as upstream "
                                       "trains")
    sequence_dropout: float | None = setting(
        None, help="per-row chance of replacing each dataset embedding with the null "
                  "embedding (None: the config's transductive_sequence_dropout_prob)")

    def __post_init__(self):
        int_in_range(self.total_steps, "total_steps")
        unknown = set(self.freeze) - set(STAGE_MODULES)
        if unknown:
            raise UserError(f"cannot freeze {sorted(unknown)}: stages are "
                            f"{sorted(STAGE_MODULES)}")
        if set(self.freeze) == set(STAGE_MODULES):
            raise UserError("both stages frozen: nothing to train")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise UserError(f"warmup_steps {self.warmup_steps} must be in [0, total_steps "
                            f"{self.total_steps})")
        if self.grad_cache_rows is not None and self.grad_cache_rows < 1:
            raise UserError(f"grad_cache_rows must be positive, got {self.grad_cache_rows}")


def learning_rate(cfg: StepConfig) -> optax.Schedule:
    """Linear warmup from 0, then linear decay to 0 at `total_steps`."""
    # (a 0-step schedule is never used, but optax warns about it: hence the max)
    warm = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, cfg.total_steps - cfg.warmup_steps)
    return optax.join_schedules([warm, decay], [cfg.warmup_steps])


def trainable(cfg: StepConfig, params) -> dict:
    """Same tree as `params`, True where the parameter is trained."""
    frozen = {STAGE_MODULES[stage] for stage in cfg.freeze}
    return map_params(params, lambda path, _: path.split("/")[0] not in frozen)


def make_optimizer(cfg: StepConfig, params) -> optax.GradientTransformation:
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable(cfg, params))
    decayed = lambda p: map_params(p, lambda path, _: path.endswith(DECAYED))  # noqa: E731
    adamw = optax.adamw(learning_rate(cfg), weight_decay=cfg.weight_decay, mask=decayed)
    return optax.multi_transform(
        {"train": optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw),
         "frozen": optax.set_to_zero()}, labels)


def init_opt_state(optimizer, params, mesh):
    """The optimizer state laid out like the parameters it tracks (scalars replicated; the
    frozen parameters' `MaskedNode`s have no state)."""
    shardings = optax.tree_map_params(
        optimizer, lambda state, shard: shard if isinstance(state, jax.ShapeDtypeStruct) else state,
        jax.eval_shape(optimizer.init, params), jax.tree.map(lambda x: x.sharding, params),
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, optax.MaskedNode)))
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


class Stages:
    """Both stages as pure functions of (params, arrays)."""

    def __init__(self, graphdef: nnx.GraphDef, cfg: StepConfig):
        if cfg.sequence_dropout is None:
            raise UserError("sequence_dropout is unresolved (None): give the probability")
        self.graphdef, self.cfg = graphdef, cfg

    def first(self, params, ids_ms, mask_ms) -> jax.Array:
        return nnx.merge(self.graphdef, params).first_stage_model(ids_ms, mask_ms)

    def second(self, params, ids_rs, mask_rs, keys_r, dataset_md) -> jax.Array:
        """Embeddings (r, d), each row with its own training prefix drawn from its key."""
        stage = nnx.merge(self.graphdef, params).second_stage_model
        prefix_rpd = jax.vmap(lambda key: stage.training_prefix(
            dataset_md, 1, key, permute=self.cfg.permute,
            dropout_prob=self.cfg.sequence_dropout).embeds[0])(keys_r)
        return stage(ids_rs, mask_rs, Prefix(prefix_rpd, None))


def row_keys(key, batch):
    """Independent keys for every query row and document row."""
    query_key, doc_key = jax.random.split(key)
    return (jax.random.split(query_key, batch["query_ids"].shape[0]),
            jax.random.split(doc_key, batch["doc_ids"].shape[0]))


def batch_loss(stages: Stages, params, batch, key, logit_scale: float):
    """(loss, accuracy) of one contrastive batch, computed in one piece."""
    dataset_md = stages.first(params, batch["corpus_ids"], batch["corpus_mask"])
    query_keys, doc_keys = row_keys(key, batch)
    queries_qd = stages.second(params, batch["query_ids"], batch["query_mask"], query_keys,
                               dataset_md)
    docs_cd = stages.second(params, batch["doc_ids"], batch["doc_mask"], doc_keys, dataset_md)
    return contrastive_loss(queries_qd, docs_cd, batch["query_label"], batch["doc_label"],
                            logit_scale, batch["false_negative_qc"])


def _to_blocks(x_r, rows: int):
    """(r, ...) -> (g, rows, ...) with g = r / rows: row i goes to block i % g, so with rows
    split over devices in contiguous shares every block still spans all devices."""
    r = x_r.shape[0]
    if r % rows:
        raise UserError(f"grad_cache_rows {rows} does not divide {r} rows (it must divide the "
                        "batch size and the minicorpus size)")
    return x_r.reshape((rows, r // rows) + x_r.shape[1:]).swapaxes(0, 1)


def _from_blocks(x_g):
    return x_g.swapaxes(0, 1).reshape((-1,) + x_g.shape[2:])


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def cached_loss_and_grad(stages: Stages, params, batch, key, logit_scale: float, rows: int):
    """`value_and_grad(batch_loss)` via the two-stage gradient cache (module docstring)."""
    def blocks(*xs):
        return tuple(_to_blocks(x, rows) for x in xs)

    corpus = blocks(batch["corpus_ids"], batch["corpus_mask"])
    dataset_md = _from_blocks(jax.lax.map(lambda xs: stages.first(params, *xs), corpus))
    query_keys, doc_keys = row_keys(key, batch)
    query_in = blocks(batch["query_ids"], batch["query_mask"], query_keys)
    doc_in = blocks(batch["doc_ids"], batch["doc_mask"], doc_keys)

    def embed(rows):
        return _from_blocks(jax.lax.map(lambda xs: stages.second(params, *xs, dataset_md), rows))

    (loss, accuracy), (g_queries_qd, g_docs_cd) = jax.value_and_grad(
        contrastive_loss, argnums=(0, 1), has_aux=True)(
        embed(query_in), embed(doc_in), batch["query_label"], batch["doc_label"], logit_scale,
        batch["false_negative_qc"])

    def second_backward(carry, xs):
        *rows, cotangent = xs
        _, vjp = jax.vjp(lambda p, d: stages.second(p, *rows, d), params, dataset_md)
        return _add(carry, vjp(cotangent)), None

    carry = jax.tree.map(jnp.zeros_like, (params, dataset_md))
    carry, _ = jax.lax.scan(second_backward, carry, query_in + blocks(g_queries_qd))
    grads, g_dataset_md = jax.lax.scan(second_backward, carry, doc_in + blocks(g_docs_cd))[0]

    def first_backward(grads, xs):
        *rows, cotangent = xs
        _, vjp = jax.vjp(lambda p: stages.first(p, *rows), params)
        return _add(grads, vjp(cotangent)[0]), None

    grads, _ = jax.lax.scan(first_backward, grads, corpus + blocks(g_dataset_md))
    return (loss, accuracy), grads


def loss_and_grad(stages: Stages, params, batches, key, logit_scale: float):
    """Mean (loss, accuracy) and gradient over the micro-batches (leading axis a)."""
    def one(params, batch, key):
        if stages.cfg.grad_cache_rows is None:
            return jax.value_and_grad(batch_loss, argnums=1, has_aux=True)(
                stages, params, batch, key, logit_scale)
        return cached_loss_and_grad(stages, params, batch, key, logit_scale,
                                    stages.cfg.grad_cache_rows)

    def micro(total, xs):
        batch, i = xs
        return _add(total, one(params, batch, jax.random.fold_in(key, i))), None

    n = jax.tree.leaves(batches)[0].shape[0]
    zeros = ((jnp.zeros(()), jnp.zeros(())), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(micro, zeros, (batches, jnp.arange(n)))
    return jax.tree.map(lambda x: x / n, total)


def make_train_step(graphdef: nnx.GraphDef, cfg: StepConfig, optimizer, params, opt_state, *,
                    logit_scale: float, mesh) -> Callable:
    """`step(params, opt_state, batches, key, index) -> (params, opt_state, metrics)`, jitted
    with parameters and optimizer state keeping the layout they come in with (donated).
    Metrics: loss, accuracy, gradient norm and `false_negatives`, the in-batch pairs that
    false-negative filtering counted as positives (summed over the micro-batches)."""
    stages = Stages(graphdef, cfg)
    mask = trainable(cfg, params)
    state_shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))

    def step(params, opt_state, batches, key, index):
        (loss, accuracy), grads = loss_and_grad(stages, params, batches,
                                                jax.random.fold_in(key, index), logit_scale)
        grad_norm = optax.global_norm(jax.tree.map(lambda g, t: g if t else None, grads, mask))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
                   "false_negatives": batches["false_negative_qc"].sum()}
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(sharding.traced_on(mesh, step), donate_argnums=(0, 1),
                   out_shardings=state_shardings + (sharding.replicated(mesh),))
