"""fused_layer's Pallas kernels (interpret mode on CPU) against the encoder's XLA path, which
composes the same layer from its Flax modules: float32 parity, the half-precision roundings,
token counts that leave a partial block, layer 0 (no attention norm), gradients through the
custom VJP, and the encoder's choice of path by plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from cde_jax import attention, encoder, fused_layer, rope_attention
from cde_jax.config import modernbert_base, modernbert_tiny

PLAN = attention.Plan("rope_fused", "cpu")  # interpret mode, no mesh


def make_layer(index: int, dtype: str, activations: str = "compute") -> encoder.EncoderLayer:
    """A tiny layer with random weights and norm scales far from 1 (a scale the kernel
    dropped or applied twice shows)."""
    cfg = modernbert_tiny(attention="rope_fused", dtype=dtype, activations=activations)
    layer = encoder.EncoderLayer(cfg, index, PLAN, rngs=nnx.Rngs(index + 1))
    rng = np.random.default_rng(index)
    for norm in (layer.attn_norm, layer.mlp_norm):
        if norm is not None:
            norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32)
    return layer


def modules_qkv(layer, h_bsd):
    x_bsd = h_bsd if layer.attn_norm is None else layer.attn_norm(h_bsd)
    return tuple(x.astype(layer.dtype) for x in layer.attn.project_qkv(
        x_bsd, layer.activation_dtype, heads_apart=False))


def modules_out_mlp(layer, h_btd, o_btk):
    act = layer.activation_dtype
    h_btd = (h_btd + layer.attn.project_out(o_btk).astype(act)).astype(act)
    return (h_btd + layer.mlp(layer.mlp_norm(h_btd), act)).astype(act)


def kernels_qkv(layer, h_bsd):
    scale = None if layer.attn_norm is None else layer.attn_norm.scale[...]
    return fused_layer.norm_qkv(h_bsd, scale, layer._weight(layer.attn.wqkv, h_bsd.shape[-1]),
                                layer.numerics, layer.plan)


def kernels_out_mlp(layer, h_btd, o_btk):
    d = h_btd.shape[-1]
    return fused_layer.out_mlp(o_btk, h_btd, layer._weight(layer.attn.wo, o_btk.shape[-1]),
                               layer.mlp_norm.scale[...], layer._weight(layer.mlp.wi, d),
                               layer._weight(layer.mlp.wo, layer.mlp.wo.kernel.shape[0]),
                               layer.numerics, layer.plan)


def inputs(layer, b, s, seed=0):
    rng = np.random.default_rng(seed)
    d = layer.attn.wo.kernel.shape[-1]
    act = layer.activation_dtype
    return (jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32).astype(act),
            jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32).astype(layer.dtype))


def rel_err(got, want) -> float:
    """`max_rel_err` (recorded for the session's parity summary) of float32 copies."""
    return max_rel_err(*(np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, want)))


# (rows, tokens): 600 tokens leave a partial block of 88 after two of 256; 40 fit one block.
SHAPES = [(2, 300), (1, 40)]


@pytest.mark.parametrize("b, s", SHAPES)
@pytest.mark.parametrize("index", [0, 1])
def test_float32_matches_the_modules(b, s, index):
    layer = make_layer(index, "float32")
    h_bsd, o_bsk = inputs(layer, b, s)
    for got, want in zip(kernels_qkv(layer, h_bsd), modules_qkv(layer, h_bsd)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_err(got, want) <= 1e-6
    got, want = kernels_out_mlp(layer, h_bsd, o_bsk), modules_out_mlp(layer, h_bsd, o_bsk)
    assert got.dtype == want.dtype and rel_err(got, want) <= 1e-6


def within_the_modules_rounding(got, want, exact) -> None:
    """`got` (the kernels, half precision) is as close to `exact` (the modules in float32 on
    the same inputs) as `want` (the modules in the same half precision) is: its error is
    bounded by the reference's own bfloat16 error, not by a fixed step."""
    own, err = rel_err(want, exact), rel_err(got, exact)
    print(f"half precision vs float32: kernels {err:.3e}, the modules' own {own:.3e}")
    assert 0 < own < 5e-2
    assert err <= 1.25 * own, (err, own)


@pytest.mark.parametrize("activations", ["compute", "float32"])
def test_half_precision_rounds_where_the_modules_round(activations):
    """bfloat16 compute: the kernels round each matmul's inputs and outputs where the XLA path
    does, so against float32 they err as the XLA path's own bfloat16 does; the dtypes are
    the modules'."""
    layer, exact = make_layer(1, "bfloat16", activations), make_layer(1, "float32")
    h_bsd, o_bsk = inputs(layer, 2, 300, seed=1)
    h32, o32 = (x.astype(jnp.float32) for x in (h_bsd, o_bsk))
    for got, want, ref in zip(kernels_qkv(layer, h_bsd), modules_qkv(layer, h_bsd),
                              modules_qkv(exact, h32)):
        assert got.dtype == want.dtype == jnp.bfloat16
        within_the_modules_rounding(got, want, ref)
    got, want = kernels_out_mlp(layer, h_bsd, o_bsk), modules_out_mlp(layer, h_bsd, o_bsk)
    assert got.dtype == want.dtype == layer.activation_dtype
    within_the_modules_rounding(got, want, modules_out_mlp(exact, h32, o32))


def test_gradients_match_the_modules():
    """Fine-tuning differentiates through the kernels: their custom VJP (autodiff of the same
    arithmetic in JAX) gives the modules' gradients for inputs, weights and norm scales."""
    layer = make_layer(1, "float32")
    h_bsd, o_bsk = inputs(layer, 1, 40, seed=2)
    graphdef, state = nnx.split(layer)

    def loss(forward, state, h_bsd, o_bsk):
        layer = nnx.merge(graphdef, state)
        q, k, v = forward[0](layer, h_bsd)
        out = forward[1](layer, h_bsd + q + k * v, o_bsk)
        return jnp.sum(out * jnp.cos(out))

    grads = [jax.grad(loss, argnums=(1, 2, 3))(forward, state, h_bsd, o_bsk) for forward in
             ((kernels_qkv, kernels_out_mlp), (modules_qkv, modules_out_mlp))]
    got, want = (jax.tree.leaves(g) for g in grads)
    assert len(got) == len(want) > 6
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_the_encoder_fuses_unless_the_model_axis_is_split():
    """The plan decides, once: without a mesh (or with "model" of size 1) a rope_fused layer
    runs the kernels; with `model_parallel` > 1, with biases, or with weights over what VMEM
    holds, the XLA path."""
    assert make_layer(1, "float32").fused
    cfg = modernbert_tiny(attention="rope_fused")
    for shape, fuses in (((2, 1), True), ((1, 2), False)):
        mesh = jax.sharding.AbstractMesh(shape, ("data", "model"))
        plan = attention.Plan("rope_fused", "tpu", mesh)
        assert plan.fuses_layer is fuses and not plan.interpret
        assert encoder.EncoderLayer(cfg, 1, plan, rngs=nnx.Rngs(0)).fused is fuses
    biased = modernbert_tiny(attention="rope_fused", mlp_bias=True)
    assert not encoder.EncoderLayer(biased, 1, PLAN, rngs=nnx.Rngs(0)).fused
    splash = attention.Plan("splash", "cpu")
    assert not encoder.EncoderLayer(cfg, 1, splash, rngs=nnx.Rngs(0)).fused
    base = modernbert_base(attention="rope_fused", dtype="bfloat16")
    assert fused_layer.supports(base)  # 6.2 MiB of weights
    assert not fused_layer.supports(base.replace(intermediate_size=2048))  # 10.1 MiB


# --- base width, in JAX's TPU interpret mode ------------------------------------------------
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan",
                                      num_cores_or_threads=2)


def base_encoder(kernel: str, dtype: str, interpret=None) -> encoder.ModernBert:
    """ModernBERT at base width with two layers, one global and one local (radius 64),
    random weights with q and k scaled up so that attention is peaked (as trained), not
    near-uniform (which would hide a RoPE or mask error)."""
    cfg = modernbert_base(num_hidden_layers=2, global_attn_every_n_layers=2, dtype=dtype)
    plan = attention.Plan(kernel, "cpu", interpret_as=interpret)
    model = encoder.ModernBert(cfg, plan, rngs=nnx.Rngs(0))
    for layer in model.layers:
        wqkv = layer.attn.wqkv.kernel
        wqkv[...] = wqkv[...].at[:, :2].multiply(6.0)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_base_width_in_tpu_interpret_mode(dtype, capfd, monkeypatch):
    """rope_fused, and with bfloat16 fused_layer's kernels (float32 weights exceed what VMEM
    holds: XLA's path), at base width (d 768, 12 heads, MLP 1152) on rows of 776 keys (a
    prefix of 520 + 256 tokens) through a global and a local layer, in JAX's TPU interpret
    mode: two cores, race detection, uninitialised memory read as NaN. Two rows: left padding
    and a hole; right padding after the prefix. float32 within 1e-5 of "xla"; bfloat16 as
    close to float32 "xla" as "xla"'s own bfloat16 is. A float32 row of 776 keys exceeds what
    rope_fused holds in a TPU's VMEM (splash takes it there): the limit is lifted here, so
    that the kernel's float32 arithmetic is checked at this width too."""
    s, d = 776, 768
    monkeypatch.setattr(rope_attention, "MAX_ROW_BYTES", s * d * 4)
    mask_bs = np.ones((2, s), bool)
    mask_bs[0, :40] = mask_bs[0, 300:303] = False
    mask_bs[1, 520 + 200:] = False
    x_bsd = jnp.asarray(np.random.default_rng(0).normal(size=(2, s, d)), jnp.float32)

    def run(model):
        return np.asarray(jax.jit(lambda m: m(attention_mask_bs=mask_bs, inputs_embeds_bsd=x_bsd))(
            model), np.float32)[mask_bs]

    fused = base_encoder("rope_fused", dtype, TPU_INTERPRET)
    assert [layer.fused for layer in fused.layers] == [dtype == "bfloat16"] * 2
    got, exact = run(fused), run(base_encoder("xla", "float32"))
    assert "RACE DETECTED" not in capfd.readouterr().out
    if dtype == "float32":
        assert rel_err(got, exact) <= 1e-5
    else:
        within_the_modules_rounding(got, run(base_encoder("xla", "bfloat16")), exact)
