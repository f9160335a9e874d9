"""The attention registry: validated names, "auto" per platform, and every registered kernel
(and the block-local strategy) against the dense masked reference, on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

import cde_jax
from cde_jax import attention
from cde_jax.config import ModernBertConfig


def qkv_inputs(seed: int, b: int, s: int, lengths, h: int = 2, e: int = 8):
    """Random q, k, v (b, s, h, e) with peaked attention (logit std ~3) and right padding."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (b, s, h, e), jnp.float32) for key in keys)
    key_mask_bs = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
    return q * 1.7, k * 1.7, v, key_mask_bs


# Lengths: full, short, a single token, and empty rows (every query sees nothing).
CASES = [(37, 4, [37, 20, 1, 0]), (100, 7, [100, 63, 5, 0]), (129, 16, [129, 128, 17, 2]),
         (70, 64, [70, 64, 65, 0])]


@pytest.mark.parametrize("s,radius,lengths", CASES)
def test_local_block_attention_equals_dense(s, radius, lengths):
    q, k, v, key_mask_bs = qkv_inputs(s, len(lengths), s, lengths)
    pos = jnp.arange(s)
    dense = attention.dense_attention(q, k, v, key_mask_bs, pos, pos, radius)
    blocked = attention.local_block_attention(q, k, v, key_mask_bs, radius)
    assert np.isfinite(np.asarray(blocked)).all()
    # Every position, the rows that see no key included: both average the row's values.
    assert max_rel_err(blocked, dense) <= 1e-5


@pytest.mark.parametrize("name", sorted(attention.KERNELS))
@pytest.mark.parametrize("radius", [None, 5])
@pytest.mark.parametrize("t", [30, 11])  # all queries, or the last 11 (the last layer)
def test_every_kernel_matches_the_reference(name, radius, t):
    s, lengths = 30, [30, 24, 3, 0]
    q, k, v, key_mask_bs = qkv_inputs(t + 100 * (radius or 0), len(lengths), s, lengths)
    pos = jnp.arange(s)
    q_t, q_pos = q[:, s - t:], pos[s - t:]
    want = attention.dense_attention(q_t, k, v, key_mask_bs, q_pos, pos, radius)
    got = attention.KERNELS[name](q_t, k, v, key_mask_bs, q_pos, pos, radius)
    assert got.shape == want.shape and np.isfinite(np.asarray(got)).all()
    assert max_rel_err(got, want) <= 1e-5


def test_names_are_validated():
    assert {"auto", "xla"} <= set(attention.names())
    with pytest.raises(ValueError, match="unknown attention 'nonsense': choose one of auto, xla"):
        attention.check("nonsense")
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        ModernBertConfig(attention="flash")
    assert attention.resolve("auto", "cpu") == attention.AUTO["cpu"]
    assert attention.resolve("xla", "tpu") == "xla"
    assert set(attention.AUTO.values()) <= set(attention.KERNELS)


def test_load_takes_an_attention_name(synthetic, random_docs):
    converted = synthetic()[1]
    with pytest.raises(ValueError, match="unknown attention 'nonsense': choose one of"):
        cde_jax.load(converted, attention="nonsense")
    auto, xla = cde_jax.load(converted), cde_jax.load(converted, attention="xla")
    assert auto.backbone_config.attention == attention.AUTO["cpu"]
    docs = random_docs[:12]
    dataset = xla.embed_minicorpus(docs)
    np.testing.assert_array_equal(auto.embed_minicorpus(docs), dataset)
    np.testing.assert_array_equal(auto.embed_documents(docs, dataset),
                                  xla.embed_documents(docs, dataset))
