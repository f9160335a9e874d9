"""Texts for the CLI, streamed from `.txt` (one per line), `.jsonl` (a string field of one JSON
object per line) or `.parquet` (a string column, needs pyarrow): one line or batch in memory.

`scan` is the validating pass made before anything is written: it counts the texts, hashes
the file (the key a resumed run must match) and fails on the first bad line, naming its
1-based number, so bad input never leaves a partial output behind. Empty `.txt` lines are
texts (embedded like any other), so row i of an output is line i + 1 of the input.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .validation import UserError

PARQUET_BATCH_ROWS = 4096


class InputError(UserError):
    """An input file the user can fix (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Scan:
    count: int
    sha256: str  # of the file's bytes
    stat: tuple[int, int]  # (size, mtime_ns) when scanned: `check_unchanged` compares it


def scan(path: str | Path, field: str = "text") -> Scan:
    """Validates every text and counts them (one pass), then hashes the file (another)."""
    path = Path(path)
    stat = _stat(path)
    count = sum(1 for _ in iter_texts(path, field))
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    scanned = Scan(count, digest.hexdigest(), stat)
    check_unchanged(path, scanned)
    return scanned


def check_unchanged(path: str | Path, scanned: Scan) -> None:
    """Refuses to go on with results from a file that was modified since it was scanned."""
    if _stat(Path(path)) != scanned.stat:
        raise InputError(f"{path}: modified while it was being read; run again")


def iter_texts(path: str | Path, field: str = "text") -> Iterator[str]:
    """The texts in file order (`field` names the JSONL key or parquet column)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise InputError(f"{path}: unknown input format {suffix or '(no suffix)'!r}; use "
                         f"{', '.join(sorted(_READERS))}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _READERS[suffix](path, field)


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def lines(path: Path, progress: Callable[[int], object] | None = None
          ) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) split on "\\n" only, without "\\n" / "\\r\\n" or a BOM;
    `progress(bytes)` is called for each line read."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if progress is not None:
                progress(len(raw))
            line = raw.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: line {number}: not UTF-8 ({e.reason} at byte "
                                 f"{e.start})") from None


def _txt(path: Path, field: str) -> Iterator[str]:
    for _, line in lines(path):
        yield line


_JSON_TYPES = {dict: "an object", list: "an array", type(None): "null", bool: "a boolean",
               int: "a number", float: "a number"}


def _jsonl(path: Path, field: str) -> Iterator[str]:
    for number, line in lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {number}: not valid JSON ({e.msg} at column "
                             f"{e.colno})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number}: expected a JSON object, got "
                             f"{_JSON_TYPES[type(record)]}")
        if field not in record:
            raise InputError(f"{path}: line {number}: no field {field!r} (fields: "
                             f"{', '.join(sorted(record)) or 'none'})")
        text = record[field]
        if not isinstance(text, str):
            raise InputError(f"{path}: line {number}: field {field!r} is "
                             f"{_JSON_TYPES[type(text)]}, not a string")
        yield text


def _parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                         "which is not installed") from None
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    with parquet:
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise InputError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)})")
        kind = schema.field(field).type
        if pa.types.is_dictionary(kind):  # e.g. a pandas categorical column
            kind = kind.value_type
        if str(kind) not in ("string", "large_string", "string_view"):
            raise InputError(f"{path}: column {field!r} holds {kind}, not strings")
        row = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise InputError(f"{path}: row {row}: column {field!r} is null")
                yield text


_READERS = {".txt": _txt, ".jsonl": _jsonl, ".parquet": _parquet}
