"""sentence-transformers habits of `CdeModel` on the tiny synthetic checkpoint: one str in,
one vector out; `encode_query` / `encode_document`; `similarity`; batch sizes checked;
`max_seq_length` (validated, truncating exactly as the tokenizer does, counted per call)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import TOKENIZER_DIR
from tokenizers import Tokenizer

import cde_jax
from cde_jax.validation import UserError

TEXTS = ["a short query", "what is a contextual document embedding?", "cats"]
BATCH = 8


@pytest.fixture(scope="module")
def model(synthetic):
    return cde_jax.load(synthetic()[1])


@pytest.fixture(scope="module")
def dataset(model, random_docs):
    return model.embed_minicorpus(random_docs[:16], batch_size=BATCH)


def test_one_str_gives_one_vector(model, dataset):
    one = model.encode(TEXTS[1], prompt_name="query", dataset_embeddings=dataset)
    many = model.encode(TEXTS, prompt_name="query", dataset_embeddings=dataset, batch_size=BATCH)
    assert one.shape == (model.hidden_size,) and many.shape == (3, model.hidden_size)
    np.testing.assert_allclose(one, many[1], rtol=0, atol=1e-6)
    assert np.linalg.norm(one) == pytest.approx(1.0, abs=1e-6)
    assert model.encode_query(TEXTS[1], dataset_embeddings=dataset).shape == (model.hidden_size,)
    raw = model.encode(TEXTS[1], dataset_embeddings=dataset, normalize_embeddings=False)
    assert raw.shape == (model.hidden_size,) and abs(np.linalg.norm(raw) - 1) > 1e-3


def test_encode_query_and_document_are_the_prompts(model, dataset):
    kw = dict(dataset_embeddings=dataset, batch_size=BATCH)
    query = model.encode_query(TEXTS, **kw)
    document = model.encode_document(TEXTS, **kw)
    np.testing.assert_array_equal(query, model.encode(TEXTS, prompt_name="query", **kw))
    np.testing.assert_array_equal(query, model.encode(TEXTS, prompt="search_query: ", **kw))
    np.testing.assert_array_equal(document, model.encode(TEXTS, prompt="search_document: ",
                                                         **kw))
    context = model.context(dataset)
    np.testing.assert_array_equal(query, context.encode_query(TEXTS, batch_size=BATCH))
    np.testing.assert_array_equal(document, context.encode_document(TEXTS, batch_size=BATCH))
    assert np.abs(query - document).max() > 1e-3  # the prompts change the vectors


def test_similarity_is_the_cosine_matrix(model, dataset):
    # cos([3,4],[4,3]) = 24/25, cos([3,4],[0,2]) = 8/10, cos([1,0],[0,2]) = 0, cos(x, -x) = -1
    np.testing.assert_allclose(model.similarity([[3, 4], [1, 0]], [[4, 3], [0, 2], [-3, -4]]),
                               [[24 / 25, 4 / 5, -1], [4 / 5, 0, -3 / 5]], atol=1e-7)
    assert model.similarity([3, 4], [[6, 8]]).shape == (1, 1)
    q = model.encode_query(TEXTS, dataset_embeddings=dataset, batch_size=BATCH)
    d = model.encode_document(TEXTS[:2], dataset_embeddings=dataset, batch_size=BATCH,
                              normalize_embeddings=False)
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)
    np.testing.assert_allclose(model.similarity(q, d), q @ unit.T, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match=r"\(n, d\) and \(m, d\).*\(2, 3\) and \(1, 4\)"):
        model.similarity(np.ones((2, 3)), np.ones((1, 4)))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_batch_size_must_be_a_positive_int(model, dataset, bad):
    with pytest.raises(ValueError, match="batch_size must be"):
        model.encode(TEXTS, dataset_embeddings=dataset, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be"):
        model.embed_minicorpus(TEXTS, batch_size=bad)


@pytest.mark.parametrize("bad", [0, 1, 513, 2.0, None])
def test_max_seq_length_is_validated(synthetic, bad):
    model = cde_jax.load(synthetic()[1])
    assert model.max_seq_length == 512
    with pytest.raises(ValueError, match="max_seq_length must be"):
        model.max_seq_length = bad
    assert model.max_seq_length == 512


def test_max_seq_length_truncates_and_counts_per_call(synthetic, dataset, random_docs, caplog):
    model = cde_jax.load(synthetic()[1])
    model.max_seq_length = 16
    long = [d for d in random_docs if len(d.split()) > 40][:3]
    texts = [long[0], "short", long[1], long[2]]
    with caplog.at_level(logging.WARNING, logger="cde_jax.tokenization"):
        got = model.encode_query(texts, dataset_embeddings=dataset, batch_size=BATCH)
        assert "3 of 4 text(s) truncated to 16 tokens" in caplog.text
        caplog.clear()
        model.encode_query(long[0], dataset_embeddings=dataset)
        assert "1 of 1 text(s) truncated to 16 tokens" in caplog.text  # not 4: per call
        caplog.clear()
        model.encode_query("short", dataset_embeddings=dataset)
        assert "truncated" not in caplog.text

    # The same as the array API on the tokenizer's own truncation at 16 tokens.
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.enable_truncation(16)
    for text, row in zip(texts, got):
        ids = np.array([tokenizer.encode("search_query: " + text).ids], np.int32)
        assert ids.shape[1] <= 16
        want = model.second_stage(ids, np.ones_like(ids), dataset)[0]
        np.testing.assert_allclose(row, want / np.linalg.norm(want), rtol=0, atol=1e-6)

    model.max_seq_length = 512
    full = model.encode_query(long[0], dataset_embeddings=dataset)
    assert np.abs(full - got[0]).max() > 1e-3


def test_tokenized_ahead_in_threads_equals_texts(model, dataset):
    """What the corpus job does: tokenize in reader threads, then encode the token ids."""
    from concurrent.futures import ThreadPoolExecutor

    prompt = "search_document: "
    with ThreadPoolExecutor(4) as pool:
        token_ids = [ids for part in pool.map(lambda t: model.tokenize([t], prompt), TEXTS * 4)
                     for ids in part]
    assert token_ids[:3] == model.tokenize(TEXTS, prompt)
    context = model.context(dataset)
    got = context.encode_tokens(token_ids, batch_size=BATCH)
    want = context.encode_document(TEXTS * 4, batch_size=BATCH)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="index 0 is list, not str"):  # no type sniffing
        context.encode(token_ids)


def test_a_second_model_of_the_same_architecture_compiles_nothing(synthetic, random_docs):
    """Other weights, same architecture (a fine-tuned copy, another checkpoint): the stage
    programs compiled for the first model run the second one's parameters."""
    from cde_jax.profiling import count_compiles

    docs = random_docs[:12]
    first = cde_jax.load(synthetic(seed=3)[1])
    want = first.encode_document(docs, dataset_embeddings=first.embed_minicorpus(
        docs, batch_size=BATCH), batch_size=BATCH)
    other = cde_jax.load(synthetic(seed=4)[1])
    with count_compiles() as compiles:
        got = other.encode_document(docs, dataset_embeddings=other.embed_minicorpus(
            docs, batch_size=BATCH), batch_size=BATCH)
    assert compiles.count == 0
    assert other.fingerprint != first.fingerprint and np.abs(got - want).max() > 1e-3
    assert np.isfinite(got).all()
