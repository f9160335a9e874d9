"""Attention kernels by name: the one place that decides how attention is computed.

Every kernel computes the same function, ModernBERT's masked attention (docs/model.md):

    kernel(q_bthe, k_bshe, v_bshe, mask: ops.MaskSpec) -> o_bthe

Key j is visible to query i when `mask.key_mask_bs[:, j]` and, in a local layer
(`mask.window_radius` not None), `|q_pos_t[i] - k_pos_s[j]| <= window_radius`. Queries may
be a suffix of the keys (t < s: the second stage's last layer). Scale 1/sqrt(e); logits, softmax
and accumulation in float32; the output has q's dtype. Keys are right-padded and sit at
0..s-1, queries at the last t of them (how the encoder calls attention).

A query that sees no key (only padding queries can: a real token sees itself) gets a finite
output, never NaN. Which finite value differs between kernels and is never read: "xla"
averages the row's values (a uniform softmax, as the reference does), "head_major" the
values of its 3-block window, "cudnn" writes 0, "splash" averages the key tiles it visited.

Kernels:
  xla         `jax.nn.dot_product_attention` with the full mask; block-local for long local
              layers. The reference, and the fallback everywhere.
  head_major  the same computation laid out (b, h, s, e) for XLA:CPU: plain batched GEMMs,
              q scaled before the logits, normalization after the value matmul; block-local
              for long local layers. The CPU choice of "auto" (measured by
              scripts/benchmark.py).
  cudnn       cuDNN flash attention (NVIDIA GPU, bfloat16/float16): padding as sequence
              lengths, the local window as a static (1, 1, t, s) mask.
  splash      Pallas splash attention: the Mosaic kernel when the program is compiled for
              TPUs, interpret mode otherwise (tests on CPU). Run per device (`per_device`):
              Mosaic kernels cannot be partitioned by XLA.
  rope_fused  our Pallas kernel with RoPE inside (`rope_attention.py`): q, k, v read once
              as the projections write them, (b, s, d) with heads side by side and not yet
              rotated, so no pass rotates, pads or transposes them. The TPU choice of "auto"
              (the bytes it saves: docs/performance.md). Mosaic on TPUs, interpret mode
              elsewhere; per device like splash. A kernel of this kind is built per layer
              (`layer_kernel`), since RoPE's base differs between global and local layers.

Kernels learn the devices a program is compiled for from JAX's abstract mesh, which the
stages are traced under (`sharding.traced_on`): `target_platform` (not the host's backend:
a TPU program compiled on a CPU host gets the TPU kernel) and the mesh axes `per_device`
splits over.

`load(path, attention=...)` takes a name from `names()`; "auto" picks per device and dtype
(`resolve`). An unknown name, or a kernel the device or dtype cannot run, is a ValueError.
The encoder asks `layer_kernel` for a layer's kernel and whether it applies RoPE itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from . import ops, rope_attention
from .ops import MASKED_LOGIT, MaskSpec
from .sharding import DATA, MODEL, split_on, traced_free_axes
from .validation import UserError

Kernel = Callable[[jax.Array, jax.Array, jax.Array, MaskSpec], jax.Array]



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
                          attend: Kernel = dense_attention) -> jax.Array:
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


def blocked_local(attend: Kernel) -> Kernel:
    """`attend`, with long local self-attention done block by block (`local_block_attention`)."""
    def kernel(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
        if uses_blocks(mask):
            return local_block_attention(q_bthe, k_bshe, v_bshe, mask.key_mask_bs,
                                         mask.window_radius, attend)
        return attend(q_bthe, k_bshe, v_bshe, mask)
    return kernel


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


def cudnn_arguments(mask: MaskSpec) -> dict:
    """Keyword arguments that make `jax.nn.dot_product_attention` compute our semantics on
    its cuDNN path (and, identically, on its XLA path: how this is tested on CPU).

    - Padding as lengths: `key_value_seq_lengths` = real keys (right padding);
      `query_seq_lengths` = real queries. Queries are the last t keys, so the real ones are
      a prefix of the query axis of length max(kv_len - (s - t), 0): the key length for
      t == s, fewer for the last layer's text queries. cuDNN writes 0 past a length.
    - The local window as a static (1, 1, t, s) boolean mask (cuDNN adds it as a bias).
      cuDNN's `local_window_size` is left-only without `is_causal`, and a query-broadcast
      (b, 1, 1, s) mask fails its bias shape check, so the window has this form; padding
      stays in the lengths, so the mask is the same for every row and never (b, ...).
      Local layers take this dense-with-mask path rather than blocks: block windows have
      padding on both sides (the first window's left fill), which lengths cannot express,
      so blocks would need a per-window (b * n, 1, q, k) mask plus 3x copies of k and v,
      to save only the out-of-window FLOPs (`flops.second_stage_flops`, dense vs windowed).
    """
    kv_len_b = mask.key_mask_bs.astype(bool).sum(axis=-1, dtype=jnp.int32)
    arguments = dict(query_seq_lengths=jnp.maximum(kv_len_b - mask.offset, 0),
                     key_value_seq_lengths=kv_len_b)
    window_ts = mask.window_ts()
    if window_ts is not None:
        arguments["mask"] = window_ts[None, None]
    return arguments


def cudnn(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
    """cuDNN flash attention. bfloat16/float16 only: cuDNN has no float32 kernel, and a
    silent downcast would hide a precision change, so float32 raises."""
    if q_bthe.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"cudnn attention computes in bfloat16 or float16, not {q_bthe.dtype}")
    return jax.nn.dot_product_attention(
        q_bthe, k_bshe, v_bshe, implementation="cudnn", **cudnn_arguments(mask))


def cudnn_version() -> int | None:
    """cuDNN's version as JAX sees it (e.g. 90300), None when JAX has no CUDA build."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_lib
        return int(cudnn_lib.check_cudnn_version())
    except (ImportError, AttributeError, RuntimeError):
        return None


def is_nvidia(device) -> bool:
    """A CUDA GPU, attached (platform version "cuda ...") or compile-only (a topology's
    device: the version says "PJRT C API", the kind names NVIDIA)."""
    return device.platform == "gpu" and (
        "cuda" in device.client.platform_version.lower()
        or device.device_kind.lower().startswith("nvidia"))


def cudnn_supported(device) -> bool:
    """An NVIDIA GPU that JAX's cuDNN flash attention runs on: cuDNN >= 8.9.4 and compute
    capability >= 8.0 (Ampere), the minimum of `jax.nn.dot_product_attention`'s cuDNN path."""
    if not is_nvidia(device):
        return False
    version = cudnn_version()
    capability = tuple(int(x) for x in str(device.compute_capability).split("."))
    return version is not None and version >= 8904 and capability >= (8, 0)


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


def target_platform() -> str:
    """The platform of the devices the program being traced is compiled for: the abstract
    mesh's (the stages are traced under their mesh), else JAX's default backend (a bare
    `jit` with no mesh compiles for the default devices)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def interpret_mode() -> bool:
    """Whether Pallas kernels run interpreted: when the program is not compiled for TPUs
    (`target_platform`), so the same kernels run, and are tested, on CPU."""
    return target_platform() != "tpu"


def per_device(kernel: Kernel, head_dim: int | None = None) -> Kernel:
    """`kernel` run on each device's own rows and heads: `jax.shard_map` over the trace's
    mesh axes that are not manual already (a user's `shard_map` around the stage), rows
    split on "data" and heads on "model" where they divide. For kernels that XLA cannot
    partition (Mosaic custom calls): attention is independent per row and head, so nothing
    crosses devices. Without a mesh (or on one device) it is `kernel` itself. q, k, v are
    (b, s, h, e), or (b, s, d) with heads of `head_dim` side by side."""
    def run(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
        free = traced_free_axes()
        if not free:
            return kernel(q_bthe, k_bshe, v_bshe, mask)
        b, h = q_bthe.shape[0], q_bthe.shape[2] // (head_dim or 1)
        rows, heads = split_on(free, DATA, b), split_on(free, MODEL, h)
        x_spec = P(rows, None, heads) if head_dim else P(rows, None, heads, None)
        mask_spec = MaskSpec(P(rows, None), P(), P(), mask.window_radius)
        return jax.shard_map(kernel, mesh=jax.sharding.get_abstract_mesh(),
                             in_specs=(x_spec, x_spec, x_spec, mask_spec),
                             out_specs=x_spec, axis_names=set(free), check_vma=False)(
            q_bthe, k_bshe, v_bshe, mask)
    return run


def splash(q_bthe, k_bshe, v_bshe, mask: MaskSpec):
    """Splash attention vmapped over the batch: the Mosaic kernel when the program is
    compiled for TPUs (`target_platform`), interpret mode otherwise (so the same code is
    tested on CPU). Per device in the registry (`per_device`).

    The kernel does not scale logits, so q is scaled first. Both sequence axes are padded
    to multiples of 128 (padded query rows are dropped). Padding: every query in segment 1,
    real keys in 1, padding keys in 0. t < s: the static mask's offset s - t places the
    queries on the last t keys."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

    b, t, h, e = q_bthe.shape
    s = k_bshe.shape[1]
    t_pad, s_pad = _round_up(t, SPLASH_TILE), _round_up(s, SPLASH_TILE)
    kernel = _splash_kernel(h, t_pad, s_pad, mask.offset, mask.window_radius,
                            interpret_mode())

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
def rope_fused(theta: float, head_dim: int) -> Kernel:
    """`rope_attention.rope_attention` for one layer's RoPE base, on (b, s, d) operands whose
    q and k are not rotated yet: Mosaic when the program is compiled for TPUs, interpret
    mode otherwise; per device."""
    def kernel(q_btd, k_bsd, v_bsd, mask: MaskSpec):
        return rope_attention.rope_attention(q_btd, k_bsd, v_bsd, mask, theta, head_dim,
                                             interpret=interpret_mode())
    return per_device(kernel, head_dim)


# --- the registry -------------------------------------------------------------------------
KERNELS: dict[str, Kernel] = {
    "xla": blocked_local(dense_attention),
    "head_major": head_major,
    "cudnn": cudnn,
    "splash": per_device(splash),
}
# Kernels that rotate q and k themselves, built per layer: name -> (theta, head_dim) -> Kernel
# on (b, s, d) operands.
ROPE_KERNELS: dict[str, Callable[[float, int], Kernel]] = {"rope_fused": rope_fused}

# What "auto" prefers per `jax.Device.platform`; `resolve` falls back to "xla" where the
# preferred kernel cannot run (cuDNN missing or too old, float32 compute).
AUTO = {"cpu": "head_major", "gpu": "cudnn", "tpu": "rope_fused"}


def names() -> tuple[str, ...]:
    return ("auto", *KERNELS, *ROPE_KERNELS)


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
            return (f"attention 'cudnn' needs cuDNN >= 8.9.4 and compute capability >= 8.0 "
                    f"(found cuDNN {cudnn_version()}, compute capability "
                    f"{device.compute_capability})")
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
        preferred = AUTO.get(device.platform, "xla")
        return "xla" if unsupported(preferred, device, dtype) else preferred
    problem = unsupported(name, device, dtype)
    if problem:
        raise UserError(problem)
    return name


def layer_kernel(name: str, dtype: str, theta: float, head_dim: int) -> tuple[Kernel, bool]:
    """(kernel, rotates): the kernel of `name` for a layer with RoPE base `theta`, and
    whether it applies RoPE itself (then it takes (b, s, d) operands, else rotated
    (b, s, h, e)). "auto" is resolved for JAX's first device and compute `dtype`
    (`resolve`), as `load` resolves it for the mesh's devices."""
    name = resolve(name, dtype=dtype) if name == "auto" else check(name)
    if name in ROPE_KERNELS:
        return ROPE_KERNELS[name](theta, head_dim), True
    return KERNELS[name], False
