"""Pure functions shared by the encoder and both stages: RoPE, attention masks, pooling.

Dimension key: b batch, t query positions, s key positions (or sequence), h heads,
k head_dim, d hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """`theta^(-2i/head_dim)` in float32, computed on the host as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_cos_sin(positions_s: jax.Array, head_dim: int, theta: float):
    """Non-interleaved RoPE tables (s, k) in float32: `emb = [pos*inv_freq, pos*inv_freq]`."""
    freqs_sf = positions_s.astype(jnp.float32)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    emb_sk = jnp.concatenate([freqs_sf, freqs_sf], axis=-1)
    return jnp.cos(emb_sk), jnp.sin(emb_sk)


def apply_rope(x_bshk: jax.Array, cos_sk: jax.Array, sin_sk: jax.Array) -> jax.Array:
    """`x*cos + rotate_half(x)*sin` with `rotate_half([x1, x2]) = [-x2, x1]`, in float32."""
    x = x_bshk.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_sk[None, :, None, :] + rotated * sin_sk[None, :, None, :]
    return out.astype(x_bshk.dtype)


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


def local_self_attention(q_bshk, k_bshk, v_bshk, key_mask_bs, window_radius: int,
                         implementation=None) -> jax.Array:
    """Self-attention where query i sees the unmasked keys with `|i - j| <= window_radius`,
    computing only what the window can reach: queries go in blocks of `window_radius`, each
    attending to its own and the two neighbouring key blocks (3 * radius keys, not s).
    Same result as the dense masked path, up to summation order: a query that sees no key
    (padding far from text) averages every value of the row, as a uniform softmax over
    finite negatives does there."""
    b, s, h, k = q_bshk.shape
    block = window_radius
    n = -(-s // block)
    tail = n * block - s

    def windows(x_bs, fill):  # (b, s, ...) -> (b * n, 3 * block, ...)
        widths = [(0, 0)] * x_bs.ndim
        widths[1] = (block, block + tail)
        x = jnp.pad(x_bs, widths, constant_values=fill).reshape(b, n + 2, block, *x_bs.shape[2:])
        x = jnp.concatenate([x[:, :n], x[:, 1:n + 1], x[:, 2:]], axis=2)
        return x.reshape(b * n, 3 * block, *x_bs.shape[2:])

    q_blocks = jnp.pad(q_bshk, ((0, 0), (0, tail), (0, 0), (0, 0))).reshape(b * n, block, h, k)
    q_pos_t = jnp.arange(block)[:, None] + block  # query offset within its 3-block window
    near_ts = jnp.abs(q_pos_t - jnp.arange(3 * block)[None, :]) <= window_radius
    mask = windows(key_mask_bs.astype(bool), False)[:, None, None, :] & near_ts[None, None]
    out = jax.nn.dot_product_attention(q_blocks, windows(k_bshk, 0), windows(v_bshk, 0),
                                       mask=mask, implementation=implementation)
    out_bshk = out.reshape(b, n * block, h, k)[:, :s]
    sees_any_bs = mask.any(axis=-1).reshape(b, n * block)[:, :s]
    v_mean_bhk = v_bshk.astype(jnp.float32).mean(axis=1).astype(out_bshk.dtype)
    return jnp.where(sees_any_bs[:, :, None, None], out_bshk, v_mean_bhk[:, None])


def mean_pool(hidden_bsd: jax.Array, mask_bs: jax.Array) -> jax.Array:
    """Masked mean in float32 with upstream's `+ 1e-20` denominator. `where`, not a product,
    so a non-finite value at a masked position cannot leak into the mean."""
    mask = mask_bs.astype(bool)
    hidden = jnp.where(mask[..., None], hidden_bsd.astype(jnp.float32), 0.0)
    count_b1 = mask.sum(axis=1, keepdims=True).astype(jnp.float32)
    return hidden.sum(axis=1) / (count_b1 + 1e-20)


def instruction_pool_mask(input_ids_bs: jax.Array, mask_bs: jax.Array,
                          end_token_id: int) -> jax.Array:
    """Pooling mask without the instruction prefix (SPEC 4.6, a quirk kept on purpose).

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
