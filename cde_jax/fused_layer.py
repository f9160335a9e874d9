"""The rest of a ModernBERT layer around `rope_fused`, as two Pallas TPU kernels.

    norm_qkv(h_bsd, norm_scale_d | None, wqkv_dk3, ...) -> q_bsd, k_bsd, v_bsd
    out_mlp(o_btd, h_btd, wo_kd, norm_scale_d, wi_d2f, wo_fd, ...) -> h_btd

Why. With rope_fused, what a layer still moves through HBM is a chain of 768-wide ops, each
reading and writing its operands: the attention norm and the q/k/v projections, then the
output projection, the residual sum, the MLP norm, the MLP's (2 x 1152)-wide intermediate,
its GeGLU and the second residual sum: ~270 FLOP per byte, compute-bound on v4, v5e and v5p
but not on v6e, whose ridge is 560 (docs/performance.md). These two kernels keep all of that
in VMEM: the first reads the residual once and writes q, k and v as rope_fused reads them;
the second reads the attention output and the residual and writes the next residual.

Inside (Mosaic on TPUs, interpret mode elsewhere: the `attention.Plan` says which): the tokens of
every row, flattened, in blocks of `TOKEN_BLOCK`; the weights whole in VMEM, fetched at the
first step and single-buffered. The arithmetic is the XLA path's (`encoder.py`), op for op:
the norms in float32 (two-pass variance), matmul inputs in the compute dtype with float32
accumulation, each result rounded to the activation dtype where the XLA path rounds it. It
is written once (`_qkv`, `_out_mlp`) and read both by the kernels, on VMEM blocks, and by
the backward pass, on whole arrays: the gradients are autodiff of the same function in plain
JAX.

When: the encoder uses them for layers that `supports` (no biases, weights that fit VMEM:
ModernBERT base and cde-small-v2) where its `attention.Plan` fuses the layer (rope_fused, on a
mesh that does not split the model axis). Per device over the plan's mesh, as Mosaic calls
cannot be partitioned by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from . import ops, sharding

TOKEN_BLOCK = 256  # tokens per grid step: (256, 2 x 1152) float32 MLP temporaries, ~2.4 MB
# The kernels' names, which the compiled program's Mosaic calls carry (`aot` counts them).
NORM_QKV, OUT_MLP = "fused_norm_qkv", "fused_out_mlp"
KERNELS = (NORM_QKV, OUT_MLP)
# `fused_out_mlp`'s weights (attention out, MLP in and out, in the compute dtype) sit whole in
# VMEM beside its 256-token blocks: compiled for v4 and v5e (16 MiB of scoped VMEM), 7.9 MiB
# fits (ModernBERT-base: 6.2 MiB) and 10.1 MiB fails. Larger layers run XLA's path.
MAX_WEIGHT_BYTES = 8 * 2 ** 20


def supports(cfg) -> bool:
    """Whether a layer of `cfg` (a `ModernBertConfig`) can run the kernels: no biases
    (ModernBERT base and cde-small-v2 have none) and weights that fit `MAX_WEIGHT_BYTES`."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    fits = (d * d + 3 * d * f) * cfg.jnp_dtype.itemsize <= MAX_WEIGHT_BYTES
    return fits and not (cfg.attention_bias or cfg.mlp_bias or cfg.norm_bias)


def _layer_norm(h_rd, scale_1d, eps: float):
    """float32, as `encoder.layer_norm` computes it (two-pass variance, no bias)."""
    centred_rd = h_rd - h_rd.mean(axis=-1, keepdims=True)
    var_r1 = (centred_rd * centred_rd).mean(axis=-1, keepdims=True)
    return centred_rd * (jax.lax.rsqrt(var_r1 + eps) * scale_1d)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """What the XLA path's ops round to: the norms' epsilon, the matmul input (compute) dtype
    and the activation dtype between ops (`ModernBertConfig.jnp_dtype`,
    `jnp_activation_dtype`)."""
    eps: float
    compute: jnp.dtype
    activation: jnp.dtype

    def matmul(self, x, w):
        return jnp.dot(x.astype(self.compute), w,
                       preferred_element_type=jnp.float32).astype(self.activation)


def _qkv(h_rd, scale_1d, wqkv_dk, *, numerics: Numerics, norm: bool):
    """Attention norm (layer 0 has none) and the q, k, v projections, each in the compute
    dtype. Operands are arrays or Pallas refs, indexed, never read whole: a slice of a ref
    loads only that slice."""
    x_rd = h_rd[...].astype(jnp.float32)
    if norm:
        x_rd = _layer_norm(x_rd, scale_1d[...], numerics.eps)
    k = wqkv_dk.shape[1] // 3
    return tuple(numerics.matmul(x_rd, wqkv_dk[:, i * k:(i + 1) * k]).astype(numerics.compute)
                 for i in range(3))


def _out_mlp(o_rk, h_rd, wo_kd, scale_1d, wi_df, wo_fd, *, numerics: Numerics):
    """Output projection, residual, MLP norm, GeGLU MLP (`wi_df`: up and gate side by
    side), residual: the next residual, in the activation dtype."""
    f, activation = wo_fd.shape[0], numerics.activation
    attended_rd = numerics.matmul(o_rk[...], wo_kd[...]).astype(jnp.float32)
    h_rd = (h_rd[...].astype(jnp.float32) + attended_rd).astype(activation).astype(jnp.float32)
    x_rd = _layer_norm(h_rd, scale_1d[...], numerics.eps)
    up_rf, gate_rf = (numerics.matmul(x_rd, wi_df[:, i * f:(i + 1) * f]).astype(jnp.float32)
                      for i in range(2))
    # `encoder.Mlp`'s exact GELU, spelled with erf: jax.nn.gelu's erfc has no Mosaic lowering.
    act_rf = 0.5 * up_rf * (1.0 + jax.lax.erf(up_rf * (1.0 / math.sqrt(2.0)))) * gate_rf
    out_rd = numerics.matmul(act_rf, wo_fd[...]).astype(jnp.float32)
    return (h_rd + out_rd).astype(activation)


def _kernel_call(name: str, math_fn, n_tokens: int, out_widths, out_dtype, flops: int,
                 interpret: bool):
    """A function of (tokens..., weights...) that runs `math_fn` as one Pallas call: the
    first `n_tokens` operands ((r, width) arrays) in blocks of `TOKEN_BLOCK` rows, the
    weights whole in VMEM. XLA's cost analysis counts the call's FLOPs from its
    `CostEstimate`; its bytes are counted by `aot` from the operands (0 here)."""
    def call(*operands):
        r = operands[0].shape[0]
        block = min(TOKEN_BLOCK, r)
        tokens, weights = operands[:n_tokens], operands[n_tokens:]
        resident = (sum(w.size * w.dtype.itemsize for w in weights)  # single-buffered
                    + 2 * block * (sum(x.shape[1] * x.dtype.itemsize for x in tokens)
                                   + sum(out_widths) * jnp.dtype(out_dtype).itemsize)
                    # float32 temporaries: a block's rows of every weight's outputs
                    + 4 * block * sum(w.shape[-1] for w in weights))
        rows = lambda width: pl.BlockSpec((block, width), lambda i: (i, 0))  # noqa: E731
        whole = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim,  # noqa: E731
                                       pipeline_mode=pl.Buffered(1))

        def kernel(*refs):
            outs = math_fn(*refs[:len(operands)])
            for ref, out in zip(refs[len(operands):], jax.tree.leaves(outs)):
                ref[...] = out

        outs = pl.pallas_call(
            kernel, name=name, grid=(pl.cdiv(r, block),),
            in_specs=[rows(x.shape[1]) for x in operands[:n_tokens]]
            + [whole(w) for w in operands[n_tokens:]],
            out_specs=[rows(w) for w in out_widths],
            out_shape=[jax.ShapeDtypeStruct((r, w), out_dtype) for w in out_widths],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel",),
                vmem_limit_bytes=ops.vmem_limit_bytes(resident)),
            cost_estimate=pl.CostEstimate(flops=flops * r, transcendentals=0, bytes_accessed=0),
            interpret=interpret,
        )(*operands)
        return tuple(outs) if len(outs) > 1 else outs[0]  # as `math_fn` returns them
    return call


def _differentiable(forward, math_fn):
    """`forward` (the kernel) with the gradients of `math_fn` (the same function in JAX)."""
    fn = jax.custom_vjp(forward)
    fn.defvjp(lambda *args: (forward(*args), args),
              lambda args, g: jax.vjp(math_fn, *args)[1](g))
    return fn


def _per_device(fn, n_tokens: int, mesh):
    """`fn` on each device's rows of `mesh` (`sharding.per_device`): token operands
    (b, s, x) split on "data" where it divides b, weights whole."""
    def rows(axes, *operands):
        return P(sharding.split_on(axes, sharding.DATA, operands[0].shape[0]), None, None)

    def specs(axes, *operands):
        return (rows(axes, *operands),) * n_tokens + (P(),) * (len(operands) - n_tokens)

    return lambda *operands: sharding.per_device(fn, mesh, specs, rows)(*operands)


def _tokens_apart(fn, n_tokens: int):
    """`fn` on (r, x) token operands, called with (b, s, x) ones: rows flattened."""
    def run(*operands):
        b, s = operands[0].shape[:2]
        flat = [x.reshape(b * s, x.shape[-1]) for x in operands[:n_tokens]]
        outs = fn(*flat, *operands[n_tokens:])
        return jax.tree.map(lambda y: y.reshape(b, s, y.shape[-1]), outs)
    return run


def _build(name, math_fn, n_tokens, out_widths, out_dtype, flops, plan):
    kernel = _kernel_call(name, math_fn, n_tokens, out_widths, out_dtype, flops,
                          plan.interpret)
    return _per_device(_tokens_apart(_differentiable(kernel, math_fn), n_tokens), n_tokens,
                       plan.mesh)


def norm_qkv(h_bsd, norm_scale_d, wqkv_dk, numerics: Numerics, plan):
    """q, k, v (b, s, k) in the compute dtype, heads side by side as rope_fused reads them,
    from the residual (b, s, d): the attention norm (`norm_scale_d` None: none, layer 0)
    and the projections by `wqkv_dk` ((d, 3k), in the compute dtype). `plan`: the model's
    `attention.Plan` (interpret mode, the mesh)."""
    d, k3 = wqkv_dk.shape
    norm = norm_scale_d is not None
    scale_1d = (norm_scale_d if norm else jnp.ones((d,))).astype(jnp.float32).reshape(1, d)
    math_fn = functools.partial(_qkv, numerics=numerics, norm=norm)
    fn = _build(NORM_QKV, math_fn, 1, [k3 // 3] * 3, numerics.compute, 2 * d * k3, plan)
    return fn(h_bsd, scale_1d, wqkv_dk)


def out_mlp(o_btk, h_btd, wo_kd, norm_scale_d, wi_df, wo_fd, numerics: Numerics, plan):
    """The next residual (b, t, d) in the activation dtype, from the attention output
    (b, t, k) and the residual: see `_out_mlp`. Weights in the compute dtype."""
    k, d = wo_kd.shape
    f = wo_fd.shape[0]
    scale_1d = norm_scale_d.astype(jnp.float32).reshape(1, d)
    math_fn = functools.partial(_out_mlp, numerics=numerics)
    fn = _build(OUT_MLP, math_fn, 2, [d], numerics.activation, 2 * (k * d + 3 * d * f), plan)
    return fn(o_btk, h_btd, wo_kd, scale_1d, wi_df, wo_fd)
