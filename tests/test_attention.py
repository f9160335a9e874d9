"""The attention registry: validated names, "auto" per device and dtype, every registered
kernel (and the block-local strategy) against the dense masked reference on CPU, cuDNN's
argument construction through the XLA path of the same API, rope_fused (RoPE inside, heads
side by side) against RoPE + the dense reference, and splash and rope_fused (interpret mode)
in the encoder and both stages.

Kernels are compared on the query rows that see at least one key: a query that sees none
(only padding can) gets a kernel-specific finite value that is never read. "xla", the
reference's own strategy, is compared on every row."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err
from flax import nnx

import cde_jax
from cde_jax import attention, ops, rope_attention
from cde_jax.config import ModernBertConfig
from cde_jax.encoder import ModernBert
from cde_jax.ops import MaskSpec
from cde_jax.tokenization import pad_batch


def qkv_inputs(seed: int, b: int, s: int, lengths, h: int = 2, e: int = 8, dtype=jnp.float32):
    """Random q, k, v (b, s, h, e) with peaked attention (logit std ~3) and right padding."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (b, s, h, e), jnp.float32) for key in keys)
    key_mask_bs = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
    return (q * 1.7).astype(dtype), (k * 1.7).astype(dtype), v.astype(dtype), key_mask_bs


def rows_that_see_a_key(key_mask_bs, q_pos_t, k_pos_s, radius):
    """(b, t) bool: queries with at least one visible key."""
    mask_b1ts = ops.attention_mask(MaskSpec(key_mask_bs, q_pos_t, k_pos_s, radius))
    b, t, s = key_mask_bs.shape[0], q_pos_t.shape[0], k_pos_s.shape[0]
    return jnp.broadcast_to(mask_b1ts, (b, 1, t, s)).any(-1)[:, 0]


def err_on_rows(got_bthe, want_bthe, rows_bt) -> float:
    """`max_rel_err` over the selected query rows; every output must be finite."""
    assert np.isfinite(np.asarray(got_bthe, np.float32)).all()
    rows = np.asarray(rows_bt)
    return max_rel_err(np.asarray(got_bthe, np.float32)[rows],
                       np.asarray(want_bthe, np.float32)[rows])


def run(name: str, head_dim: int = 8, theta: float = 10_000.0):
    """Kernel `name` as the encoder calls it, on this host (Pallas kernels interpreted)."""
    plan = attention.Plan(name, jax.devices()[0].platform)
    return lambda q, k, v, mask: plan.attend(q, k, v, mask, attention.Rope(theta, head_dim))


def runs_here(name: str) -> bool:
    return attention.unsupported(name, jax.devices()[0], "float32") is None


# Lengths: full, short, a single token, and empty rows (every query sees nothing).
CASES = [(37, 4, [37, 20, 1, 0]), (100, 7, [100, 63, 5, 0]), (129, 16, [129, 128, 17, 2]),
         (70, 64, [70, 64, 65, 0])]


@pytest.mark.parametrize("s,radius,lengths", CASES)
def test_local_block_attention_equals_dense(s, radius, lengths):
    q, k, v, key_mask_bs = qkv_inputs(s, len(lengths), s, lengths)
    pos = jnp.arange(s)
    dense = attention.dense_attention(q, k, v, MaskSpec(key_mask_bs, pos, pos, radius))
    blocked = attention.local_block_attention(q, k, v, key_mask_bs, radius)
    assert np.isfinite(np.asarray(blocked)).all()
    # Every position, the rows that see no key included: both average the row's values.
    assert max_rel_err(blocked, dense) <= 1e-5


@pytest.mark.parametrize("s,radius,lengths", CASES)
def test_head_major_local_equals_dense(s, radius, lengths):
    q, k, v, key_mask_bs = qkv_inputs(s, len(lengths), s, lengths)
    pos = jnp.arange(s)
    dense = attention.dense_attention(q, k, v, MaskSpec(key_mask_bs, pos, pos, radius))
    blocked = jax.jit(attention.head_major_local, static_argnums=4)(q, k, v, key_mask_bs, radius)
    rows_bt = rows_that_see_a_key(key_mask_bs, pos, pos, radius)
    assert not rows_bt.all()  # the cases include blind padding rows
    assert err_on_rows(blocked, dense, rows_bt) <= 1e-5


@pytest.mark.parametrize("name", [n for n in sorted(attention.KERNELS)
                                  if runs_here(n) and not attention.KERNELS[n].rotates])
@pytest.mark.parametrize("radius", [None, 5])
@pytest.mark.parametrize("t", [30, 11])  # all queries, or the last 11 (the last layer)
def test_every_kernel_matches_the_reference(name, radius, t):
    """Every kernel this device runs (cudnn: on NVIDIA GPUs; here its arguments are tested
    through the XLA path, and its refusal below)."""
    s, lengths = 30, [30, 24, 3, 0]
    q, k, v, key_mask_bs = qkv_inputs(t + 100 * (radius or 0), len(lengths), s, lengths)
    pos = jnp.arange(s)
    q_t, q_pos = q[:, s - t:], pos[s - t:]
    want = attention.dense_attention(q_t, k, v, MaskSpec(key_mask_bs, q_pos, pos, radius))
    got = jax.jit(run(name))(q_t, k, v, MaskSpec(key_mask_bs, q_pos, pos, radius))
    assert got.shape == want.shape and got.dtype == want.dtype
    rows_bt = (jnp.ones((len(lengths), t), bool) if name == "xla"
               else rows_that_see_a_key(key_mask_bs, q_pos, pos, radius))
    assert err_on_rows(got, want, rows_bt) <= 1e-5


@pytest.mark.parametrize("t,s,radius,lengths", [
    (200, 200, 16, (200, 131, 3)),       # block-local (head_major), 2 splash tiles
    (16, 200, None, (200, 190, 100)),    # last layer: text queries after a prefix
    (72, 200, 16, (200, 150, 40)),       # last layer of a local-last model
])
@pytest.mark.parametrize("name", ["head_major", "splash"])
def test_kernels_on_longer_rows(name, t, s, radius, lengths):
    """Several windows and, for splash, several 128-tiles with padding in the last one."""
    q, k, v, key_mask_bs = qkv_inputs(t + s, len(lengths), s, lengths, h=2, e=16)
    pos = jnp.arange(s)
    q_t, q_pos = q[:, s - t:], pos[s - t:]
    want = attention.dense_attention(q_t, k, v, MaskSpec(key_mask_bs, q_pos, pos, radius))
    got = jax.jit(run(name))(q_t, k, v, MaskSpec(key_mask_bs, q_pos, pos, radius))
    rows_bt = rows_that_see_a_key(key_mask_bs, q_pos, pos, radius)
    assert err_on_rows(got, want, rows_bt) <= 1e-5


@pytest.mark.parametrize("name", ["head_major", "splash"])
def test_kernel_gradients_match_the_reference(name):
    """Training differentiates through the kernel (splash: its backward kernels, interpret
    mode): gradients of a loss over the rows that see a key, a local last layer's shape."""
    t, s, radius, lengths = 72, 200, 16, (200, 150, 40)
    q, k, v, key_mask_bs = qkv_inputs(7, len(lengths), s, lengths, h=2, e=16)
    pos = jnp.arange(s)
    rows_bt = rows_that_see_a_key(key_mask_bs, pos[s - t:], pos, radius)
    weights_bthe = jax.random.normal(jax.random.key(1), (len(lengths), t, 2, 16))
    weights_bthe = jnp.where(rows_bt[:, :, None, None], weights_bthe, 0.0)

    def loss(kernel, q, k, v):
        out = kernel(q[:, s - t:], k, v, MaskSpec(key_mask_bs, pos[s - t:], pos, radius))
        return (out * weights_bthe).sum()

    want = jax.grad(loss, argnums=(1, 2, 3))(attention.dense_attention, q, k, v)
    got = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(
        run(name), q, k, v)
    for g, w in zip(got, want):
        assert max_rel_err(g, w) <= 1e-5


# --- rope_fused: q, k, v (b, s, h * e) before RoPE ------------------------------------------
def rope_fused_case(seed, t, s, lengths, h, e, radius, theta=10_000.0, dtype=jnp.float32):
    """Unrotated (b, s, h * e) inputs, the want of RoPE + the dense reference (b, t, h * e)
    in float32, the rows that see a key, and the mask."""
    q, k, v, key_mask_bs = qkv_inputs(seed, len(lengths), s, lengths, h=h, e=e)
    pos = jnp.arange(s)
    mask = MaskSpec(key_mask_bs, pos[s - t:], pos, radius)
    cos_se, sin_se = ops.rope_cos_sin(pos, e, theta)
    rotated_q = ops.apply_rope(q, cos_se, sin_se)[:, s - t:]
    want = attention.dense_attention(rotated_q, ops.apply_rope(k, cos_se, sin_se), v, mask)
    flat = [x.reshape(*x.shape[:2], h * e).astype(dtype) for x in (q[:, s - t:], k, v)]
    rows_bt = rows_that_see_a_key(key_mask_bs, pos[s - t:], pos, radius)
    return flat, want.reshape(len(lengths), t, h * e), rows_bt, mask


@pytest.mark.parametrize("t,s,radius,lengths,h,e", [
    (30, 30, None, (30, 24, 3, 0), 2, 8),        # small: one head group of 16 lanes
    (30, 30, 5, (30, 24, 3, 0), 2, 8),
    (11, 30, None, (30, 24, 3, 0), 2, 8),        # the last layer: the last 11 queries
    (200, 200, 16, (200, 131, 3), 4, 64),        # 2 groups of 128 lanes, 2 query blocks
    (300, 300, 64, (300, 290, 150), 2, 64),      # local windows crossing query blocks
    (16, 200, None, (200, 190, 100), 4, 16),     # text queries after a prefix
    (72, 200, 16, (200, 150, 40), 8, 16),        # a local last layer
])
def test_rope_fused_matches_rope_and_the_reference(t, s, radius, lengths, h, e):
    flat, want, rows_bt, mask = rope_fused_case(t + s + h, t, s, lengths, h, e, radius)
    got = jax.jit(run("rope_fused", e))(*flat, mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert err_on_rows(got, want, rows_bt) <= 1e-5


def test_rope_fused_runs_rows_longer_than_its_vmem(monkeypatch):
    """Rows the kernel cannot hold (cde-small-v2's 1032 keys fit in bfloat16, not in
    float32) run rotated q and k through splash: the same function, never an error. The
    limit is lowered here so that a short row takes that path."""
    assert rope_attention.holds(1032, 768, jnp.bfloat16)
    assert not rope_attention.holds(1032, 768, jnp.float32)
    assert not rope_attention.holds(1160, 768, jnp.bfloat16)
    flat, want, rows_bt, mask = rope_fused_case(3, 72, 200, (200, 150, 40), 4, 16, 16)
    monkeypatch.setattr(rope_attention, "MAX_ROW_BYTES", 199 * 64 * 4)
    assert not rope_attention.holds(200, 64, jnp.float32)
    assert err_on_rows(jax.jit(run("rope_fused", 16))(*flat, mask), want, rows_bt) <= 1e-5


def test_rope_fused_bfloat16_is_within_rounding_of_float32():
    """bfloat16 q, k, v: RoPE, logits, softmax and accumulation in float32 inside; as close to
    the float32 reference as bfloat16 inputs allow."""
    flat, want, rows_bt, mask = rope_fused_case(5, 200, 200, (200, 150, 40), 4, 64, 64,
                                                theta=160_000.0, dtype=jnp.bfloat16)
    got = jax.jit(run("rope_fused", 64, 160_000.0))(*flat, mask)
    assert got.dtype == jnp.bfloat16
    assert err_on_rows(got, want, rows_bt) <= 2e-2


def test_rope_fused_gradients_match_the_reference():
    """Training differentiates through rope_fused: its backward is the reference's, wired by
    a custom VJP, and must equal autodiff of RoPE + dense attention (the mask gets none)."""
    t, s, radius, lengths, h, e = 72, 200, 16, (200, 150, 40), 2, 16
    flat, _, rows_bt, mask = rope_fused_case(9, t, s, lengths, h, e, radius)
    q_full = jnp.concatenate([jnp.zeros((len(lengths), s - t, h * e)), flat[0]], axis=1)
    noise_btd = jax.random.normal(jax.random.key(2), (len(lengths), t, h * e))
    weights_btd = jnp.where(rows_bt[..., None], noise_btd, 0.0)

    def loss(kernel, q, k, v):
        return (kernel(q[:, s - t:], k, v, mask) * weights_btd).sum()

    def reference(q, k, v, mask):
        return rope_attention.reference(q, k, v, mask, 10_000.0, e)

    want = jax.grad(loss, argnums=(1, 2, 3))(reference, q_full, *flat[1:])
    got = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(
        run("rope_fused", e), q_full, *flat[1:])
    for g, w in zip(got, want):
        assert max_rel_err(g, w) <= 1e-5


def test_rope_tables_fold_rotate_half():
    """x * cos + partner(x) * signed sin, partner swapping each head's halves, is
    `ops.apply_rope` (checked on the host, where the kernel's lane rotations are numpy's)."""
    s, h, e = 50, 3, 16
    x_bshe = np.random.default_rng(0).standard_normal((1, s, h, e)).astype(np.float32)
    cos_sg, sin_sg = rope_attention.rope_tables(s, e, 10_000.0, h * e)
    x_sg = x_bshe.reshape(s, h * e)
    lane_g = np.arange(h * e)
    partner_sg = np.where(lane_g % e < e // 2, np.roll(x_sg, -(e // 2), 1),
                          np.roll(x_sg, e // 2, 1))
    want = ops.apply_rope(jnp.asarray(x_bshe), *ops.rope_cos_sin(jnp.arange(s), e, 10_000.0))
    assert max_rel_err(x_sg * cos_sg + partner_sg * sin_sg,
                       np.asarray(want).reshape(s, h * e)) <= 1e-6


@pytest.mark.parametrize("radius", [None, 16])
def test_head_major_bfloat16_accumulates_in_float32(radius):
    """bfloat16 operands, float32 logits/softmax/accumulation: within bf16 rounding of the
    float32 reference, as close as the reference's own bf16 path."""
    s, lengths = 100, (100, 60, 7)
    q, k, v, key_mask_bs = qkv_inputs(3, len(lengths), s, lengths, h=2, e=16)
    pos = jnp.arange(s)
    want = attention.dense_attention(q, k, v, MaskSpec(key_mask_bs, pos, pos, radius))
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = attention.head_major(*half, MaskSpec(key_mask_bs, pos, pos, radius))
    ref_bf16 = attention.dense_attention(*half, MaskSpec(key_mask_bs, pos, pos, radius))
    assert got.dtype == jnp.bfloat16
    rows_bt = rows_that_see_a_key(key_mask_bs, pos, pos, radius)
    assert err_on_rows(got, want, rows_bt) <= 1.5 * err_on_rows(ref_bf16, want, rows_bt) + 1e-3


# --- cuDNN: arguments checked through the XLA path of jax.nn.dot_product_attention ---------
CUDNN_CASES = {  # (t, s, radius, key lengths); t < s: the queries are the last t keys
    "global": (128, 128, None, (128, 77, 5, 0)),
    "local": (200, 200, 16, (200, 131, 3, 0)),
    "suffix_global": (16, 200, None, (200, 190, 100, 0)),
    "suffix_local": (40, 200, 16, (200, 180, 170, 2)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CUDNN_CASES)
def test_cudnn_arguments_compute_the_reference(case, dtype):
    t, s, radius, lengths = CUDNN_CASES[case]
    q, k, v, key_mask_bs = qkv_inputs(s, len(lengths), s, lengths, h=2, e=16, dtype=dtype)
    pos = jnp.arange(s)
    q_t, q_pos = q[:, s - t:], pos[s - t:]
    expressed_b, arguments = attention.cudnn_arguments(MaskSpec(key_mask_bs, q_pos, pos, radius))
    assert expressed_b.all()  # right padding: lengths as they are
    got = jax.jit(lambda q, k, v, a: jax.nn.dot_product_attention(
        q, k, v, implementation=None, **a))(q_t, k, v, arguments)
    want = attention.dense_attention(q_t, k, v, MaskSpec(key_mask_bs, q_pos, pos, radius))
    real_bt = key_mask_bs[:, s - t:]  # real queries: the ones cuDNN computes
    assert err_on_rows(got, want, real_bt) <= (1e-5 if dtype == jnp.float32 else 1e-2)
    assert not np.asarray(jnp.where(real_bt[:, :, None, None], 0, got), np.float32).any()


def test_cudnn_argument_shapes():
    s, t = 536, 16
    key_mask_bs = jnp.arange(s)[None, :] < jnp.array([536, 530, 300, 0])[:, None]
    suffix = attention.cudnn_arguments(MaskSpec(key_mask_bs, jnp.arange(s - t, s), jnp.arange(s),
                                                64))[1]
    assert suffix["key_value_seq_lengths"].tolist() == [536, 530, 300, 0]
    assert suffix["query_seq_lengths"].tolist() == [16, 10, 0, 0]
    assert suffix["query_seq_lengths"].dtype == suffix["key_value_seq_lengths"].dtype == jnp.int32
    assert suffix["mask"].shape == (1, 1, t, s) and suffix["mask"].dtype == jnp.bool_
    full = attention.cudnn_arguments(MaskSpec(key_mask_bs, jnp.arange(s), jnp.arange(s)))[1]
    assert full["query_seq_lengths"].tolist() == [536, 530, 300, 0] and "mask" not in full


def test_cudnn_accepts_the_window_mask_and_rejects_the_alternatives():
    """cuDNN's Python-side checks, which run when the call is traced (no GPU needed, public
    API): the (1, 1, t, s) window mask passes the bias shape check; a query-broadcast
    (b, 1, 1, s) mask and a symmetric `local_window_size` are refused (why the window is a
    (t, s) mask)."""
    t, s = 16, 200
    q, k, v, key_mask_bs = qkv_inputs(0, 3, s, (200, 100, 50), h=2, e=16, dtype=jnp.bfloat16)
    arguments = attention.cudnn_arguments(MaskSpec(key_mask_bs, jnp.arange(s - t, s),
                                                    jnp.arange(s), 16))[1]

    def check(mask):
        call = functools.partial(jax.nn.dot_product_attention, implementation="cudnn",
                                 **{**arguments, "mask": mask})
        assert jax.eval_shape(call, q[:, s - t:], k, v).shape == (3, t, 2, 16)

    check(arguments["mask"])
    with pytest.raises(ValueError, match="Bias must have same seq length"):
        check(key_mask_bs[:, None, None, :])
    with pytest.raises(ValueError, match="right window"):
        jax.nn.dot_product_attention(q, k, v, local_window_size=(16, 16), implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the failure off NVIDIA GPUs")
def test_cudnn_needs_an_nvidia_gpu_and_half_precision(synthetic):
    with pytest.raises(ValueError, match="attention 'cudnn' needs an NVIDIA GPU; this device "
                                         "is cpu"):
        cde_jax.load(synthetic()[1], attention="cudnn", dtype="bfloat16")
    q, k, v, key_mask_bs = qkv_inputs(0, 2, 16, (16, 3))
    with pytest.raises(ValueError, match="bfloat16 or float16, not float32"):
        attention.cudnn(q, k, v, MaskSpec(key_mask_bs, jnp.arange(16), jnp.arange(16)))


class FakeGpu:
    """What `resolve` reads of a device, for an NVIDIA GPU this machine does not have."""
    platform, device_kind, compute_capability = "gpu", "NVIDIA H100", "9.0"

    class client:  # noqa: N801 (jax.Device.client)
        platform_version = "cuda 12080"


def test_auto_per_device_and_dtype(monkeypatch):
    cpu = jax.devices()[0]
    for dtype in ("float32", "bfloat16"):
        assert attention.resolve("auto", cpu, dtype) == "head_major"  # never cudnn here
    tpu = type("FakeTpu", (), {"platform": "tpu", "device_kind": "TPU v5 lite"})()
    assert attention.resolve("auto", tpu, "bfloat16") == "rope_fused"
    assert attention.resolve("auto", tpu, "float32") == "splash"  # rows over rope_fused's VMEM
    monkeypatch.setattr(attention, "cudnn_problem", lambda: None)
    assert attention.resolve("auto", FakeGpu(), "bfloat16") == "cudnn"
    assert attention.resolve("auto", FakeGpu(), "float32") == "xla"  # cuDNN has no float32
    with pytest.raises(ValueError, match="bfloat16 or float16 only, not float32"):
        attention.resolve("cudnn", FakeGpu(), "float32")
    monkeypatch.setattr(attention, "cudnn_problem", lambda: "cuDNN is not detected.")
    assert attention.resolve("auto", FakeGpu(), "bfloat16") == "xla"
    with pytest.raises(ValueError, match=r"needs JAX's cuDNN.*cuDNN is not detected"):
        attention.resolve("cudnn", FakeGpu(), "bfloat16")


def test_names_are_validated():
    assert set(attention.names()) == {"auto", "xla", "head_major", "cudnn", "splash",
                                      "rope_fused"}
    with pytest.raises(ValueError, match="unknown attention 'nonsense': choose one of auto, "
                                         "xla, head_major, cudnn, splash, rope_fused"):
        attention.check("nonsense")
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        ModernBert(ModernBertConfig(attention="flash"), rngs=nnx.Rngs(0))
    for name in ("splash", "rope_fused"):  # run anywhere (interpret off TPU)
        assert attention.resolve(name) == name
    assert set(attention.AUTO.values()) <= set(attention.KERNELS)
    assert attention.AUTO["tpu", "half"] == "rope_fused"
    assert attention.AUTO["tpu", "float32"] == "splash"  # float32 rows exceed rope_fused's VMEM
    fused = attention.KERNELS["rope_fused"]
    assert fused.rotates and fused.fuses_layer and fused.per_device
    assert not attention.KERNELS["splash"].rotates and attention.KERNELS["splash"].per_device
    for platform in ("cpu", "gpu", "tpu"):
        assert attention.candidates(platform)[0] == "xla"
        assert set(attention.candidates(platform)) <= set(attention.KERNELS)
    assert attention.candidates("tpu") == ("xla", "splash", "rope_fused")


def test_load_takes_an_attention_name(synthetic, random_docs):
    converted = synthetic()[1]
    with pytest.raises(ValueError, match="unknown attention 'nonsense': choose one of"):
        cde_jax.load(converted, attention="nonsense")
    auto = cde_jax.load(converted)
    assert auto.backbone_config.attention == attention.AUTO["cpu", "float32"]
    chosen = cde_jax.load(converted, attention=attention.AUTO["cpu", "float32"])
    xla = cde_jax.load(converted, attention="xla")
    docs = random_docs[:12]
    dataset = xla.embed_minicorpus(docs)
    np.testing.assert_array_equal(auto.embed_minicorpus(docs), chosen.embed_minicorpus(docs))
    assert max_rel_err(auto.embed_minicorpus(docs), dataset) <= 1e-5
    assert max_rel_err(auto.encode_document(docs, dataset_embeddings=dataset),
                       xla.encode_document(docs, dataset_embeddings=dataset)) <= 1e-5


# --- the Pallas kernels in the model (interpret mode on CPU) --------------------------------
@pytest.mark.parametrize("name", ["splash", "rope_fused"])
def test_pallas_kernels_in_the_encoder_and_both_stages(synthetic, random_docs, name):
    """Tiny preset (radius 16): documents of ~40-130 tokens span several local windows and
    two 128-tiles; the second stage's prefix is kept short (24 dataset rows + 8 soft tokens)
    so that interpret mode stays fast. rope_fused also takes the prefix's layer-0 q, k, v
    unrotated, heads side by side."""
    converted = synthetic()[1]
    splash = cde_jax.load(converted, attention=name)
    xla = cde_jax.load(converted, attention="xla")
    docs = [d for d in random_docs if 200 < len(d) < 600][:6]
    ids, mask = padded(splash, docs)
    assert mask.sum(1).max() > 4 * splash.backbone_config.window_radius
    assert mask.sum(1).min() < mask.shape[1]  # right padding in some rows

    def encoder(model):
        return np.asarray(jax.jit(lambda m, i, k: m(i, k))(
            model.runner.model.first_stage_model.embedder, ids, mask))

    real = mask.astype(bool)
    assert max_rel_err(encoder(splash)[real], encoder(xla)[real]) <= 1e-5
    dataset = xla.first_stage(ids, mask)
    assert max_rel_err(splash.first_stage(ids, mask), dataset) <= 1e-5
    rows_md = np.concatenate([dataset] * 4)  # 24 rows
    assert max_rel_err(splash.second_stage(ids, mask, rows_md),
                       xla.second_stage(ids, mask, rows_md)) <= 1e-5


def padded(model, texts):
    """(ids, mask) of `texts`, right-padded to the longest."""
    token_ids = model.tokenizer.encode(texts)
    longest = max(len(t) for t in token_ids)
    return pad_batch(token_ids, np.arange(len(texts)), longest,
                     model.backbone_config.pad_token_id)


def test_models_of_one_plan_share_their_programs(synthetic):
    """The plan is a value in the graphdef (no closure per layer), so two loads with the
    same kernel share the runner's compiled stages instead of compiling them again."""
    converted = synthetic()[1]
    one, two = (cde_jax.load(converted, attention="rope_fused") for _ in range(2))
    assert one.runner.graphdef == two.runner.graphdef
    assert one.runner._first is two.runner._first
