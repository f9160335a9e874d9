"""Attention kernels by name: the one place that decides how attention is computed.

Every kernel computes the same function, ModernBERT's masked attention (docs/model.md):

    kernel(q_bthe, k_bshe, v_bshe, key_mask_bs, q_pos_t, k_pos_s, window_radius) -> o_bthe

Key j is visible to query i when `key_mask_bs[:, j]` and, in a local layer
(`window_radius` not None), `|q_pos_t[i] - k_pos_s[j]| <= window_radius`. Queries may be a
suffix of the keys (t < s: the second stage's last layer). A query that sees no key gets a
finite output (a uniform softmax), never NaN. Scale 1/sqrt(e), softmax in float32.

`load(path, attention=...)` takes a name from `names()`; "auto" picks per platform
(`AUTO`). An unknown name is a ValueError listing the choices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import ops
from .validation import UserError

Kernel = Callable[..., jax.Array]


def dense_attention(q_bthe, k_bshe, v_bshe, key_mask_bs, q_pos_t, k_pos_s, window_radius):
    """`jax.nn.dot_product_attention` with the full boolean (b, 1, t, s) mask."""
    mask_b1ts = ops.attention_mask(key_mask_bs, q_pos_t, k_pos_s, window_radius)
    return jax.nn.dot_product_attention(q_bthe, k_bshe, v_bshe, mask=mask_b1ts)


def local_block_attention(q_bshe, k_bshe, v_bshe, key_mask_bs, window_radius: int,
                          attend: Kernel = dense_attention) -> jax.Array:
    """Local self-attention computing only what the window can reach: queries go in blocks
    of `window_radius`, each attending to its own and the two neighbouring key blocks
    (3 * radius keys, not s) through `attend`. Same result as the dense masked path up to
    summation order: a query that sees no key (padding far from text) averages every value
    of its row, as a uniform softmax over finite negatives does there."""
    b, s, h, e = q_bshe.shape
    block = window_radius
    n = -(-s // block)
    tail = n * block - s

    def windows(x_bs, fill):  # (b, s, ...) -> (b * n, 3 * block, ...)
        widths = [(0, 0)] * x_bs.ndim
        widths[1] = (block, block + tail)
        x = jnp.pad(x_bs, widths, constant_values=fill).reshape(b, n + 2, block, *x_bs.shape[2:])
        x = jnp.concatenate([x[:, :n], x[:, 1:n + 1], x[:, 2:]], axis=2)
        return x.reshape(b * n, 3 * block, *x_bs.shape[2:])

    q_blocks = jnp.pad(q_bshe, ((0, 0), (0, tail), (0, 0), (0, 0))).reshape(b * n, block, h, e)
    q_pos_t = jnp.arange(block) + block  # query offsets within their 3-block window
    key_mask_ws = windows(key_mask_bs.astype(bool), False)
    out = attend(q_blocks, windows(k_bshe, 0), windows(v_bshe, 0), key_mask_ws, q_pos_t,
                 jnp.arange(3 * block), window_radius)
    out_bshe = out.reshape(b, n * block, h, e)[:, :s]
    near_ts = jnp.abs(q_pos_t[:, None] - jnp.arange(3 * block)[None, :]) <= window_radius
    sees_any_bs = (key_mask_ws[:, None, :] & near_ts[None]).any(axis=-1).reshape(
        b, n * block)[:, :s]
    v_mean_bhe = v_bshe.astype(jnp.float32).mean(axis=1).astype(out_bshe.dtype)
    return jnp.where(sees_any_bs[:, :, None, None], out_bshe, v_mean_bhe[:, None])


def blocked_local(attend: Kernel) -> Kernel:
    """`attend`, with local self-attention over sequences longer than 3 windows done block by
    block (`local_block_attention`): the local-layer strategy shared by kernels."""
    def kernel(q_bthe, k_bshe, v_bshe, key_mask_bs, q_pos_t, k_pos_s, window_radius):
        s = k_bshe.shape[1]
        if window_radius is not None and q_bthe.shape[1] == s and s > 3 * window_radius:
            return local_block_attention(q_bthe, k_bshe, v_bshe, key_mask_bs, window_radius,
                                         attend)
        return attend(q_bthe, k_bshe, v_bshe, key_mask_bs, q_pos_t, k_pos_s, window_radius)
    return kernel


KERNELS: dict[str, Kernel] = {
    "xla": blocked_local(dense_attention),
}

# The kernel "auto" picks, per `jax.Device.platform`.
AUTO = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


def names() -> tuple[str, ...]:
    return ("auto", *KERNELS)


def check(name: str) -> str:
    if name not in names():
        raise UserError(f"unknown attention {name!r}: choose one of {', '.join(names())}")
    return name


def resolve(name: str, platform: str | None = None) -> str:
    """A kernel name from `KERNELS`: "auto" becomes the choice for `platform` (default: the
    platform of JAX's default backend)."""
    if check(name) != "auto":
        return name
    platform = platform or jax.default_backend()
    return AUTO.get(platform, "xla")


def kernel(name: str) -> Kernel:
    return KERNELS[resolve(name)]
