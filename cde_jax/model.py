"""The two cde-small-v2 stages (docs/model.md) on the shared ModernBERT encoder.

First stage: minicorpus documents -> dataset embeddings (mean pool + GELU MLP, unnormalized).
Second stage: each text is encoded after a prefix of [dataset embeddings; 8 soft tokens].
The prefix is the same for every row, so it is prepared once as a `Prefix` (embedding norm
and layer-0 q/k/v) and reused by every batch. Shapes are suffixed with the package's
dimension key (cde_jax/__init__.py): m dataset-embedding rows, p = m + soft tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import ops
from .attention import Plan
from .attention import plan as attention_plan
from .config import CdeConfig, ModernBertConfig
from .encoder import ModernBert
from .validation import UserError


class MlpHead(nnx.Module):
    """Linear -> activation -> Linear, computed in float32 (the heads are tiny)."""

    def __init__(self, d_in: int, d_out: int, activation: Callable, cfg: ModernBertConfig, *,
                 rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.jnp_param_dtype, dtype=jnp.float32,
                  kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.fc1 = nnx.Linear(d_in, d_in, **kw)
        self.fc2 = nnx.Linear(d_in, d_out, **kw)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x.astype(jnp.float32))))


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


class FirstStage(nnx.Module):
    """Dataset embeddings: `mlp(mean_pool(ModernBERT(ids)))`, (n, d) float32."""

    def __init__(self, backbone: ModernBertConfig, plan: Plan | None = None, *,
                 rngs: nnx.Rngs):
        self.embedder = ModernBert(backbone, plan, rngs=rngs)
        self.mlp = MlpHead(backbone.hidden_size, backbone.hidden_size, gelu_exact, backbone,
                           rngs=rngs)

    def __call__(self, input_ids_bs: jax.Array, attention_mask_bs: jax.Array) -> jax.Array:
        input_ids_bs, attention_mask_bs = ops.right_padded(input_ids_bs, attention_mask_bs)
        hidden_bsd = self.embedder(input_ids_bs, attention_mask_bs)
        return self.mlp(ops.mean_pool(hidden_bsd, attention_mask_bs))


class Prefix(NamedTuple):
    """The second stage's prefix, ready for the backbone (a pytree).

    At inference one prefix serves every row: `embeds` is (p, d) and `layer0_qkv` holds its
    layer-0 q/k/v, each (1, p, h, e). In training each row has its own order and dropout:
    `embeds` is (b, p, d) and `layer0_qkv` is None.
    """

    embeds: jax.Array  # LN_emb(concat(dataset embeddings, soft prompt))
    layer0_qkv: tuple[jax.Array, jax.Array, jax.Array] | None


class SecondStage(nnx.Module):
    def __init__(self, backbone: ModernBertConfig, cde: CdeConfig, plan: Plan | None = None, *,
                 has_null_embedding: bool, rngs: nnx.Rngs):
        d = backbone.hidden_size
        self.cde = cde
        self.backbone = ModernBert(backbone, plan, rngs=rngs)
        self.prompt_projection = MlpHead(d, d * cde.num_soft_prompt_tokens, jax.nn.relu,
                                         backbone, rngs=rngs)
        self.output_projection = MlpHead(d, d, jax.nn.relu, backbone, rngs=rngs)
        self.sequence_dropout_null_embedding = (
            nnx.Param(jnp.zeros((d,), backbone.jnp_param_dtype)) if has_null_embedding else None)

    def soft_prompt(self) -> jax.Array:
        """(soft tokens, d): a function of the parameters only."""
        d = self.backbone.config.hidden_size
        ones_1d = jnp.ones((1, d), jnp.float32)
        return self.prompt_projection(ones_1d).reshape(self.cde.num_soft_prompt_tokens, d)

    def null_embedding(self) -> jax.Array:
        if self.sequence_dropout_null_embedding is None:
            raise UserError("null-dataset mode and sequence dropout need "
                            "`sequence_dropout_null_embedding`, which this checkpoint lacks")
        return self.sequence_dropout_null_embedding[...].astype(jnp.float32)

    def dataset_rows(self, dataset_embeddings_md: jax.Array | None) -> jax.Array:
        """D as (m, d) float32, at most the first `corpus size` rows; None selects
        null-dataset mode (every row the null embedding)."""
        m_max = self.cde.num_context_tokens
        if dataset_embeddings_md is None:
            null_d = self.null_embedding()
            return jnp.broadcast_to(null_d, (m_max, null_d.shape[0]))
        return dataset_embeddings_md[:m_max].astype(jnp.float32)

    def _normed(self, prefix: jax.Array) -> jax.Array:
        backbone = self.backbone
        return backbone.embeddings.norm(prefix.astype(jnp.float32))

    def prefix(self, dataset_embeddings_md: jax.Array | None) -> Prefix:
        """The inference prefix `concat(D, P)`, shared by every row."""
        prefix_pd = self._normed(jnp.concatenate([self.dataset_rows(dataset_embeddings_md),
                                                  self.soft_prompt()]))
        qkv = self.backbone.layers[0].project_qkv(prefix_pd[None], jnp.arange(prefix_pd.shape[0]))
        return Prefix(prefix_pd, tuple(qkv))

    def training_prefix(self, dataset_embeddings_md: jax.Array, batch: int, rng: jax.Array, *,
                        permute: bool = True, dropout_prob: float = 0.0) -> Prefix:
        """Per-row prefixes as upstream trains: each row sees D in its own random order, and
        each of its rows of D is replaced by the null embedding with probability
        `dropout_prob`; the soft tokens stay last."""
        d_md = self.dataset_rows(dataset_embeddings_md)
        m, d = d_md.shape
        d_bmd = jnp.broadcast_to(d_md, (batch, m, d))
        drop_key, perm_key = jax.random.split(rng)
        if dropout_prob > 0.0:
            dropped_bm = jax.random.bernoulli(drop_key, dropout_prob, (batch, m))
            d_bmd = jnp.where(dropped_bm[..., None], self.null_embedding(), d_bmd)
        if permute:
            order_bm = jax.vmap(lambda key: jax.random.permutation(key, m))(
                jax.random.split(perm_key, batch))
            d_bmd = jnp.take_along_axis(d_bmd, order_bm[..., None], axis=1)
        soft_pd = self.soft_prompt()
        soft_bpd = jnp.broadcast_to(soft_pd, (batch,) + soft_pd.shape)
        return Prefix(self._normed(jnp.concatenate([d_bmd, soft_bpd], axis=1)), None)

    def __call__(self, input_ids_bs: jax.Array, attention_mask_bs: jax.Array,
                 prefix: Prefix) -> jax.Array:
        """(b, d) float32, unnormalized: `out_proj(pooled) + pooled`."""
        backbone, cde = self.backbone, self.cde
        input_ids_bs, attention_mask_bs = ops.right_padded(input_ids_bs, attention_mask_bs)
        b = input_ids_bs.shape[0]
        p, d = prefix.embeds.shape[-2:]
        # Quirk (docs/model.md): the text passes the embedding LayerNorm twice, the prefix once.
        text_bsd = backbone.embeddings.norm(backbone.embeddings(input_ids_bs))
        h_bsd = jnp.concatenate([jnp.broadcast_to(prefix.embeds, (b, p, d)), text_bsd], 1)
        key_mask_bs = jnp.concatenate([jnp.ones((b, p), bool), attention_mask_bs.astype(bool)], 1)
        keep_from = p if cde.pool_ignore_contextual_tokens else 0
        hidden_bsd = backbone.final_norm(backbone.run_layers(
            h_bsd, key_mask_bs, layer0_prefix_qkv=prefix.layer0_qkv, keep_from=keep_from))

        pool_mask_bs = attention_mask_bs.astype(bool)
        if cde.pool_ignore_instruction_tokens:
            pool_mask_bs = ops.instruction_pool_mask(input_ids_bs, pool_mask_bs,
                                                     cde.instruction_end_token_id)
        if not cde.pool_ignore_contextual_tokens:
            pool_mask_bs = jnp.concatenate([jnp.ones((b, p), bool), pool_mask_bs], 1)
        pooled_bd = ops.mean_pool(hidden_bsd, pool_mask_bs)
        return self.output_projection(pooled_bd) + pooled_bd


class ContextualEmbedder(nnx.Module):
    """Both stages of a cde checkpoint, with the HF module names (`first_stage_model` ...).

    `first_stage` and `second_stage` are the stages as functions of jax arrays, for use
    inside other JAX code (`jit`, `grad` w.r.t. the parameters or the dataset embeddings,
    `vmap`, `shard_map`); `CdeModel.module` gives a loaded checkpoint's module. `plan`: how
    attention is computed (`attention.plan`, made once at load; None: the backbone's
    `attention` on JAX's first device)."""

    def __init__(self, backbone: ModernBertConfig, cde: CdeConfig, *,
                 has_null_embedding: bool = False, plan: Plan | None = None, rngs: nnx.Rngs):
        plan = plan or attention_plan(backbone.attention, dtype=backbone.dtype)
        self.first_stage_model = FirstStage(backbone, plan, rngs=rngs)
        self.second_stage_model = SecondStage(backbone, cde, plan,
                                              has_null_embedding=has_null_embedding, rngs=rngs)

    def first_stage(self, input_ids_bs: jax.Array, attention_mask_bs: jax.Array) -> jax.Array:
        """Dataset embeddings (b, d) float32 of tokenized minicorpus documents."""
        return self.first_stage_model(input_ids_bs, attention_mask_bs)

    def second_stage(self, input_ids_bs: jax.Array, attention_mask_bs: jax.Array,
                     dataset_embeddings_md: jax.Array | None) -> jax.Array:
        """Embeddings (b, d) float32, unnormalized, of tokenized texts against dataset
        embeddings (m, d) (None: null-dataset mode); differentiable in both."""
        stage = self.second_stage_model
        return stage(input_ids_bs, attention_mask_bs, stage.prefix(dataset_embeddings_md))

    def __call__(self, input_ids_bs, attention_mask_bs, dataset_input_ids_ms,
                 dataset_attention_mask_ms) -> jax.Array:
        """Upstream's `forward`: both stages end to end."""
        dataset_embeddings_md = self.first_stage(dataset_input_ids_ms, dataset_attention_mask_ms)
        return self.second_stage(input_ids_bs, attention_mask_bs, dataset_embeddings_md)
