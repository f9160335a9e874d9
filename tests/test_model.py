"""Two-stage parity: cde_jax.load(converted synthetic checkpoint) vs the PyTorch reference
(tests/torch_reference.py) on the released-layout files it was converted from."""

import numpy as np
import pytest
from conftest import TOKENIZER_DIR, max_rel_err
from torch_reference import TorchCde

import cde_jax
from cde_jax.profiling import count_compiles
from cde_jax.tokenization import TextTokenizer, load_tokenizer

QUERIES = [
    "search_query: what is the capital of France?",
    "search_query: time: 10:30, place: room 4",   # colons after the prefix
    "no prefix here, just words",                  # pools over every token
    "a: colon early in a text without a prefix",   # the quirk applies to it too
    "search_query: ",                              # prefix only
    "",                                            # empty text: [CLS] [SEP]
]
DOCUMENTS = [
    "search_document: Paris is the capital and most populous city of France.",
    "search_document: " + "A longer document about colons: they separate. " * 12,
]


@pytest.fixture(scope="module")
def tokenize():
    return TextTokenizer(load_tokenizer(TOKENIZER_DIR), pad_id=50283)


@pytest.fixture(scope="module")
def tokenize_docs():
    """Minicorpus documents cut at 96 tokens: the 512-row case is about the second stage's
    520-token prefix, not about long first-stage documents (covered in test_encoder)."""
    return TextTokenizer(load_tokenizer(TOKENIZER_DIR), pad_id=50283, max_length=96)


@pytest.fixture(scope="module")
def loaded(synthetic):
    """{instruction pooling flag: (cde_jax model, torch reference)}."""
    out = {}
    for flag in (True, False):
        released, converted = synthetic(ignore_instruction_tokens=flag)
        out[flag] = (cde_jax.load(converted), TorchCde(released))
    return out


# Measured (float32, CPU): first stage <= 1.2e-7, second stage <= 4.1e-7 over these cases.
FIRST_STAGE_PARITY, SECOND_STAGE_PARITY = 3e-7, 1e-6


@pytest.mark.parametrize("corpus_size", [1, 24, pytest.param(512, marks=pytest.mark.slow)])
@pytest.mark.parametrize("instruction_pooling", [True, False])
def test_two_stage_parity(loaded, tokenize, tokenize_docs, random_docs, corpus_size,
                          instruction_pooling):
    ours, ref = loaded[instruction_pooling]
    docs = ["search_document: " + d for d in random_docs[:corpus_size]]
    d_ids, d_mask = tokenize_docs(docs)
    ours_ctx, ref_ctx = ours.first_stage(d_ids, d_mask), ref.first_stage(d_ids, d_mask)
    assert ours_ctx.shape == (corpus_size, ours.hidden_size)
    assert max_rel_err(ours_ctx, ref_ctx) <= FIRST_STAGE_PARITY
    for texts in (QUERIES, DOCUMENTS):
        ids, mask = tokenize(texts)
        # End to end: each side's own dataset embeddings.
        err = max_rel_err(ours.second_stage(ids, mask, ours_ctx),
                          ref.second_stage(ids, mask, ref_ctx))
        assert err <= SECOND_STAGE_PARITY, err


def test_local_last_layer(tmp_path, tokenize, random_docs):
    """A backbone whose last layer is local: the text-only queries of the last layer go
    through the dense windowed mask with query positions offset by the prefix."""
    from cde_jax.config import modernbert_tiny
    from cde_jax.convert import convert
    from cde_jax.convert.synthetic import make_synthetic_checkpoint

    released = make_synthetic_checkpoint(tmp_path / "released", tokenizer_dir=TOKENIZER_DIR,
                                         backbone=modernbert_tiny().replace(num_hidden_layers=5),
                                         seed=4)
    ours, ref = cde_jax.load(convert(released, tmp_path / "converted")), TorchCde(released)
    assert ours.backbone_config.layer_types[-1] == "local"
    ctx = ref.first_stage(*tokenize(["search_document: " + d for d in random_docs[:24]]))
    ids, mask = tokenize(QUERIES + DOCUMENTS)
    assert max_rel_err(ours.second_stage(ids, mask, ctx), ref.second_stage(ids, mask, ctx)) <= 1e-4


def test_instruction_pooling_changes_output(loaded, tokenize, random_docs):
    """The flag is really read from config.json: same weights, different pooled tokens."""
    (on, _), (off, _) = loaded[True], loaded[False]
    ctx = on.first_stage(*tokenize(["search_document: " + d for d in random_docs[:8]]))
    ids, mask = tokenize(QUERIES[:2])
    a, b = on.second_stage(ids, mask, ctx), off.second_stage(ids, mask, ctx)
    assert np.abs(a - b).max() > 1e-3 * np.abs(b).max()


def test_too_many_dataset_embeddings_keep_the_first(loaded, tokenize):
    ours, ref = loaded[True]
    rng = np.random.default_rng(0)
    many = rng.standard_normal((600, ours.hidden_size)).astype(np.float32) * 0.05
    ids, mask = tokenize(QUERIES)
    assert ours.config.transductive_corpus_size == 512
    np.testing.assert_array_equal(ours.second_stage(ids, mask, many),
                                  ours.second_stage(ids, mask, many[:512]))
    assert max_rel_err(ours.second_stage(ids, mask, many),
                       ref.second_stage(ids, mask, many)) <= 1e-4


def test_null_dataset_mode(synthetic, tokenize):
    released, converted = synthetic(null_embedding=True)
    ours, ref = cde_jax.load(converted), TorchCde(released)
    ids, mask = tokenize(QUERIES)
    err = max_rel_err(ours.second_stage(ids, mask, None),
                      ref.second_stage(ids, mask, None, null_dataset=True))
    assert err <= 1e-4


def test_null_mode_needs_the_null_embedding(loaded, tokenize):
    ours, _ = loaded[True]
    with pytest.raises(ValueError, match="sequence_dropout_null_embedding"):
        ours.second_stage(*tokenize(QUERIES[:1]), None)


def test_loads_released_dir_directly(synthetic, tokenize, random_docs):
    released, converted = synthetic()
    a, b = cde_jax.load(released), cde_jax.load(converted)
    assert a.fingerprint == b.fingerprint
    ids, mask = tokenize(["search_document: " + d for d in random_docs[:4]])
    np.testing.assert_array_equal(a.first_stage(ids, mask), b.first_stage(ids, mask))


def test_bad_dataset_embeddings(loaded, tokenize):
    ours, _ = loaded[True]
    ids, mask = tokenize(QUERIES[:1])
    with pytest.raises(ValueError, match=r"\(n, 64\)"):
        ours.second_stage(ids, mask, np.zeros((4, 32), np.float32))
    bad = np.zeros((4, 64), np.float32)
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        ours.second_stage(ids, mask, bad)


def test_same_shapes_compile_once(loaded, tokenize_docs, tokenize, random_docs):
    ours, _ = loaded[True]
    d_ids, d_mask = tokenize_docs(["search_document: " + d for d in random_docs[:5]], length=96)
    q_ids, q_mask = tokenize(QUERIES, length=24)
    with count_compiles() as first:
        ctx = ours.first_stage(d_ids, d_mask)
        ours.second_stage(q_ids, q_mask, ctx)
    with count_compiles() as again:
        for _ in range(3):
            ctx = ours.first_stage(d_ids, d_mask)
            ours.second_stage(q_ids, q_mask, ctx)
            ours.second_stage(q_ids[::-1].copy(), q_mask[::-1].copy(), ctx)
    assert first.count >= 3  # first stage, context, second stage
    assert again.count == 0
