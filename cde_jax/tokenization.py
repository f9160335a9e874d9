"""Tokenization with the checkpoint's `tokenizer.json` (the `tokenizers` library): batched,
truncated at 512 tokens with a counted warning, padded on the right with the pad id."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from . import validation

log = logging.getLogger(__name__)

MAX_LENGTH = 512


@contextlib.contextmanager
def quiet_truncation():
    """No per-call truncation warning inside the block: for callers that count cut texts
    themselves (training reports totals, the server counts them in /metrics)."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no tokenizer.json")
    return Tokenizer.from_file(str(file))


def instruction_end_id(tokenizer: Tokenizer) -> int:
    """The id that ends a task prefix: the first token of `": "` (docs/model.md §6)."""
    return tokenizer.encode(": ", add_special_tokens=False).ids[0]


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
    """Texts -> token id lists ([CLS] ... [SEP]) -> right-padded (ids, mask) arrays.

    Safe to share between threads (the corpus job tokenizes in its reader threads): the
    length a call cuts at is an argument, never a setting one call changes under another.
    The `tokenizers` library holds truncation as a setting of a `Tokenizer`, so there is one
    private copy per length, made on first use."""

    def __init__(self, tokenizer: Tokenizer, *, pad_id: int, max_length: int = MAX_LENGTH):
        self.tokenizer = tokenizer
        self.pad_id, self.max_length = pad_id, max_length  # max_length: the default cut
        self.truncated = 0  # texts cut, all calls together (training reports the total)
        self._lock = threading.Lock()
        self._by_length: dict[int, Tokenizer] = {}

    def _cutting_at(self, max_length: int) -> Tokenizer:
        with self._lock:
            if max_length not in self._by_length:
                copy = Tokenizer.from_str(self.tokenizer.to_str())
                copy.no_padding()
                copy.enable_truncation(max_length)
                self._by_length[max_length] = copy
            return self._by_length[max_length]

    def encode(self, texts: list[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids ([CLS] ... [SEP]) per text, cut at `max_length` (default: the
        tokenizer's); a warning per call counts the texts of this call that were cut."""
        return self.encode_with_cuts(texts, max_length)[0]

    def encode_with_cuts(self, texts: list[str], max_length: int | None = None
                         ) -> tuple[list[list[int]], list[int]]:
        """`encode`, and the indices of the texts it cut (a server refuses those when a
        request asks not to truncate)."""
        max_length = max_length or self.max_length
        encodings = self._cutting_at(max_length).encode_batch(validation.texts(texts))
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:
            with self._lock:
                self.truncated += len(cut)
            log.warning("%d of %d text(s) truncated to %d tokens", len(cut), len(encodings),
                        max_length)
        return [e.ids for e in encodings], cut

    def pad(self, ids: list[list[int]], length: int | None = None):
        """(ids, mask) int32 arrays of shape (len(ids), length or the longest)."""
        longest = max(map(len, ids), default=0)
        length = length or longest
        if longest > length:
            raise ValueError(f"a sequence of {longest} tokens does not fit length {length}")
        return pad_batch(ids, np.arange(len(ids)), length, self.pad_id)

    def __call__(self, texts: list[str], length: int | None = None):
        return self.pad(self.encode(texts), length)
