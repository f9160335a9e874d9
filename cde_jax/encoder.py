"""ModernBERT encoder in Flax NNX, computing what `transformers.ModernBertModel` computes (eval).

Each layer is pre-norm attention + pre-norm GeGLU MLP; every `global_attn_every_n_layers`-th
layer attends globally with RoPE theta 160k, the others within `|i-j| <= local_attention//2`
with theta 10k. The layer is split into `project_qkv` / `attend` / `residual_mlp` so the second
stage can reuse the pieces with a shared prefix (see `model.py`) without a second copy.
Attention is computed as the model's `attention.Plan` says, decided once at load and kept by
every layer: the kernel, its operand layout (`Kernel.rotates`) and whether `project_qkv` and
`residual_mlp` run `fused_layer`'s kernels (`EncoderLayer.fused`, the same arithmetic as the
modules' path here).

Precision: with a half compute dtype (`cfg.dtype` "bfloat16"/"float16") every matmul takes
half-precision inputs and accumulates in float32, and so does attention. Between ops the
activations (matmul outputs, q/k/v, the residual stream) are kept in
`cfg.jnp_activation_dtype`: the compute dtype by default (the linears write it directly,
`preferred_element_type`), which halves the memory traffic that bounds accelerators, or
float32 (`activations="float32"`: rounding only at matmul inputs). Norms, RoPE, softmax and
GELU compute in float32 inside their fusions either way. With float32 compute every cast is
a no-op.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from . import attention, fused_layer, ops
from .config import GLOBAL, ModernBertConfig


def layer_norm(cfg: ModernBertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # float32 whatever the compute dtype. Two-pass variance, as torch computes it: the fast
    # E[x^2]-E[x]^2 form loses parity.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.norm_eps, use_bias=cfg.norm_bias,
                         use_fast_variance=False, dtype=jnp.float32,
                         param_dtype=cfg.jnp_param_dtype, rngs=rngs)


def dense(cfg: ModernBertConfig, in_features, out_features, *, use_bias: bool, rngs: nnx.Rngs,
          axis=-1) -> nnx.LinearGeneral:
    """Inputs and weights cast to the compute dtype, products accumulated in float32 and
    written in the activation dtype (`preferred_element_type`: cuBLAS and the MXU round their
    float32 sums once, on the way out; XLA:CPU accumulates bfloat16 products in float32 too)."""
    return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias,
                             dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                             preferred_element_type=cfg.jnp_activation_dtype,
                             kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, rngs: nnx.Rngs):
        self.tok_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.float32,
                                        param_dtype=cfg.jnp_param_dtype,
                                        embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.norm = layer_norm(cfg, rngs)

    def __call__(self, input_ids_bs: jax.Array) -> jax.Array:
        # The rows gathered, then cast: `nnx.Embed` would cast the whole table first.
        table_vd = self.tok_embeddings.embedding[...]
        return self.norm(jnp.take(table_vd, input_ids_bs, axis=0).astype(jnp.float32))


class Attention(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, rngs: nnx.Rngs):
        h, e = cfg.num_attention_heads, cfg.head_dim
        self.wqkv = dense(cfg, cfg.hidden_size, (3, h, e), use_bias=cfg.attention_bias, rngs=rngs)
        self.wo = dense(cfg, (h, e), cfg.hidden_size, axis=(-2, -1),
                        use_bias=cfg.attention_bias, rngs=rngs)

    def project_qkv(self, x_bsd: jax.Array, activation_dtype, *,
                    heads_apart: bool = True) -> list[jax.Array]:
        """q, k, v as three matmuls on the slices of the fused `wqkv` kernel: each writes its
        own array, so nothing splits a fused (b, s, 3, h, e) output (a pass over all of it on
        accelerators). (b, s, h, e), or with `heads_apart=False` (b, s, h * e), the heads side
        by side as kernels that rotate q and k themselves read them. The dtypes of `dense`."""
        wqkv = self.wqkv
        kernel_d3he = wqkv.kernel[...].astype(wqkv.dtype)
        d, _, h, e = kernel_d3he.shape
        x_bsd = x_bsd.astype(wqkv.dtype)
        out = []
        for i in range(3):
            kernel_dhe, bias_he = kernel_d3he[:, i], None
            if wqkv.bias is not None:
                bias_he = wqkv.bias[...][i].astype(jnp.float32)
            if not heads_apart:
                kernel_dhe = kernel_dhe.reshape(d, h * e)
                bias_he = None if bias_he is None else bias_he.reshape(h * e)
            y = jnp.einsum("bsd,d...->bs...", x_bsd, kernel_dhe,
                           preferred_element_type=activation_dtype)
            if bias_he is not None:
                y = y + bias_he
            out.append(y.astype(activation_dtype))
        return out

    def project_out(self, o_btd: jax.Array) -> jax.Array:
        """`wo` on heads side by side (b, t, h * e): its (h, e, d) kernel read as (h * e, d),
        so the attention output is read as the kernel wrote it."""
        wo = self.wo
        kernel_hed = wo.kernel[...].astype(wo.dtype)
        y_btd = jnp.einsum("btk,kd->btd", o_btd.astype(wo.dtype),
                           kernel_hed.reshape(-1, kernel_hed.shape[-1]),
                           preferred_element_type=wo.preferred_element_type)
        if wo.bias is not None:
            y_btd = y_btd + wo.bias[...].astype(jnp.float32)
        return y_btd


class Mlp(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, rngs: nnx.Rngs):
        self.wi = dense(cfg, cfg.hidden_size, (2, cfg.intermediate_size),
                        use_bias=cfg.mlp_bias, rngs=rngs)
        self.wo = dense(cfg, cfg.intermediate_size, cfg.hidden_size, use_bias=cfg.mlp_bias,
                        rngs=rngs)

    def __call__(self, x_bsd: jax.Array, activation_dtype) -> jax.Array:
        wi_bs2f = self.wi(x_bsd).astype(activation_dtype)
        x_bsf, gate_bsf = (wi_bs2f[..., i, :].astype(jnp.float32) for i in range(2))
        act_bsf = jax.nn.gelu(x_bsf, approximate=False) * gate_bsf
        return self.wo(act_bsf).astype(activation_dtype)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, index: int, plan: attention.Plan, *,
                 rngs: nnx.Rngs):
        self.layer_type = cfg.layer_types[index]
        self.window_radius = None if self.layer_type == GLOBAL else cfg.window_radius
        self.rope = attention.Rope(cfg.rope_theta(self.layer_type), cfg.head_dim)
        self.dtype, self.activation_dtype = cfg.jnp_dtype, cfg.jnp_activation_dtype
        self.plan = plan
        self.kernel_rotates = plan.spec.rotates
        # The projections, norms and MLP around the kernel as kernels too (fused_layer.py),
        # where the plan fuses the layer and the layer's weights allow.
        self.fused = plan.fuses_layer and fused_layer.supports(cfg)
        self.numerics = fused_layer.Numerics(cfg.norm_eps, self.dtype, self.activation_dtype)
        self.attn_norm = None if index == 0 else layer_norm(cfg, rngs)  # layer 0: identity
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = layer_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)

    def _weight(self, linear: nnx.LinearGeneral, rows: int) -> jax.Array:
        """A linear's kernel in the compute dtype as a (rows, columns) matrix."""
        return linear.kernel[...].astype(linear.dtype).reshape(rows, -1)

    def project_qkv(self, h_bsd: jax.Array, pos_s: jax.Array):
        """Normalized input -> q, k, v (b, s, h, e) in the compute dtype, RoPE (float32) at
        positions `pos_s`; for a kernel that rotates them itself, (b, s, h * e) unrotated."""
        if self.fused:
            scale_d = None if self.attn_norm is None else self.attn_norm.scale[...]
            return fused_layer.norm_qkv(h_bsd, scale_d,
                                        self._weight(self.attn.wqkv, h_bsd.shape[-1]),
                                        self.numerics, self.plan)
        x_bsd = h_bsd if self.attn_norm is None else self.attn_norm(h_bsd)
        q, k, v = self.attn.project_qkv(x_bsd, self.activation_dtype,
                                        heads_apart=not self.kernel_rotates)
        if self.kernel_rotates:
            return tuple(x.astype(self.dtype) for x in (q, k, v))
        cos_se, sin_se = ops.rope_cos_sin(pos_s, self.rope.head_dim, self.rope.theta)
        return tuple(x.astype(self.dtype) for x in (
            ops.apply_rope(q, cos_se, sin_se), ops.apply_rope(k, cos_se, sin_se), v))

    def attend(self, q_bthe, k_bshe, v_bshe, key_mask_bs, q_pos_t, k_pos_s) -> jax.Array:
        """Attention by the plan's kernel (`attention.py`), not projected yet: (b, t, h, e),
        or (b, t, h * e) from a kernel that rotates q and k itself."""
        mask = ops.MaskSpec(key_mask_bs, q_pos_t, k_pos_s, self.window_radius)
        return self.plan.attend(q_bthe, k_bshe, v_bshe, mask, self.rope)

    def residual_mlp(self, h_btd: jax.Array, o_bthe: jax.Array) -> jax.Array:
        """The layer's output from its input and the attention output: the output
        projection, the residual sum, the MLP block and its residual sum."""
        if self.fused:
            d = h_btd.shape[-1]
            return fused_layer.out_mlp(
                o_bthe, h_btd, self._weight(self.attn.wo, o_bthe.shape[-1]),
                self.mlp_norm.scale[...], self._weight(self.mlp.wi, d),
                self._weight(self.mlp.wo, self.mlp.wo.kernel.shape[0]), self.numerics,
                self.plan)
        project = self.attn.project_out if self.kernel_rotates else self.attn.wo
        h_btd = (h_btd + project(o_bthe).astype(self.activation_dtype)).astype(
            self.activation_dtype)
        out_btd = self.mlp(self.mlp_norm(h_btd), self.activation_dtype)
        return (h_btd + out_btd).astype(self.activation_dtype)


class ModernBert(nnx.Module):
    """`ModernBertModel` (eval mode): `__call__` returns `last_hidden_state`. `plan`: how
    attention is computed (`attention.plan`; None: `cfg.attention` on JAX's first device)."""

    def __init__(self, cfg: ModernBertConfig, plan: attention.Plan | None = None, *,
                 rngs: nnx.Rngs):
        self.config = cfg
        plan = plan or attention.plan(cfg.attention, dtype=cfg.dtype)
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, i, plan, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.final_norm = layer_norm(cfg, rngs)

    def __call__(self, input_ids_bs: jax.Array | None = None,
                 attention_mask_bs: jax.Array | None = None, *,
                 inputs_embeds_bsd: jax.Array | None = None) -> jax.Array:
        """Like HF: `LN_emb(E[ids])`, or `LN_emb(inputs_embeds)` when embeddings are given."""
        if (input_ids_bs is None) == (inputs_embeds_bsd is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids_bs is not None:
            h_bsd = self.embeddings(input_ids_bs)
        else:
            h_bsd = self.embeddings.norm(inputs_embeds_bsd.astype(jnp.float32))
        if attention_mask_bs is None:
            attention_mask_bs = jnp.ones(h_bsd.shape[:2], dtype=bool)
        return self.final_norm(self.run_layers(h_bsd, attention_mask_bs))

    def run_layers(self, h_bsd: jax.Array, key_mask_bs: jax.Array, *,
                   layer0_prefix_qkv=None, keep_from: int = 0) -> jax.Array:
        """The layer stack on embedded inputs (positions 0..s-1), before the final norm.

        layer0_prefix_qkv: layer 0's (q, k, v) for the first P positions when they are the same
          for every row (the second stage's context prefix): computed once, broadcast here.
        keep_from: the last layer computes outputs only for positions >= keep_from (the
          others are never read); the result is (b, s - keep_from, d).
        """
        s = h_bsd.shape[1]
        pos_s = jnp.arange(s)
        h_bsd = h_bsd.astype(self.config.jnp_activation_dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == 0 and layer0_prefix_qkv is not None:
                p = layer0_prefix_qkv[0].shape[1]
                text_qkv = layer.project_qkv(h_bsd[:, p:], pos_s[p:])
                q, k, v = (jnp.concatenate(
                    [jnp.broadcast_to(pre, (h_bsd.shape[0],) + pre.shape[1:]), txt], axis=1)
                    for pre, txt in zip(layer0_prefix_qkv, text_qkv))
            else:
                q, k, v = layer.project_qkv(h_bsd, pos_s)
            q_pos_t = pos_s
            if i == last and keep_from:
                q, h_bsd, q_pos_t = q[:, keep_from:], h_bsd[:, keep_from:], pos_s[keep_from:]
            h_bsd = layer.residual_mlp(h_bsd, layer.attend(q, k, v, key_mask_bs, q_pos_t,
                                                            pos_s))
        return h_bsd
