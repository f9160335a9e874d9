"""Pure functions shared by the encoder and both stages: RoPE, attention masks, pooling.
Shapes are suffixed with the package's dimension key (cde_jax/__init__.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """`theta^(-2i/head_dim)` in float32, computed on the host as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_cos_sin(positions_s: jax.Array, head_dim: int, theta: float):
    """Non-interleaved RoPE tables (s, e) in float32: `emb = [pos*inv_freq, pos*inv_freq]`."""
    freqs = positions_s.astype(jnp.float32)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    emb_se = jnp.concatenate([freqs, freqs], axis=-1)  # freqs: (s, e / 2)
    return jnp.cos(emb_se), jnp.sin(emb_se)


def apply_rope(x_bshe: jax.Array, cos_se: jax.Array, sin_se: jax.Array) -> jax.Array:
    """`x*cos + rotate_half(x)*sin` with `rotate_half([x1, x2]) = [-x2, x1]`, in float32."""
    x = x_bshe.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_se[None, :, None, :] + rotated * sin_se[None, :, None, :]
    return out.astype(x_bshe.dtype)


def attention_mask(key_mask_bs: jax.Array, q_pos_t: jax.Array, k_pos_s: jax.Array,
                   window_radius: int | None) -> jax.Array:
    """Boolean (b, 1, t, s): key j is visible to query i when it is not padding and, in a
    local layer, `|pos_i - pos_j| <= window_radius`. A query that sees nothing gets a uniform
    softmax over finite large negatives in `jax.nn.dot_product_attention` (never NaN)."""
    mask_b1ts = key_mask_bs.astype(bool)[:, None, None, :]
    if window_radius is not None:
        near_ts = jnp.abs(q_pos_t[:, None] - k_pos_s[None, :]) <= window_radius
        mask_b1ts = mask_b1ts & near_ts[None, None]
    return mask_b1ts


def mean_pool(hidden_bsd: jax.Array, mask_bs: jax.Array) -> jax.Array:
    """Masked mean in float32 with upstream's `+ 1e-20` denominator. `where`, not a product,
    so a non-finite value at a masked position cannot leak into the mean."""
    mask = mask_bs.astype(bool)
    hidden = jnp.where(mask[..., None], hidden_bsd.astype(jnp.float32), 0.0)
    count_b1 = mask.sum(axis=1, keepdims=True).astype(jnp.float32)
    return hidden.sum(axis=1) / (count_b1 + 1e-20)


def instruction_pool_mask(input_ids_bs: jax.Array, mask_bs: jax.Array,
                          end_token_id: int) -> jax.Array:
    """Pooling mask without the instruction prefix (docs/model.md §6, a quirk kept on purpose).

    `end` is the first position > 0 holding `end_token_id` (the ":" of "search_query: ") with
    mask 1; positions 0..end are dropped. Rows without such a token keep their whole mask.
    """
    s = input_ids_bs.shape[1]
    pos_s = jnp.arange(s)
    mask = mask_bs.astype(bool)
    is_end_bs = (input_ids_bs == end_token_id) & mask & (pos_s > 0)[None, :]
    end_b = jnp.argmax(is_end_bs, axis=1)  # first hit; 0 when there is none
    instruction_bs = (pos_s[None, :] <= end_b[:, None]) & (end_b > 0)[:, None]
    return mask & ~instruction_bs
