"""Attention kernels by name: the one place that decides how attention is computed.

Every kernel computes the same function, ModernBERT's masked attention (docs/model.md): key j
is visible to query i when `mask.key_mask_bs[:, j]` and, in a local layer
(`mask.window_radius` not None), `|q_pos_t[i] - k_pos_s[j]| <= window_radius`. Positions are
indices in the row (0..s-1, queries the last t of them), whatever the mask: padding on either
side or holes inside keep every token at its index, as `transformers`' ModernBERT does (its
position ids are arange(s)). Scale 1/sqrt(e); logits, softmax and accumulation in float32; the
output has q's dtype. The stages move left-padded rows to right padding first
(`ops.right_padded`: RoPE and the window see only distances). Every kernel but cudnn then
takes any 0/1 mask; cudnn, which takes padding as lengths, writes NaN for a row with a hole,
never a silently different value. tests/test_masks.py holds every kernel to "xla" for every
kind of mask.

A query that sees no key (only padding queries can: a real token sees itself) gets a finite
output, never NaN, which differs between kernels and is never read (pooling drops it).

One registry, `KERNELS`, of `Kernel` descriptions, each declaring its operand layout (heads
apart and rotated, or side by side and not yet rotated: `rotates`), whether the layer around
it runs as `fused_layer`'s kernels (`fuses_layer`), and whether it is a Mosaic call run per
device (`per_device`). `Plan` is the decision for one model on one mesh, made once at load
(`plan`): the kernel, the platform the program is compiled for and the mesh its per-device
kernels split over; the encoder keeps it and passes it down. Nothing here reads the trace.

Kernels:
  xla         `jax.nn.dot_product_attention` with the full mask; block-local for long local
              layers. The reference.
  head_major  the same computation laid out (b, h, s, e) for XLA:CPU: the CPU choice of "auto"
              (scripts/benchmark.py).
  cudnn       cuDNN flash attention (NVIDIA GPU, bfloat16/float16): padding as lengths.
  splash      Pallas splash attention: Mosaic on TPUs, interpret mode elsewhere; per device.
  rope_fused  our Pallas kernel with RoPE inside (`rope_attention.py`) on q, k, v as the
              projections write them, with the layer's norms, projections and MLP as
              `fused_layer`'s kernels: the TPU choice of "auto". Per device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from . import ops, rope_attention, sharding
from .ops import MASKED_LOGIT, MaskSpec
from .sharding import DATA, MODEL, split_on
from .validation import UserError


@dataclasses.dataclass(frozen=True)
class Rope:
    """A layer's RoPE, for kernels that rotate q and k themselves: base and head width."""
    theta: float
    head_dim: int


# A kernel's function: (q, k, v, mask, rope, interpret) -> o. q, k, v are (b, s, h, e) rotated,
# or (b, s, h * e) not yet rotated for a kernel that `rotates`; `interpret`: Pallas kernels
# run interpreted (the program is not compiled for TPUs).
Attend = Callable[..., jax.Array]


# --- the reference ------------------------------------------------------------------------
def dense_attention(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
    """`jax.nn.dot_product_attention` with the full boolean (b, 1, t, s) mask."""
    return jax.nn.dot_product_attention(q_bthe, k_bshe, v_bshe, mask=ops.attention_mask(mask))


# --- block-local attention: local layers over long sequences ------------------------------
def _key_windows(x, axis: int, block: int, n: int):
    """Sequence axis `axis` (length s <= n * block) -> (.., n, 3 * block, ..): window m holds
    key blocks m - 1, m, m + 1, zero (False) beyond both ends."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (block, (n + 1) * block - x.shape[axis])
    x = jnp.pad(x, widths).reshape(*x.shape[:axis], n + 2, block, *x.shape[axis + 1:])
    take = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
    return jnp.concatenate([take(0, n), take(1, n + 1), take(2, n + 2)], axis=axis + 1)


def _query_blocks(x, axis: int, block: int, n: int):
    """Query axis `axis` (length s) -> (.., n, block, ..), zero padded at the end."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n * block - x.shape[axis])
    x = jnp.pad(x, widths)
    return x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:])


def _window_mask(key_mask_ws, block: int) -> MaskSpec:
    """The mask within 3-block windows: queries at block..2*block-1, keys at 0..3*block-1,
    radius `block`."""
    return MaskSpec(key_mask_ws, jnp.arange(block) + block, jnp.arange(3 * block), block)


def local_block_attention(q_bshe, k_bshe, v_bshe, key_mask_bs, window_radius: int,
                          attend: Attend = dense_attention) -> jax.Array:
    """Local self-attention computing only what the window can reach: queries go in blocks
    of `window_radius`, each attending to its own and the two neighbouring key blocks
    (3 * radius keys, not s) through `attend`. Same result as the dense masked path up to
    summation order: a query that sees no key (padding far from text) averages every value
    of its row, as a uniform softmax over finite negatives does there."""
    b, s, h, e = q_bshe.shape
    block, n = window_radius, -(-s // window_radius)
    q_blocks = _query_blocks(q_bshe, 1, block, n).reshape(b * n, block, h, e)
    k_blocks, v_blocks = (_key_windows(x, 1, block, n).reshape(b * n, 3 * block, h, e)
                          for x in (k_bshe, v_bshe))
    key_mask_ws = _key_windows(key_mask_bs.astype(bool), 1, block, n).reshape(b * n, 3 * block)
    window = _window_mask(key_mask_ws, block)
    out = attend(q_blocks, k_blocks, v_blocks, window)
    out_bshe = out.reshape(b, n * block, h, e)[:, :s]
    sees_any_bs = (key_mask_ws[:, None, :] & window.window_ts()[None]).any(axis=-1).reshape(
        b, n * block)[:, :s]
    v_mean_bhe = v_bshe.astype(jnp.float32).mean(axis=1).astype(out_bshe.dtype)
    return jnp.where(sees_any_bs[:, :, None, None], out_bshe, v_mean_bhe[:, None])


def uses_blocks(mask: MaskSpec) -> bool:
    """Block-local pays off for a local layer whose queries are all the keys and whose
    sequence is longer than 3 windows (below that a window spans the whole row)."""
    s = mask.k_pos_s.shape[0]
    return mask.window_radius is not None and mask.offset == 0 and s > 3 * mask.window_radius


def blocked_local(attend):
    """`attend`, with long local self-attention done block by block (`local_block_attention`)."""
    def kernel(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
        if uses_blocks(mask):
            return local_block_attention(q_bthe, k_bshe, v_bshe, mask.key_mask_bs,
                                         mask.window_radius, attend)
        return attend(q_bthe, k_bshe, v_bshe, mask)
    return kernel


# "xla": the reference, block by block in long local layers.
xla = blocked_local(dense_attention)


# --- head_major: XLA:CPU ------------------------------------------------------------------
def _head_major(x_bshe):
    """(b, s, h, e) <-> (b, h, s, e)."""
    return jnp.swapaxes(x_bshe, 1, 2)


def _softmax_attend(q_xte, k_xse, v_xse, mask_xts) -> jax.Array:
    """Masked softmax attention over any leading dims `x` (the mask broadcasts to them), in
    the order that is cheapest on XLA:CPU: q is scaled before the logits matmul (t*e
    multiplies, not t*s) and the softmax denominator divides after the value matmul (t*e
    divides, not t*s). Matmul inputs keep their dtype, products accumulate in float32;
    returns float32."""
    scale = jnp.asarray(1.0 / np.sqrt(q_xte.shape[-1]), q_xte.dtype)
    logits_xts = jnp.einsum("...te,...se->...ts", q_xte * scale, k_xse,
                            preferred_element_type=jnp.float32)
    logits_xts = jnp.where(mask_xts, logits_xts, MASKED_LOGIT)
    weights_xts = jnp.exp(logits_xts - logits_xts.max(axis=-1, keepdims=True))
    o_xte = jnp.einsum("...ts,...se->...te", weights_xts.astype(v_xse.dtype), v_xse,
                       preferred_element_type=jnp.float32)
    return o_xte / weights_xts.sum(axis=-1)[..., None]


def head_major_dense(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
    """Dense attention on (b, h, t, e) operands. A query that sees nothing averages every
    value of its row, as the reference does."""
    mask_b1ts = ops.attention_mask(mask)
    o_bhte = _softmax_attend(_head_major(q_bthe), _head_major(k_bshe), _head_major(v_bshe),
                             mask_b1ts)
    return _head_major(o_bhte).astype(q_bthe.dtype)


def head_major_local(q_bshe, k_bshe, v_bshe, key_mask_bs, window_radius: int) -> jax.Array:
    """Block-local self-attention done head-major: one transpose to (b, h, s, e), windows cut
    along s, (block, 3 * block) logits per (b, h, n). Unlike `local_block_attention` it
    does not patch queries that see no key: they average their window's values (zero fill
    included), which saves a pass over the output and is never read."""
    b, s, h, e = q_bshe.shape
    block, n = window_radius, -(-s // window_radius)
    q_bhnqe = _query_blocks(_head_major(q_bshe), 2, block, n)
    k_bhnke, v_bhnke = (_key_windows(_head_major(x), 2, block, n) for x in (k_bshe, v_bshe))
    key_mask_bnk = _key_windows(key_mask_bs.astype(bool), 1, block, n)
    mask_b1nqk = (key_mask_bnk[:, :, None, :]
                  & _window_mask(key_mask_bnk, block).window_ts())[:, None]
    o_bhnqe = _softmax_attend(q_bhnqe, k_bhnke, v_bhnke, mask_b1nqk)
    return _head_major(o_bhnqe.reshape(b, h, n * block, e)[:, :, :s]).astype(q_bshe.dtype)


def head_major(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
    """The CPU kernel: `head_major_local` where blocks pay off, else `head_major_dense`."""
    if uses_blocks(mask):
        return head_major_local(q_bthe, k_bshe, v_bshe, mask.key_mask_bs, mask.window_radius)
    return head_major_dense(q_bthe, k_bshe, v_bshe, mask)


# --- cudnn: NVIDIA GPUs -------------------------------------------------------------------
HALF_DTYPES = ("bfloat16", "float16")


def cudnn_arguments(mask: MaskSpec) -> tuple[jax.Array, dict]:
    """(expressed_b, arguments): what makes `jax.nn.dot_product_attention`'s cuDNN path (and,
    identically, its XLA path: how this is tested on CPU) compute our semantics.

    cuDNN takes padding as lengths: each row's keys as one run from key 0. The stages give it
    that for padding on either side (`ops.right_padded`); `expressed_b` is False for a row
    it cannot express (a hole inside a text).

    - `key_value_seq_lengths` = the run's length; `query_seq_lengths` = its queries: the last
      t keys, so max(kv_len - (s - t), 0). cuDNN writes 0 past a length.
    - The local window as a static (1, 1, t, s) boolean mask (cuDNN adds it as a bias):
      `local_window_size` is left-only without `is_causal`, and a query-broadcast (b, 1, 1, s)
      mask fails its bias shape check; padding stays in the lengths, so the mask is the same
      for every row. Local layers take this dense-with-mask path rather than blocks, whose
      windows have padding on both sides, which lengths cannot express."""
    kept_bs = mask.key_mask_bs.astype(bool)
    kv_len_b = kept_bs.sum(axis=-1, dtype=jnp.int32)
    expressed_b = (kept_bs == (jnp.arange(kept_bs.shape[1])[None, :] < kv_len_b[:, None])).all(-1)
    arguments = dict(query_seq_lengths=jnp.maximum(kv_len_b - mask.offset, 0),
                     key_value_seq_lengths=kv_len_b)
    window_ts = mask.window_ts()
    if window_ts is not None:
        arguments["mask"] = window_ts[None, None]
    return expressed_b, arguments


def cudnn(q_bthe, k_bshe, v_bshe, mask: MaskSpec, rope=None, interpret=False, *,
          implementation: str = "cudnn"):
    """cuDNN flash attention. A row whose mask lengths cannot express (a hole inside a text)
    comes out NaN, never a silently different value; the model never sends one here
    (`Kernel.holes`: `CdeModel.array_batch` runs such a batch on "xla"). bfloat16/float16
    only: cuDNN has no float32 kernel, and a silent downcast would hide a precision change,
    so float32 raises.
    `implementation="xla"` runs the same arguments through JAX's XLA path (tests)."""
    if implementation == "cudnn" and q_bthe.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"cudnn attention computes in bfloat16 or float16, not {q_bthe.dtype}")
    expressed_b, arguments = cudnn_arguments(mask)
    o_bthe = jax.nn.dot_product_attention(q_bthe, k_bshe, v_bshe, implementation=implementation,
                                          **arguments)
    return jnp.where(expressed_b[:, None, None, None], o_bthe, jnp.nan).astype(o_bthe.dtype)


def is_nvidia(device) -> bool:
    """A CUDA GPU, attached (platform version "cuda ...") or compile-only (a topology's
    device: the version says "PJRT C API", the kind names NVIDIA)."""
    return device.platform == "gpu" and (
        "cuda" in device.client.platform_version.lower()
        or device.device_kind.lower().startswith("nvidia"))


@functools.cache
def cudnn_problem() -> str | None:
    """Why JAX's cuDNN attention cannot be built here (no cuDNN, or one too old), None when
    it can: a small bfloat16 call traced through the public API, which checks both."""
    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(functools.partial(jax.nn.dot_product_attention,
                                         implementation="cudnn"), x, x, x)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def cudnn_supported(device) -> bool:
    """An NVIDIA GPU with compute capability >= 8.0 (Ampere, the minimum of JAX's cuDNN
    attention) where that attention can be built (`cudnn_problem`)."""
    if not is_nvidia(device):
        return False
    capability = tuple(int(x) for x in str(device.compute_capability).split("."))
    return capability >= (8, 0) and cudnn_problem() is None


# --- splash: TPUs (Pallas) ----------------------------------------------------------------
SPLASH_TILE = 128  # splash tiles both sequence axes in multiples of 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.cache
def _splash_kernel(h: int, t_pad: int, s_pad: int, offset: int, window_radius: int | None,
                   interpret: bool):
    """The splash kernel for one batch row, built once per static configuration.

    The static mask lives in index space: query i stands at key i + offset (offset = s - t).
    `LocalMask` with window (r, r) keeps |i + offset - j| <= r; `FullMask` keeps all.
    Padding is in the segment ids, not here, so one kernel serves every batch. Tiles: the
    largest of 512/256/128 dividing each padded length, for both passes (training runs the
    backward kernels too). q, k and v are read sequence-minor: head_dim (64) minor would pad
    to 128 lanes in TPU memory, doubling their traffic; XLA writes them in that layout
    directly, so no transpose runs around the kernel."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

    shape = (t_pad, s_pad)
    seq_minor = splash_lib.QKVLayout.SEQ_MINOR
    head_mask = (splash_lib.FullMask(shape) if window_radius is None else
                 splash_lib.LocalMask(shape, (window_radius, window_radius), offset))
    bq, bkv = (next(b for b in (512, 256, 128) if n % b == 0) for n in shape)
    blocks = splash_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                   block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                   block_q_dq=bq, block_kv_dq=bkv,
                                   q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor)
    # The kernel keeps its block tables as arrays; built inside a `jit` trace they would be
    # tracers that this cache leaks into later traces. Make them concrete constants.
    with jax.ensure_compile_time_eval():
        return splash_lib.make_splash_mha(splash_lib.MultiHeadMask([head_mask] * h),
                                          block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                          interpret=interpret)


def splash(q_bthe, k_bshe, v_bshe, mask: MaskSpec, rope=None, interpret: bool = False):
    """Splash attention vmapped over the batch: the Mosaic kernel, or the same kernel
    interpreted (`interpret`: programs not compiled for TPUs, and tests on CPU). Any key
    mask: padding and holes are segment ids.

    The kernel does not scale logits, so q is scaled first. Both sequence axes are padded
    to multiples of 128 (padded query rows are dropped). Padding: every query in segment 1,
    real keys in 1, padding keys in 0. t < s: the static mask's offset s - t places the
    queries on the last t keys."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

    b, t, h, e = q_bthe.shape
    s = k_bshe.shape[1]
    t_pad, s_pad = _round_up(t, SPLASH_TILE), _round_up(s, SPLASH_TILE)
    kernel = _splash_kernel(h, t_pad, s_pad, mask.offset, mask.window_radius,
                            interpret)

    def kernel_layout(x_bshe, padded):  # (b, s, h, e) -> (b, h, padded, e)
        return _head_major(jnp.pad(x_bshe, ((0, 0), (0, padded - x_bshe.shape[1]), (0, 0),
                                            (0, 0))))

    segment_ids = splash_lib.SegmentIds(
        q=jnp.ones((b, t_pad), jnp.int32),
        kv=jnp.pad(mask.key_mask_bs.astype(jnp.int32), ((0, 0), (0, s_pad - s))))
    q_scaled_bthe = q_bthe * jnp.asarray(1.0 / np.sqrt(e), q_bthe.dtype)
    o_bhte = jax.vmap(kernel)(kernel_layout(q_scaled_bthe, t_pad), kernel_layout(k_bshe, s_pad),
                              kernel_layout(v_bshe, s_pad), segment_ids)
    return _head_major(o_bhte[:, :, :t]).astype(q_bthe.dtype)



# --- rope_fused: TPUs (Pallas, ours) ------------------------------------------------------
def _heads_apart(x_bsd, head_dim: int):
    return x_bsd.reshape(*x_bsd.shape[:2], -1, head_dim)


def rotated_splash(q_btd, k_bsd, v_bsd, mask: MaskSpec, rope: Rope, interpret: bool):
    """rope_fused's function by other means: q and k rotated by XLA at the mask's positions,
    heads split, splash. For rows longer than its VMEM holds."""
    cos_te, sin_te = ops.rope_cos_sin(mask.q_pos_t, rope.head_dim, rope.theta)
    cos_se, sin_se = ops.rope_cos_sin(mask.k_pos_s, rope.head_dim, rope.theta)
    q_bthe = ops.apply_rope(_heads_apart(q_btd, rope.head_dim), cos_te, sin_te)
    k_bshe = ops.apply_rope(_heads_apart(k_bsd, rope.head_dim), cos_se, sin_se)
    o_bthe = splash(q_bthe, k_bshe, _heads_apart(v_bsd, rope.head_dim), mask, rope, interpret)
    return o_bthe.reshape(q_btd.shape)


def rope_fused(q_btd, k_bsd, v_bsd, mask: MaskSpec, rope: Rope, interpret: bool):
    """`rope_attention.rope_attention` (any key mask) on (b, s, d) operands whose q and k are
    not rotated yet. Rows of keys over its VMEM (`rope_attention.holds`: float32 rows of the
    second stage) run `rotated_splash`, the same function, decided from the shapes."""
    if not rope_attention.holds(k_bsd.shape[1], k_bsd.shape[2], k_bsd.dtype):
        return rotated_splash(q_btd, k_bsd, v_bsd, mask, rope, interpret)
    return rope_attention.rope_attention(q_btd, k_bsd, v_bsd, mask, rope.theta, rope.head_dim,
                                         interpret=interpret)


# --- the registry -------------------------------------------------------------------------
def plain(fn) -> Attend:
    """A kernel of (q, k, v, mask) (rotated q and k, any 0/1 key mask) as the registry calls
    kernels: the form `register` takes from outside the package."""
    return lambda q, k, v, mask, rope, interpret: fn(q, k, v, mask)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One attention kernel and what it declares to the encoder."""
    name: str
    attend: Attend
    rotates: bool = False      # reads (b, s, h * e) q, k, v not yet rotated (RoPE inside)
    fuses_layer: bool = False  # the layer around it runs as `fused_layer`'s kernels
    per_device: bool = False   # a Mosaic call XLA cannot partition: run per device
    holes: bool = True         # takes a key mask with a hole inside a text (cudnn: lengths)


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("xla", plain(xla)),
    Kernel("head_major", plain(head_major)),
    Kernel("cudnn", cudnn, holes=False),
    Kernel("splash", splash, per_device=True),
    Kernel("rope_fused", rope_fused, rotates=True, fuses_layer=True, per_device=True),
)}

# What "auto" prefers per `jax.Device.platform` and compute dtype; `resolve` falls back to
# "xla" where the preferred kernel cannot run (cuDNN missing or too old). On TPUs float32
# rows of the second stage exceed what rope_fused holds in VMEM: splash there.
AUTO = {("cpu", "half"): "head_major", ("cpu", "float32"): "head_major",
        ("gpu", "half"): "cudnn", ("gpu", "float32"): "xla",
        ("tpu", "half"): "rope_fused", ("tpu", "float32"): "splash"}
# What may run on each platform: the candidates a tuner times against "xla".
CANDIDATES = {"cpu": ("xla", "head_major"), "gpu": ("xla", "cudnn"),
              "tpu": ("xla", "splash", "rope_fused")}


def names() -> tuple[str, ...]:
    return ("auto", *KERNELS)


def candidates(platform: str) -> tuple[str, ...]:
    """The kernels worth trying on `platform` ("cpu", "gpu", "tpu"), "xla" first."""
    return CANDIDATES.get(platform, ("xla",))


BUILT_IN = frozenset(names())


def register(name: str, kernel: Kernel) -> None:
    """Adds a kernel of the `Kernel` signature under a new `name` (`tuning.register` also
    makes it a candidate of "auto")."""
    if name in names():
        raise UserError(f"attention {name!r} is registered already")
    KERNELS[name] = kernel


def unregister(name: str) -> None:
    """Removes a kernel added by `register`; the built-in ones stay."""
    if name in BUILT_IN or name not in KERNELS:
        raise UserError(f"attention {name!r} was not added by register")
    del KERNELS[name]


def check(name: str) -> str:
    if name not in names():
        raise UserError(f"unknown attention {name!r}: choose one of {', '.join(names())}")
    return name


def unsupported(name: str, device, dtype: str) -> str | None:
    """Why kernel `name` cannot run on `device` with compute `dtype` (None: it can)."""
    if name == "cudnn":
        if not is_nvidia(device):
            return (f"attention 'cudnn' needs an NVIDIA GPU; this device is "
                    f"{device.platform} ({device.device_kind}): use 'auto' or 'xla'")
        if not cudnn_supported(device):
            return (f"attention 'cudnn' needs JAX's cuDNN attention and compute capability "
                    f">= 8.0 (compute capability {device.compute_capability}; cuDNN: "
                    f"{cudnn_problem() or 'found'})")
        if dtype not in HALF_DTYPES:
            return (f"attention 'cudnn' computes in bfloat16 or float16 only, not {dtype}: "
                    "load with dtype='bfloat16'")
    return None


def resolve(name: str, device=None, dtype: str = "float32") -> str:
    """A kernel name from `KERNELS` for `device` (default: JAX's first device) and compute
    `dtype`: "auto" becomes the best kernel that runs there; a named kernel that cannot
    run there is a UserError saying why."""
    device = device if device is not None else jax.devices()[0]
    if check(name) == "auto":
        width = "half" if dtype in HALF_DTYPES else "float32"
        preferred = AUTO.get((device.platform, width), "xla")
        return "xla" if unsupported(preferred, device, dtype) else preferred
    problem = unsupported(name, device, dtype)
    if problem:
        raise UserError(problem)
    return name


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one model computes attention, decided once (`plan`) and passed down: the kernel,
    the platform the program is compiled for, the mesh the per-device kernels split over
    (None: whole) and how Pallas kernels are interpreted (`interpret_as`: None, interpreted
    off TPUs; or a `pltpu.InterpretParams`, JAX's TPU interpret mode, for tests). Hashable,
    so models with equal plans have equal graphdefs and share compiled programs
    (`runner.stage_functions`)."""
    kernel: str = "xla"
    platform: str = "cpu"
    mesh: Mesh | None = None
    interpret_as: Any = None

    @property
    def spec(self) -> Kernel:
        return KERNELS[self.kernel]

    @property
    def interpret(self):
        """What Pallas calls take as `interpret`."""
        return self.platform != "tpu" if self.interpret_as is None else self.interpret_as

    @property
    def fuses_layer(self) -> bool:
        """Whether layers run `fused_layer`'s kernels: the kernel says so, and the mesh does
        not split the model axis (split heads and MLP units would need an all-reduce inside
        the second kernel, before its residual; XLA's path partitions the matmuls itself)."""
        return self.spec.fuses_layer and sharding.device_axes(self.mesh).get(MODEL, 1) == 1

    def attend(self, q, k, v, mask: MaskSpec, rope: Rope) -> jax.Array:
        """The kernel on (b, t, h, e) rotated operands, or (b, t, h * e) unrotated for a
        kernel that `rotates`; per device where it must be (rows split on "data", heads
        on "model" where they divide)."""
        kernel = self.spec
        fn = functools.partial(kernel.attend, rope=rope, interpret=self.interpret)
        if not kernel.per_device:
            return fn(q, k, v, mask)
        heads_of = (lambda x: x.shape[2] // rope.head_dim) if kernel.rotates else (
            lambda x: x.shape[2])

        def specs(axes, q, k, v, mask):
            rows, heads = split_on(axes, DATA, q.shape[0]), split_on(axes, MODEL, heads_of(q))
            x = P(rows, None, heads) if kernel.rotates else P(rows, None, heads, None)
            return x, x, x, MaskSpec(P(rows, None), P(), P(), mask.window_radius)

        out = lambda axes, *operands: specs(axes, *operands)[0]  # noqa: E731
        return sharding.per_device(fn, self.mesh, specs, out)(q, k, v, mask)


def plan(name: str, *, mesh: Mesh | None = None, dtype: str = "float32") -> Plan:
    """The `Plan` for attention `name` on `mesh`'s devices (None: JAX's first device, no
    mesh) with compute `dtype`: "auto" resolved there (`resolve`), a kernel that cannot run
    there a UserError."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    kernel = resolve(name, device, dtype)
    return Plan(kernel, device.platform, mesh if sharding.device_axes(mesh) else None)
