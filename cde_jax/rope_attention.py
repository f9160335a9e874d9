"""Attention with RoPE inside, on heads laid side by side: the TPU kernel of the encoder.

    rope_attention(q_btd, k_bsd, v_bsd, mask, theta) -> o_btd

q, k and v are the projections as the matmuls write them, (b, s, d) with head i in lanes
[i*e, (i+1)*e) of d (d = h * e in ModernBERT) and RoPE (base `theta`) not yet applied; the
output has the same layout, which the output projection reads as it is. The function is
ModernBERT's attention (`attention.py`'s contract) of the rotated q and k.

Why a kernel of our own. On a TPU the memory traffic between ops, not the MXU, bounds this
model at base width (docs/performance.md): around a splash call XLA wrote q and k in float32
for RoPE, rotated them in a pass of their own, then padded and transposed q, k and v into
the (b, h, s, e) layout splash reads, and broadcast the padding mask into (s, 128) segment-id
tiles per row; ~45 of the ~82 KB each token moved per layer. This kernel reads q, k and v
once, as the matmuls wrote them (lane-dense: 12 heads of 64 fill 768 lanes, where a head-minor
layout pads 64 to 128), rotates them in VMEM and writes the output once: 4 x 2d bytes per
token. The key mask is read as it is, (1, s) per row beside q, k and v (s * 4 bytes, against
3 * s * d * 2): any mask, padding on either side or holes, at the keys' index positions, as
"xla" computes it. `attention.rope_fused` sends rows longer than VMEM holds to splash.

Inside (Pallas, Mosaic on TPUs, interpret mode elsewhere): one grid step per batch row holds
the row's q, k and v in VMEM; query blocks of 128 loop statically, each against every key
(global layers) or the 3 key blocks its window reaches (local layers: the FLOPs of the
window, not of the row); heads go in 128-lane groups (`lax.fori_loop`, which keeps one
group's temporaries live) and within a group head by head, with q masked to that head's
lanes: the MXU contracts 128 lanes either way, so the mask costs no MXU time. rotate_half is
two lane rotations (`pltpu.roll`) and a select, with its sign folded into the sine table.
Logits, softmax and accumulation are float32, as in every kernel.

Gradients: the backward pass differentiates `reference` (XLA's dense attention on the same
inputs): correct everywhere, not a fused kernel; fine-tuning on TPUs can name "splash",
whose backward is a kernel too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import ops
from .ops import MASKED_LOGIT, MaskSpec

NAME = "rope_attention"  # the Pallas call's name, which compiled programs carry
QUERY_BLOCK = 128
LANE_GROUP = 128  # the TPU's lane count: heads are processed 128 lanes at a time
SUBLANE_ALIGN = 16  # bfloat16 rows pack 16 to a tile: local key windows start on them
# A row's q, k, v and output sit in VMEM, double-buffered: the largest row compiled for every
# TPU target in 16 MiB of scoped VMEM is 1152 keys of 768 bfloat16 lanes (cde-small-v2's
# longest is 512 + 520 = 1032; 1280 fails).
MAX_ROW_BYTES = 1152 * 768 * 2


def reference(q_btd, k_bsd, v_bsd, mask: MaskSpec, theta: float, head_dim: int):
    """The same function in plain JAX: heads split, `ops.apply_rope` at the mask's
    positions, `jax.nn.dot_product_attention` with the full mask (the registry's "xla")."""
    b, t, d = q_btd.shape
    split = lambda x: x.reshape(*x.shape[:2], d // head_dim, head_dim)  # noqa: E731
    cos_se, sin_se = ops.rope_cos_sin(mask.k_pos_s, head_dim, theta)
    cos_te, sin_te = ops.rope_cos_sin(mask.q_pos_t, head_dim, theta)
    q_bthe = ops.apply_rope(split(q_btd), cos_te, sin_te)
    k_bshe = ops.apply_rope(split(k_bsd), cos_se, sin_se)
    o_bthe = jax.nn.dot_product_attention(q_bthe, k_bshe, split(v_bsd),
                                          mask=ops.attention_mask(mask))
    return o_bthe.reshape(b, t, d)


def lane_group(d: int) -> int:
    """Lanes per head group: 128 where d splits into them, else all of d (small models)."""
    return LANE_GROUP if d % LANE_GROUP == 0 else d


def rope_tables(s: int, head_dim: int, theta: float, group: int) -> tuple[np.ndarray, ...]:
    """cos and signed sin (s, group) in float32 for positions 0..s-1, the head's pattern
    repeated across the group: x_rot = x * cos + partner(x) * sin, where partner swaps the
    halves of each head and the sine of the first half carries rotate_half's minus."""
    emb_se = np.concatenate([np.arange(s, dtype=np.float32)[:, None]
                             * ops.rope_inv_freq(head_dim, theta)[None]] * 2, axis=-1)
    half = head_dim // 2
    sin_se = np.sin(emb_se)
    signed_se = np.concatenate([-sin_se[:, :half], sin_se[:, half:]], axis=-1)
    reps = group // head_dim
    return (np.tile(np.cos(emb_se), (1, reps)).astype(np.float32),
            np.tile(signed_se, (1, reps)).astype(np.float32))


def _rotate(x_rg, cos_rg, sin_rg, head_dim: int):
    """RoPE of a (rows, group) float32 block: each head's halves swapped by two lane
    rotations and a select."""
    lane_1g = jax.lax.broadcasted_iota(jnp.int32, (1, x_rg.shape[1]), 1)
    half = head_dim // 2
    ahead = pltpu.roll(x_rg, x_rg.shape[1] - half, 1)  # lane j holds x[j + half]
    behind = pltpu.roll(x_rg, half, 1)                 # lane j holds x[j - half]
    partner = jnp.where(jax.lax.rem(lane_1g, head_dim) < half, ahead, behind)
    return x_rg * cos_rg + partner * sin_rg


def _key_span(r0: int, r1: int, offset: int, s: int, radius: int | None) -> tuple[int, int]:
    """Keys [lo, hi) that queries r0..r1-1 (at keys r0 + offset ..) can see: all of them in a
    global layer, the window's reach (aligned to 16 rows) in a local one."""
    if radius is None:
        return 0, s
    lo = max(0, (r0 + offset - radius) // SUBLANE_ALIGN * SUBLANE_ALIGN)
    return lo, min(s, r1 + offset + radius + 1)


def _kernel(mask_ref, q_ref, k_ref, v_ref, cos_ref, sin_ref, o_ref, *, head_dim: int,
            radius: int | None, scale: float):
    """One batch row: every query block, every head group (see the module docstring)."""
    t, d = q_ref.shape[1], q_ref.shape[2]
    s = k_ref.shape[1]
    offset, group = s - t, lane_group(d)
    dtype = v_ref.dtype
    for r0 in range(0, t, QUERY_BLOCK):
        r1 = min(t, r0 + QUERY_BLOCK)
        lo, hi = _key_span(r0, r1, offset, s, radius)
        q_pos_rk = jax.lax.broadcasted_iota(jnp.int32, (r1 - r0, hi - lo), 0) + (r0 + offset)
        k_pos_rk = jax.lax.broadcasted_iota(jnp.int32, (r1 - r0, hi - lo), 1) + lo
        visible_rk = jnp.broadcast_to(mask_ref[0, :, lo:hi] != 0, (r1 - r0, hi - lo))
        if radius is not None:
            visible_rk &= jnp.abs(q_pos_rk - k_pos_rk) <= radius
        q_rows, k_rows = slice(r0 + offset, r1 + offset), slice(lo, hi)

        def heads(g, carry, r0=r0, r1=r1, q_rows=q_rows, k_rows=k_rows, visible_rk=visible_rk):
            lanes = pl.ds(pl.multiple_of(g * group, group), group)
            q_rg = _rotate(q_ref[0, r0:r1, lanes].astype(jnp.float32), cos_ref[q_rows, :],
                           sin_ref[q_rows, :], head_dim)
            q_rg = (q_rg * scale).astype(dtype)
            k_kg = _rotate(k_ref[0, k_rows, lanes].astype(jnp.float32), cos_ref[k_rows, :],
                           sin_ref[k_rows, :], head_dim).astype(dtype)
            v_kg = v_ref[0, k_rows, lanes]
            head_1g = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (1, group), 1), head_dim)
            o_rg = None
            for head in range(group // head_dim):
                mine_1g = head_1g == head
                logits_rk = jax.lax.dot_general(
                    jnp.where(mine_1g, q_rg, jnp.zeros_like(q_rg)), k_kg,
                    (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                logits_rk = jnp.where(visible_rk, logits_rk, MASKED_LOGIT)
                weights_rk = jnp.exp(logits_rk - logits_rk.max(axis=1, keepdims=True))
                head_rg = jnp.dot(weights_rk.astype(dtype), v_kg,
                                  preferred_element_type=jnp.float32)
                head_rg = head_rg / weights_rk.sum(axis=1, keepdims=True)
                o_rg = head_rg if o_rg is None else jnp.where(mine_1g, head_rg, o_rg)
            o_ref[0, r0:r1, lanes] = o_rg.astype(o_ref.dtype)
            return carry

        jax.lax.fori_loop(0, d // group, heads, 0)


def _forward(q_btd, k_bsd, v_bsd, key_mask_bs, *, theta, head_dim, radius, interpret):
    b, t, d = q_btd.shape
    s = k_bsd.shape[1]
    group = lane_group(d)
    cos_sg, sin_sg = rope_tables(s, head_dim, theta, group)
    kernel = functools.partial(_kernel, head_dim=head_dim, radius=radius,
                               scale=float(1.0 / np.sqrt(head_dim)))
    row = lambda n: pl.BlockSpec((1, n, d), lambda i: (i, 0, 0))  # noqa: E731
    table = pl.BlockSpec((s, group), lambda i: (0, 0),  # fetched once
                         pipeline_mode=pl.Buffered(1))
    itemsize = q_btd.dtype.itemsize
    resident = (2 * (2 * t + 2 * s) * d * itemsize  # q, k, v, o double-buffered
                + 2 * s * group * 4 + 2 * s * 4     # the tables, the mask
                + 8 * QUERY_BLOCK * s * 4 + 4 * s * group * 4)  # a block's temporaries
    return pl.pallas_call(
        kernel, name=NAME, grid=(b,),
        in_specs=[pl.BlockSpec((1, 1, s), lambda i: (i, 0, 0)), row(t), row(s), row(s), table,
                  table],
        out_specs=row(t),
        out_shape=jax.ShapeDtypeStruct((b, t, d), q_btd.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=ops.vmem_limit_bytes(resident)),
        interpret=interpret,
    )(key_mask_bs.astype(jnp.int32)[:, None, :], q_btd, k_bsd, v_bsd, jnp.asarray(cos_sg),
      jnp.asarray(sin_sg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q_btd, k_bsd, v_bsd, mask, theta, head_dim, interpret):
    return _forward(q_btd, k_bsd, v_bsd, mask.key_mask_bs, theta=theta, head_dim=head_dim,
                    radius=mask.window_radius, interpret=interpret)


def _attend_fwd(q_btd, k_bsd, v_bsd, mask, theta, head_dim, interpret):
    out = _attend(q_btd, k_bsd, v_bsd, mask, theta, head_dim, interpret)
    return out, (q_btd, k_bsd, v_bsd, mask)


def _attend_bwd(theta, head_dim, interpret, saved, g_btd):
    q_btd, k_bsd, v_bsd, mask = saved
    _, pullback = jax.vjp(lambda q, k, v: reference(q, k, v, mask, theta, head_dim),
                          q_btd, k_bsd, v_bsd)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0)
                         if not jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros_like(x),
                         mask)
    return (*pullback(g_btd), zeros)


_attend.defvjp(_attend_fwd, _attend_bwd)


def holds(s: int, d: int, dtype) -> bool:
    """Whether a row of `s` keys of `d` lanes in `dtype` fits the kernel's VMEM."""
    return s * d * jnp.dtype(dtype).itemsize <= MAX_ROW_BYTES


def rope_attention(q_btd, k_bsd, v_bsd, mask: MaskSpec, theta: float, head_dim: int, *,
                   interpret: bool):
    """The kernel (see the module docstring). Positions are the encoder's: keys 0..s-1,
    queries the last t of them (`mask.q_pos_t`, `mask.k_pos_s` are not read); any key mask.
    Rows must fit (`holds`)."""
    return _attend(q_btd, k_bsd, v_bsd, mask, float(theta), head_dim, interpret)
