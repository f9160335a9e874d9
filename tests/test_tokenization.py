"""Our tokenization equals transformers.AutoTokenizer on the real ModernBERT tokenizer."""

import logging

import numpy as np
import pytest
import transformers
from conftest import TOKENIZER_DIR

from cde_jax.tokenization import TextTokenizer, instruction_end_id, load_tokenizer


@pytest.fixture(scope="module")
def pair():
    ours = TextTokenizer(load_tokenizer(TOKENIZER_DIR), pad_id=50283)
    return ours, transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_prefixed_texts_match_autotokenizer(pair, random_docs):
    ours, hf = pair
    texts = (["search_query: " + d for d in random_docs[:40]]
             + ["search_document: " + d for d in random_docs[40:80]]
             + ["clustering: ünïcödé — text", "classification: ", "", "  spaces  ",
                "search_query: " + "long " * 700])
    ids, mask = ours(texts)
    ref = hf(texts, padding=True, truncation=True, max_length=512, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_truncation_is_counted_and_warned(pair, caplog):
    ours, _ = pair
    before = ours.truncated
    with caplog.at_level(logging.WARNING):
        ids = ours.encode(["word " * 600, "short"])
    assert [len(x) for x in ids] == [512, 3]
    assert ours.truncated == before + 1
    assert "truncated to 512 tokens" in caplog.text


def test_instruction_end_id_is_colon(pair):
    assert instruction_end_id(load_tokenizer(TOKENIZER_DIR)) == 27


def test_non_string_is_named(pair):
    with pytest.raises(TypeError, match="index 1 is int"):
        pair[0].encode(["ok", 5])
