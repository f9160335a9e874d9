"""Every kernel equals "xla" for every mask the stages accept (any 0/1 mask): right padding,
left padding, a hole inside the text, a single-token row and an all-zero row, in both stages,
float32 within 1e-5 relative per row (tiny preset, Pallas kernels in interpret mode).

Positions are indices in the row whatever the mask (`attention.py`): a hole keeps the tokens
after it at their index, as `transformers`' ModernBERT computes (position ids arange(s)).

An all-zero row embeds nothing: its pooled vector is 0 (`ops.mean_pool`), so its embedding is
the stage's head applied to 0 (first stage: `mlp(0)`; second stage: `output_projection(0)`),
whatever attention computed for its padding queries.

The stages move left-padded rows to right padding (`ops.right_padded`), so a text embeds the
same whichever side it is padded on, in both stages.

cuDNN cannot run here: what it receives is tested instead, through the XLA path of the same
`jax.nn.dot_product_attention` call (`attention.cudnn(..., implementation="xla")`): left-padded
rows rolled to right padding before their lengths are taken; a hole, which lengths cannot
express, is NaN inside the kernel, and the model never hands it one: a batch with a hole runs
"xla" on the same parameters (`CdeModel.array_batch`), shown with a lengths-only test kernel
that computes cuDNN's arguments on the XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

import cde_jax
from cde_jax import attention, ops
from cde_jax.ops import MaskSpec

S = 60  # tokens per row: past 3 local windows of the tiny preset (radius 16): blocks run
MASKS = ("right padding", "left padding", "holes", "single token", "all zero")
KERNELS = ("head_major", "splash", "rope_fused")


def masked_batch(token_ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) (5, S): one row per kind of mask in `MASKS`, from the first text's tokens."""
    text = np.asarray(token_ids[0][:S - 12], np.int32)
    n = len(text)
    ids = np.full((len(MASKS), S), pad_id, np.int32)
    mask = np.zeros((len(MASKS), S), np.int32)
    ids[0, :n], mask[0, :n] = text, 1                    # right padding
    ids[1, S - n:], mask[1, S - n:] = text, 1            # left padding
    ids[2, :n], mask[2, :n] = text, 1                    # holes: 2 and 3 tokens dropped
    mask[2, [5, 20, 21, 22]] = 0
    ids[3, 0], mask[3, 0] = text[0], 1                   # a single token
    ids[4, :n] = text                                    # all zero
    return ids, mask


@pytest.fixture(scope="module")
def outputs(synthetic, random_docs):
    """{kernel: (first stage, second stage)} on the masked batch, and the model."""
    converted = synthetic()[1]
    models = {name: cde_jax.load(converted, attention=name) for name in ("xla", *KERNELS)}
    xla = models["xla"]
    docs = [d for d in random_docs if len(d) > 400]
    ids, mask = masked_batch(xla.tokenizer.encode(docs[:1]), xla.backbone_config.pad_token_id)
    dataset_md = xla.first_stage(*masked_batch(xla.tokenizer.encode(docs[:1]),
                                               xla.backbone_config.pad_token_id))[:1]
    dataset_md = np.concatenate([dataset_md] * 24)  # a short prefix: 24 rows + 8 soft tokens
    return {name: (m.first_stage(ids, mask), m.second_stage(ids, mask, dataset_md))
            for name, m in models.items()}, xla


def test_every_kernel_equals_xla_for_every_mask(outputs):
    results, _ = outputs
    table = []
    for name in KERNELS:
        for stage in (0, 1):
            got, want = results[name][stage], results["xla"][stage]
            errors = [max_rel_err(got[i], want[i]) for i in range(len(MASKS))]
            table.append(f"{name:10s} {('first', 'second')[stage]:6s} "
                         + " ".join(f"{e:9.2e}" for e in errors))
            assert max(errors) <= 1e-5, (name, stage, dict(zip(MASKS, errors)))
    print("\nkernel     stage  " + " ".join(f"{m[:9]:>9s}" for m in MASKS))
    print("\n".join(table))


def test_left_padding_equals_right_padding(outputs):
    """RoPE is relative and the window is a distance: a text's embedding does not depend on
    the side it is padded on, in either stage (the stages move it to right padding, so that
    in the second stage it follows the prefix directly)."""
    results, _ = outputs
    for name in ("xla", *KERNELS):
        for stage in results[name]:
            assert max_rel_err(stage[1], stage[0]) <= 1e-5


def test_an_all_zero_row_embeds_as_the_empty_text(outputs):
    results, model = outputs
    module = model.module
    d = model.backbone_config.hidden_size
    zero_1d = jnp.zeros((1, d), jnp.float32)
    first = np.asarray(module.first_stage_model.mlp(zero_1d))[0]
    second = np.asarray(module.second_stage_model.output_projection(zero_1d))[0]
    for name in ("xla", *KERNELS):
        assert max_rel_err(results[name][0][4], first) <= 1e-6
        assert max_rel_err(results[name][1][4], second) <= 1e-6


# --- cuDNN: what it receives ----------------------------------------------------------------
def masks_bs(s: int, prefix: int) -> np.ndarray:
    """The five kinds of rows over `s` keys, after `prefix` always-kept keys (the second
    stage's context)."""
    text = s - prefix
    n = text - 9
    rows = np.zeros((len(MASKS), text), bool)
    rows[0, :n] = rows[1, text - n:] = rows[2, :n] = rows[3, 0] = True
    rows[2, [4, 7, 8]] = False
    return np.concatenate([np.ones((len(MASKS), prefix), bool), rows], axis=1)


@pytest.mark.parametrize("t,s,prefix,radius", [
    (60, 60, 0, None), (60, 60, 0, 16),      # first stage: every query
    (80, 80, 20, 16),                         # second stage: prefix and text
    (60, 80, 20, None), (60, 80, 20, 16),    # its last layer: the text queries only
])
def test_cudnn_receives_what_it_can_compute(t, s, prefix, radius):
    """What the stage hands attention (`ops.right_padded`: left padding rolled to right
    padding) cuDNN takes as lengths, and its real queries equal the reference (cuDNN's zeros
    at padding queries are never read). A hole, which lengths cannot express, comes out NaN:
    never a silently different value."""
    text_bs = masks_bs(s - prefix, 0)  # the stage rolls the text's mask, then adds the prefix
    ids_bs = np.arange(text_bs.size).reshape(text_bs.shape)
    rolled_ids, rolled_bs = (np.asarray(x) for x in ops.right_padded(ids_bs, text_bs))
    np.testing.assert_array_equal(rolled_bs[1], rolled_bs[0])  # left padding -> right
    np.testing.assert_array_equal(rolled_ids[1][rolled_bs[1]], ids_bs[1][text_bs[1]])
    np.testing.assert_array_equal(rolled_bs[[0, 2, 3, 4]], text_bs[[0, 2, 3, 4]])
    rolled_bs = np.concatenate([np.ones((len(MASKS), prefix), bool), rolled_bs], axis=1)
    keys = jax.random.split(jax.random.key(s + t), 3)
    q, k, v = (1.7 * jax.random.normal(key, (len(MASKS), s, 2, 16)) for key in keys)
    pos = jnp.arange(s)
    mask = MaskSpec(jnp.asarray(rolled_bs), pos[s - t:], pos, radius)
    expressed_b, arguments = attention.cudnn_arguments(mask)
    assert expressed_b.tolist() == [True, True, False, True, True]
    assert np.asarray(arguments["key_value_seq_lengths"])[[0, 1, 3, 4]].tolist() == [
        s - 9, s - 9, prefix + 1, prefix]
    got = np.asarray(jax.jit(lambda q, k, v, m: attention.cudnn(
        q, k, v, m, implementation="xla"))(q[:, s - t:], k, v, mask))
    want = np.asarray(attention.dense_attention(q[:, s - t:], k, v, mask))
    assert np.isnan(got[2]).all()
    real_bt = rolled_bs[:, s - t:].copy()
    real_bt[2] = False
    assert max_rel_err(got[real_bt], want[real_bt]) <= 1e-5


def lengths_only(q, k, v, mask, rope, interpret):
    """cuDNN's arguments on JAX's XLA path: right, except NaN for a row with a hole."""
    return attention.cudnn(q, k, v, mask, implementation="xla")


@pytest.fixture
def lengths_kernel():
    attention.register("test_lengths", attention.Kernel("test_lengths", lengths_only,
                                                        holes=False))
    yield "test_lengths"
    attention.unregister("test_lengths")


def test_a_hole_goes_to_xla_where_the_kernel_takes_lengths(outputs, synthetic, lengths_kernel):
    """A kernel that takes padding only (cudnn) never sees a hole: the batch runs "xla" on the
    same parameters, so every row equals xla's; a batch without a hole stays on the kernel."""
    results, xla = outputs
    model = cde_jax.load(synthetic()[1], attention=lengths_kernel)
    docs = xla.tokenizer.encode(["a short text of a few tokens for the masks"] * 2)
    ids, mask = masked_batch(docs, xla.backbone_config.pad_token_id)
    dataset_md = np.asarray(results["xla"][0][:1].repeat(24, axis=0))
    first = model.first_stage(ids, mask)
    second = model.second_stage(ids, mask, dataset_md)
    assert model.array_batch(ids, mask)[2] is not model.runner  # the hole sends it to xla
    assert max_rel_err(first, xla.first_stage(ids, mask)) <= 1e-6
    assert max_rel_err(second, xla.second_stage(ids, mask, dataset_md)) <= 1e-6
    no_hole = np.delete(np.arange(len(MASKS)), MASKS.index("holes"))
    assert model.array_batch(ids[no_hole], mask[no_hole])[2] is model.runner  # the kernel
    raw = model.runner.run(model.runner.first(), ids, mask)  # the kernel itself, no routing
    assert np.isnan(raw[MASKS.index("holes")]).all()
