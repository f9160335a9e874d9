"""Encoder parity: cde_jax.encoder.ModernBert vs transformers.ModernBertModel (eager, sdpa)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from flax import nnx
from torch_reference import hf_config

from cde_jax.config import ModernBertConfig, modernbert_base
from cde_jax.convert import keymap
from cde_jax.encoder import ModernBert
from cde_jax.params import fill, split

SMALL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=96, local_attention=16, pad_token_id=0)
CONFIGS = {
    "small": ModernBertConfig(**SMALL),
    "biases": ModernBertConfig(**SMALL, norm_bias=True, attention_bias=True, mlp_bias=True),
    "odd-window-every2": ModernBertConfig(**{**SMALL, "num_hidden_layers": 5, "local_attention": 10,
                                             "global_attn_every_n_layers": 2,
                                             "num_attention_heads": 2}),
    "thetas": ModernBertConfig(**SMALL, global_rope_theta=5000.0, local_rope_theta=500.0),
    # Rows no longer than 3 windows: local layers take the dense masked path, not blocks.
    "wide-window": ModernBertConfig(**{**SMALL, "local_attention": 60}),
}


def torch_and_jax(cfg: ModernBertConfig, attn_implementation: str, seed: int = 0):
    """An HF model with every tensor randomized and our model holding the same weights.
    HF's init zeroes biases and sets norms to one, which would hide bias and norm bugs, and
    its 0.02-std Wqkv gives near-uniform attention, which would hide RoPE and mask bugs: the
    query/key weights here give attention logits of std ~2.5, as in a trained model."""
    torch.manual_seed(seed)
    hf_dict = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    ref = __import__("transformers").ModernBertModel(hf_config(hf_dict, attn_implementation))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("Wqkv.weight"):
                p.normal_(0.0, (2.5 / cfg.hidden_size) ** 0.5)
    ref.eval()
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours = nnx.eval_shape(lambda: ModernBert(cfg, rngs=nnx.Rngs(0)))
    flat = {}
    for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        jax_path = "/".join(map(str, path))
        hf_key, transform = keymap.to_hf_key("first_stage_model/embedder/" + jax_path)
        flat[jax_path] = transform.to_jax(state[hf_key.removeprefix(
            "first_stage_model.embedder.")], var.get_value().shape)
    graphdef, abstract = split(ours)
    return ref, nnx.merge(graphdef, fill(abstract, flat, lambda path, value, like:
                                          jnp.asarray(value)))


def padded_batch(rng, vocab: int, lengths: list[int], seq: int):
    ids = rng.integers(1, vocab, (len(lengths), seq))
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


@jax.jit
def run(model, ids, mask):
    return model(ids, mask)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, attn):
    cfg = CONFIGS[name]
    ref, ours = torch_and_jax(cfg, attn)
    # Right padding; rows longer than the local window; a row of 3 tokens whose padding
    # queries see no key in local layers.
    ids, mask = padded_batch(np.random.default_rng(1), cfg.vocab_size, [70, 41, 3], 70)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    actual, expected = np.asarray(run(ours, ids, mask)), expected.last_hidden_state.numpy()
    if attn == "sdpa":
        # HF's own eager and sdpa paths disagree at padding queries that see no key (sdpa
        # special-cases fully masked rows); those outputs are never pooled. Eager, which
        # masks with finite negatives as docs/model.md §3 says, is compared at every position.
        real = mask.astype(bool)
        actual, expected = actual[real], expected[real]
    err = max_rel_err(actual, expected)
    assert err <= 1e-5, err


def test_inputs_embeds_path():
    cfg = CONFIGS["biases"]
    ref, ours = torch_and_jax(cfg, "eager", seed=3)
    rng = np.random.default_rng(2)
    embeds = rng.standard_normal((2, 40, cfg.hidden_size)).astype(np.float32)
    mask = np.ones((2, 40), np.int64)
    mask[1, 25:] = 0
    with torch.no_grad():
        expected = ref(inputs_embeds=torch.tensor(embeds),
                       attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    actual = jax.jit(lambda m, e, a: m(attention_mask_bs=a, inputs_embeds_bsd=e))(ours, embeds,
                                                                                   mask)
    assert max_rel_err(actual, expected) <= 1e-5


def test_padding_far_from_tokens_stays_finite():
    """A padding query with no visible key in a local layer must not produce NaN."""
    cfg = CONFIGS["small"]
    _, ours = torch_and_jax(cfg, "eager")
    ids, mask = padded_batch(np.random.default_rng(5), cfg.vocab_size, [2], 64)
    assert np.isfinite(np.asarray(run(ours, ids, mask))).all()


def test_full_size_modernbert_base():
    """ModernBERT-base (22 layers, 768 wide) on 2 rows of ~600 tokens: global and local
    windows at real scale, RoPE at positions past 512."""
    cfg = modernbert_base()
    ref, ours = torch_and_jax(cfg, "sdpa", seed=7)
    ids, mask = padded_batch(np.random.default_rng(3), cfg.vocab_size, [600, 517], 600)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids),
                       attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    real = mask.astype(bool)
    err = max_rel_err(np.asarray(run(ours, ids, mask))[real], expected[real])
    assert err <= 1e-5, err
