"""The two cde-small-v2 stages (SPEC sections 3 and 4) on the shared ModernBERT encoder.

First stage: minicorpus documents -> dataset embeddings (mean pool + GELU MLP, unnormalized).
Second stage: each text is encoded after a prefix of [dataset embeddings; 8 soft tokens].
The prefix is the same for every row, so it is prepared once as a `Context` (embedding norm
and layer-0 q/k/v of the prefix) and reused by every batch.

Dimension key: b batch, s text length, n context rows, p prefix length (n + soft tokens),
d hidden, h heads, k head_dim.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import ops
from .config import CdeConfig, ModernBertConfig
from .encoder import ModernBert


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

    def __init__(self, backbone: ModernBertConfig, *, rngs: nnx.Rngs):
        self.embedder = ModernBert(backbone, rngs=rngs)
        self.mlp = MlpHead(backbone.hidden_size, backbone.hidden_size, gelu_exact, backbone,
                           rngs=rngs)

    def __call__(self, input_ids_bs: jax.Array, attention_mask_bs: jax.Array) -> jax.Array:
        hidden_bsd = self.embedder(input_ids_bs, attention_mask_bs)
        return self.mlp(ops.mean_pool(hidden_bsd, attention_mask_bs))


class Context(NamedTuple):
    """The second stage's prefix, ready for the backbone (a pytree).

    At inference one prefix serves every row: `embeds` is (p, d) and `layer0_qkv` holds its
    layer-0 q/k/v, each (1, p, h, k). In training each row has its own order and dropout:
    `embeds` is (b, p, d) and `layer0_qkv` is None.
    """

    embeds: jax.Array  # LN_emb(concat(dataset embeddings, soft prompt))
    layer0_qkv: tuple[jax.Array, jax.Array, jax.Array] | None


class SecondStage(nnx.Module):
    def __init__(self, backbone: ModernBertConfig, cde: CdeConfig, *, has_null_embedding: bool,
                 rngs: nnx.Rngs):
        d = backbone.hidden_size
        self.cde = cde
        self.backbone = ModernBert(backbone, rngs=rngs)
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
            raise ValueError("null-dataset mode and sequence dropout need "
                             "`sequence_dropout_null_embedding`, which this checkpoint lacks")
        return self.sequence_dropout_null_embedding[...].astype(jnp.float32)

    def dataset_rows(self, dataset_embeddings_nd: jax.Array | None) -> jax.Array:
        """D as (n, d) float32, at most the first `corpus size` rows (SPEC 4.1); None selects
        null-dataset mode (SPEC 4.3)."""
        n_max = self.cde.num_context_tokens
        if dataset_embeddings_nd is None:
            null_d = self.null_embedding()
            return jnp.broadcast_to(null_d, (n_max, null_d.shape[0]))
        if dataset_embeddings_nd.ndim == 3 and dataset_embeddings_nd.shape[0] == 1:
            dataset_embeddings_nd = dataset_embeddings_nd[0]
        if dataset_embeddings_nd.ndim != 2:
            raise ValueError("dataset embeddings must be (n, d) or (1, n, d), got shape "
                             f"{dataset_embeddings_nd.shape}")
        return dataset_embeddings_nd[:n_max].astype(jnp.float32)

    def _normed(self, prefix: jax.Array) -> jax.Array:
        backbone = self.backbone
        return backbone.embeddings.norm(prefix.astype(backbone.config.jnp_dtype))

    def context(self, dataset_embeddings_nd: jax.Array | None) -> Context:
        """The inference prefix `concat(D, P)`, shared by every row."""
        prefix_pd = self._normed(jnp.concatenate([self.dataset_rows(dataset_embeddings_nd),
                                                  self.soft_prompt()]))
        qkv = self.backbone.layers[0].project_qkv(prefix_pd[None], jnp.arange(prefix_pd.shape[0]))
        return Context(prefix_pd, tuple(qkv))

    def training_context(self, dataset_embeddings_nd: jax.Array, batch: int, rng: jax.Array, *,
                         permute: bool = True, dropout_prob: float = 0.0) -> Context:
        """Per-row prefixes as upstream trains: each row sees D in its own random order, and
        each of its rows of D is replaced by the null embedding with probability
        `dropout_prob`; the soft tokens stay last."""
        d_nd = self.dataset_rows(dataset_embeddings_nd)
        n, d = d_nd.shape
        d_bnd = jnp.broadcast_to(d_nd, (batch, n, d))
        drop_key, perm_key = jax.random.split(rng)
        if dropout_prob > 0.0:
            dropped_bn = jax.random.bernoulli(drop_key, dropout_prob, (batch, n))
            d_bnd = jnp.where(dropped_bn[..., None], self.null_embedding(), d_bnd)
        if permute:
            order_bn = jax.vmap(lambda k: jax.random.permutation(k, n))(
                jax.random.split(perm_key, batch))
            d_bnd = jnp.take_along_axis(d_bnd, order_bn[..., None], axis=1)
        soft_pd = self.soft_prompt()
        soft_bpd = jnp.broadcast_to(soft_pd, (batch,) + soft_pd.shape)
        return Context(self._normed(jnp.concatenate([d_bnd, soft_bpd], axis=1)), None)

    def __call__(self, input_ids_bs: jax.Array, attention_mask_bs: jax.Array,
                 context: Context) -> jax.Array:
        """(b, d) float32, unnormalized: `out_proj(pooled) + pooled`."""
        backbone, cde = self.backbone, self.cde
        b = input_ids_bs.shape[0]
        p, d = context.embeds.shape[-2:]
        # Quirk (SPEC 4.5): the text passes the embedding LayerNorm twice, the prefix once.
        text_bsd = backbone.embeddings.norm(backbone.embeddings(input_ids_bs))
        h_bsd = jnp.concatenate([jnp.broadcast_to(context.embeds, (b, p, d)), text_bsd], 1)
        key_mask_bs = jnp.concatenate([jnp.ones((b, p), bool), attention_mask_bs.astype(bool)], 1)
        keep_from = p if cde.pool_ignore_contextual_tokens else 0
        hidden_bsd = backbone.final_norm(backbone.run_layers(
            h_bsd, key_mask_bs, layer0_prefix_qkv=context.layer0_qkv, keep_from=keep_from))

        pool_mask_bs = attention_mask_bs.astype(bool)
        if cde.pool_ignore_instruction_tokens:
            pool_mask_bs = ops.instruction_pool_mask(input_ids_bs, pool_mask_bs,
                                                     cde.instruction_end_token_id)
        if not cde.pool_ignore_contextual_tokens:
            pool_mask_bs = jnp.concatenate([jnp.ones((b, p), bool), pool_mask_bs], 1)
        pooled_bd = ops.mean_pool(hidden_bsd, pool_mask_bs)
        return self.output_projection(pooled_bd) + pooled_bd


class ContextualEmbedder(nnx.Module):
    """Both stages of a cde checkpoint, with the HF module names (`first_stage_model` ...)."""

    def __init__(self, backbone: ModernBertConfig, cde: CdeConfig, *,
                 has_null_embedding: bool = False, rngs: nnx.Rngs):
        self.first_stage_model = FirstStage(backbone, rngs=rngs)
        self.second_stage_model = SecondStage(backbone, cde, has_null_embedding=has_null_embedding,
                                              rngs=rngs)

    def __call__(self, input_ids_bs, attention_mask_bs, dataset_input_ids_ns,
                 dataset_attention_mask_ns) -> jax.Array:
        """Upstream's `forward`: both stages end to end (what training differentiates)."""
        dataset_embeddings_nd = self.first_stage_model(dataset_input_ids_ns,
                                                       dataset_attention_mask_ns)
        context = self.second_stage_model.context(dataset_embeddings_nd)
        return self.second_stage_model(input_ids_bs, attention_mask_bs, context)
