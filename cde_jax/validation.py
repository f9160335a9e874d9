"""Checks on what users hand to cde_jax, written once: texts, token arrays, embedding rows.

Each check fails with a message naming what is wrong (the index, row, column or value) and
returns the value in the form the model needs, so callers validate and convert in one step.
`UserError` marks errors a user can fix from the message alone: the CLI prints those in one
line (exit 2) and lets every other exception, a bug, show its traceback.
"""

from __future__ import annotations

import json

import numpy as np


class UserError(ValueError):
    """Bad input, arguments or files: the message says what to fix."""


_JSON_KINDS = {dict: "an object", list: "an array", type(None): "null", bool: "a boolean",
               int: "a number", float: "a number", str: "a string"}


def json_kind(value) -> str:
    """What a decoded JSON value is, in JSON's words ("an array", not "list")."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def json_object(line: str) -> dict:
    """One line of a .jsonl file as a dict. The message says what is wrong; the caller adds
    where (file and line), in its own format."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, got {json_kind(record)}")
    if "\\u" in line:  # only an escape ("\ud800") can make a lone surrogate
        _no_lone_surrogate(record)
    return record


def _no_lone_surrogate(record: dict) -> None:
    """A lone UTF-16 surrogate (an unpaired "\\ud800" escape) is not text: UTF-8 cannot hold
    it and the tokenizer refuses it. Refused here, by field, so that the readers that check
    every line first (corpora, training data, BEIR) refuse it before any output exists."""
    for key, value in record.items():
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"field {key!r} holds a lone surrogate "
                            f"(\\u{ord(e.object[e.start]):04x}), which is not text") from None


def texts(values, what: str = "text") -> list[str]:
    """A list of str; a lone str is refused (it would iterate as characters)."""
    if isinstance(values, str):
        raise TypeError("expected a list of texts, got one str (wrap it in a list)")
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{what} at index {i} is {type(value).__name__}, not str")
    return values


def int_in_range(value, what: str, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in [low, high] (no upper bound when high is None); a bool, a float
    or a value outside the range is refused, naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise UserError(f"{what} must be {bounds}, got {value}")
    return int(value)


def finite_rows(rows_nd: np.ndarray, what: str, first: int = 0) -> np.ndarray:
    """`rows_nd` unchanged when every value is finite; else the first bad rows (offset by
    `first`, for a chunk of a larger array) are named."""
    bad = np.flatnonzero(~np.isfinite(rows_nd).all(axis=1))
    if bad.size:
        raise UserError(f"{what} have non-finite values in row(s) {(bad[:10] + first).tolist()}")
    return rows_nd


def embedding_rows(values, what: str, width: int | None = None) -> np.ndarray:
    """A non-empty (n, width) float32 array with finite values; (1, n, width) is accepted
    (upstream's batched form) and squeezed."""
    rows_nd = np.asarray(values, dtype=np.float32)
    if rows_nd.ndim == 3 and rows_nd.shape[0] == 1:
        rows_nd = rows_nd[0]
    want = f"(n, {width})" if width else "(n, d)"
    if rows_nd.ndim != 2 or (width is not None and rows_nd.shape[1] != width):
        raise UserError(f"{what} must be {want}, got shape {np.shape(values)}")
    if rows_nd.shape[0] == 0:
        raise UserError(f"{what} are empty (0 rows)")
    return finite_rows(rows_nd, what)


def token_arrays(input_ids, attention_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) as int32 (b, s) arrays: ids in [0, vocab_size), mask of 0/1, s >= 1.
    Checked on the host because on a device an out-of-range id silently becomes another
    token (negative), token 0 (an int64 cut to int32) or NaN (past the table)."""
    ids_bs, mask_bs = np.asarray(input_ids), np.asarray(attention_mask)
    for name, array in (("input_ids", ids_bs), ("attention_mask", mask_bs)):
        if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer)
                                   or array.dtype == bool):
            raise UserError(f"{name} must be a 2-D integer array, got {array.dtype} "
                            f"{array.shape}")
    if mask_bs.shape != ids_bs.shape:
        raise UserError(f"attention_mask has shape {mask_bs.shape}, input_ids has "
                        f"{ids_bs.shape}")
    if ids_bs.shape[1] == 0:
        raise UserError(f"input_ids of shape {ids_bs.shape}: sequences must have at least "
                        "one token")
    _in_range("input_ids", ids_bs, 0, vocab_size - 1)
    _in_range("attention_mask", mask_bs, 0, 1)
    return ids_bs.astype(np.int32), mask_bs.astype(np.int32)


def _in_range(name: str, array_bs: np.ndarray, low: int, high: int) -> None:
    bad_bs = (array_bs < low) | (array_bs > high)
    if bad_bs.any():
        row, col = np.argwhere(bad_bs)[0]
        raise UserError(f"{name}[{row}, {col}] = {array_bs[row, col]} is outside the valid "
                        f"range [{low}, {high}] ({int(bad_bs.sum())} such value(s))")
