"""Tokenization with the checkpoint's `tokenizer.json` (the `tokenizers` library): batched,
truncated at 512 tokens with a counted warning, padded on the right with the pad id."""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import validation

log = logging.getLogger(__name__)

MAX_LENGTH = 512


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no tokenizer.json")
    return Tokenizer.from_file(str(file))


def instruction_end_id(tokenizer: Tokenizer) -> int:
    """The id that ends a task prefix: the first token of `": "` (docs/model.md §6)."""
    return tokenizer.encode(": ", add_special_tokens=False).ids[0]


def packaged_data(name: str) -> Path:
    """A file or folder shipped in `cde_jax/data` (the ModernBERT tokenizer, random_docs.txt)."""
    return Path(str(importlib.resources.files("cde_jax") / "data" / name))


def pad_batch(token_ids: Sequence[Sequence[int]], rows: np.ndarray, length: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The one batch builder: (ids, mask) int32 (len(rows), length) holding `token_ids[i]`
    for each row index i, right-padded with `pad_id`; a row index of -1 is an empty row."""
    ids_bs = np.full((len(rows), length), pad_id, np.int32)
    mask_bs = np.zeros((len(rows), length), np.int32)
    for r, i in enumerate(rows):
        if i >= 0:
            ids_bs[r, :len(token_ids[i])] = token_ids[i]
            mask_bs[r, :len(token_ids[i])] = 1
    return ids_bs, mask_bs


class TextTokenizer:
    """Texts -> token id lists ([CLS] ... [SEP]) -> right-padded (ids, mask) arrays."""

    def __init__(self, tokenizer: Tokenizer, *, pad_id: int, max_length: int = MAX_LENGTH):
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # own copy: settings below
        self.tokenizer.no_padding()
        self.pad_id, self.max_length = pad_id, max_length
        self.truncated = 0       # texts cut at max_length, all calls together (training)
        self.last_truncated = 0  # texts cut by the last `encode` call

    @property
    def max_length(self) -> int:
        """Tokens per text, [CLS] and [SEP] included; longer texts are cut."""
        return self._max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        self._max_length = value
        self.tokenizer.enable_truncation(value)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids ([CLS] ... [SEP]) per text; a warning per call counts the texts of
        this call that were cut at `max_length`."""
        encodings = self.tokenizer.encode_batch(validation.texts(texts))
        self.last_truncated = sum(1 for e in encodings if e.overflowing)
        if self.last_truncated:
            self.truncated += self.last_truncated
            log.warning("%d of %d text(s) truncated to %d tokens", self.last_truncated,
                        len(encodings), self.max_length)
        return [e.ids for e in encodings]

    def pad(self, ids: list[list[int]], length: int | None = None):
        """(ids, mask) int32 arrays of shape (len(ids), length or the longest)."""
        longest = max(map(len, ids), default=0)
        length = length or longest
        if longest > length:
            raise ValueError(f"a sequence of {longest} tokens does not fit length {length}")
        return pad_batch(ids, np.arange(len(ids)), length, self.pad_id)

    def __call__(self, texts: list[str], length: int | None = None):
        return self.pad(self.encode(texts), length)
