"""A corpus file as fixed chunks of `chunk_rows` consecutive records, readable in any order.

Formats: `.txt` (one text a line, empty lines included, so record i is line i), `.jsonl` (a
string field of one JSON object a line) and `.parquet` (a string column; needs pyarrow).
Chunk i holds records [i * R, (i + 1) * R). The index that makes a chunk readable on its own
is built from bytes only, the same way by every process: for .txt/.jsonl the byte offset
where each chunk's first line starts (one pass over newline positions in large binary
blocks, which also hashes the file), for .parquet the row counts of its row groups.
Decoding, JSON parsing and validation happen when a chunk is read, by the process that
reads it; errors name the file and the 1-based line (or parquet row).

Ids: with `id_field`, each record's value of that field (a string or an integer, all of one
kind: the kind of record 1's id, or of the parquet column); without it, the 1-based line
(or row) number: what the user can look up.

A chunk source is a Grain random-access source (`len`, `__getitem__` -> `Chunk`) and is
picklable (a path and a tuple of offsets), so Grain can prefetch chunks in threads.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..validation import UserError, json_kind, json_object

BLOCK_BYTES = 1 << 24
FORMATS = (".jsonl", ".parquet", ".txt")
INT64 = range(-(1 << 63), 1 << 63)


class InputError(UserError):
    """An input file the user can fix (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    index: int
    ids: list  # of int, or of str
    texts: list[str]


def lines(path: Path, progress: Callable[[int], object] | None = None
          ) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) split on "\\n" only, without "\\n" / "\\r\\n" or a BOM;
    `progress(bytes)` is called for each line read."""
    with open(input_file(path), "rb") as f:
        for number, raw in enumerate(f, 1):
            if progress is not None:
                progress(len(raw))
            yield number, _decode(path, number, raw.removesuffix(b"\n"))


@dataclasses.dataclass(frozen=True)
class TextChunks:
    """Chunks of a .txt or .jsonl file."""

    path: str
    jsonl: bool  # else .txt
    chunk_rows: int
    field: str
    id_field: str | None
    rows: int
    offsets: tuple[int, ...]  # byte offset of each chunk's first line, then the file size
    sha256: str
    stat: tuple[int, int]  # (size, mtime_ns) when indexed: a read refuses a changed file
    id_kind: str  # "int" or "str"

    unit = "line"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, chunk: int) -> Chunk:
        start, stop = self.offsets[chunk], self.offsets[chunk + 1]
        with open(self.path, "rb") as f:
            _check_unchanged(self.path, self.stat, os.fstat(f.fileno()))
            f.seek(start)
            raw = f.read(stop - start).split(b"\n")
        if raw[-1] == b"":  # the chunk's last line ended with "\n"
            raw.pop()
        first = chunk * self.chunk_rows + 1
        if len(raw) != min(self.chunk_rows, self.rows - first + 1):
            raise InputError(f"{self.path}: modified while it was being read; run again")
        ids, texts = [], []
        for number, line in enumerate(raw, first):
            text, record_id = _decode(self.path, number, line), number
            if self.jsonl:
                text, found = _json_record(self.path, number, text, self.field, self.id_field)
                record_id = number if found is None else found
            ids.append(record_id)
            texts.append(text)
        if self.id_field is not None:
            _check_ids(self, first, ids)
        return Chunk(chunk, ids, texts)


@dataclasses.dataclass(frozen=True)
class ParquetChunks:
    """Chunks of a .parquet file; a chunk may span row groups and reads only those."""

    path: str
    chunk_rows: int
    field: str
    id_field: str | None
    rows: int
    group_starts: tuple[int, ...]  # first row of each row group, then `rows`
    sha256: str
    stat: tuple[int, int]
    id_kind: str

    unit = "row"

    def __len__(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def __getitem__(self, chunk: int) -> Chunk:
        import pyarrow.parquet as pq

        start = chunk * self.chunk_rows
        stop = min(self.rows, start + self.chunk_rows)
        starts = self.group_starts
        groups = [g for g in range(len(starts) - 1) if starts[g] < stop and starts[g + 1] > start]
        columns = [self.field] + ([self.id_field] if self.id_field else [])
        with open(self.path, "rb") as f:
            _check_unchanged(self.path, self.stat, os.fstat(f.fileno()))
            table = pq.ParquetFile(f).read_row_groups(groups, columns=columns)
        table = table.slice(start - starts[groups[0]], stop - start)
        texts = table.column(self.field).to_pylist()
        ids = (table.column(self.id_field).to_pylist() if self.id_field
               else list(range(start + 1, stop + 1)))
        for row, (text, record_id) in enumerate(zip(texts, ids, strict=True), start + 1):
            if text is None:
                raise InputError(f"{self.path}: row {row}: column {self.field!r} is null")
            if record_id is None:
                raise InputError(f"{self.path}: row {row}: column {self.id_field!r} is null")
            if self.id_kind == "int" and record_id not in INT64:
                raise InputError(f"{self.path}: row {row}: id {record_id} does not fit int64")
        if self.id_field is not None:
            _check_ids(self, start + 1, ids)
        return Chunk(chunk, ids, texts)


Source = TextChunks | ParquetChunks


def open_chunks(path: str | Path, chunk_rows: int, *, field: str = "text",
                id_field: str | None = None) -> Source:
    """Indexes `path` into chunks of `chunk_rows` records (one pass over the file)."""
    if chunk_rows < 1:
        raise UserError(f"chunk_rows must be >= 1, got {chunk_rows}")
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: unknown input format {suffix or '(no suffix)'!r}; use "
                         f"{', '.join(FORMATS)}")
    if suffix == ".txt" and id_field is not None:
        raise InputError(f"{path}: a .txt file has no fields; its ids are line numbers")
    input_file(path)
    if suffix == ".parquet":
        return _index_parquet(path, chunk_rows, field, id_field)
    return _index_text(path, suffix == ".jsonl", chunk_rows, field, id_field)


def _index_text(path: str, jsonl: bool, chunk_rows: int, field: str,
                id_field: str | None) -> TextChunks:
    """Chunk offsets from newline positions: line k starts after the k-th "\\n", so chunk c
    starts after newline number c * R. A last line without "\\n" is a line; a final "\\n"
    does not start one (as `lines` counts)."""
    digest = hashlib.sha256()
    starts, newlines, size, last = [0], 0, 0, b"\n"
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
            found = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
            first = -(newlines + 1) % chunk_rows  # index in `found` of newline number c * R
            starts.extend((size + found[first::chunk_rows] + 1).tolist())
            newlines, size, last = newlines + len(found), size + len(block), block[-1:]
    rows = newlines + (last != b"\n")
    id_kind = "int"
    if id_field is not None and rows:
        with open(path, "rb") as f:
            first_line = _decode(path, 1, f.readline().removesuffix(b"\n"))
        _, record_id = _json_record(path, 1, first_line, field, id_field)
        id_kind = "str" if isinstance(record_id, str) else "int"
    return TextChunks(path, jsonl, chunk_rows, field, id_field, rows,
                      tuple(starts[:-(-rows // chunk_rows)]) + (size,), digest.hexdigest(),
                      (stat.st_size, stat.st_mtime_ns), id_kind)


def _index_parquet(path: str, chunk_rows: int, field: str, id_field: str | None
                   ) -> ParquetChunks:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                         "which is not installed") from None
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        digest = _sha256(f)
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowException as e:
            raise InputError(f"{path}: not a readable parquet file ({e})") from None
        schema, meta = parquet.schema_arrow, parquet.metadata
    counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    kinds = {}
    for name, role in ((field, "text"), (id_field, "id")):
        if name is None:
            continue
        if name not in schema.names:
            raise InputError(f"{path}: no column {name!r} (columns: {', '.join(schema.names)})")
        kind = schema.field(name).type
        if pa.types.is_dictionary(kind):  # e.g. a pandas categorical column
            kind = kind.value_type
        if str(kind) in ("string", "large_string", "string_view"):
            kinds[role] = "str"
        elif pa.types.is_integer(kind) and role == "id":
            kinds[role] = "int"
        else:
            wanted = "strings" if role == "text" else "strings or integers"
            raise InputError(f"{path}: column {name!r} holds {kind}, not {wanted}")
    return ParquetChunks(path, chunk_rows, field, id_field, int(sum(counts)),
                         tuple(np.cumsum([0] + counts).tolist()), digest,
                         (stat.st_size, stat.st_mtime_ns), kinds.get("id", "int"))


def input_file(path: str | Path) -> str | Path:
    """`path`, when it is a file: a directory or nothing there is a one-line error."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes: how the processes of a run tell that they read the same
    file (`distributed.agree`). A file that cannot be read is an `InputError`."""
    try:
        with open(input_file(path), "rb") as f:
            return _sha256(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None


def _sha256(f) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(BLOCK_BYTES), b""):
        digest.update(block)
    return digest.hexdigest()


def _check_unchanged(path: str, indexed: tuple[int, int], now: os.stat_result) -> None:
    if (now.st_size, now.st_mtime_ns) != indexed:
        raise InputError(f"{path}: modified while it was being read; run again")


def _decode(path, number: int, line: bytes) -> str:
    """One line without "\\r" (and the BOM on line 1)."""
    line = line.removesuffix(b"\r")
    if number == 1:
        line = line.removeprefix(codecs.BOM_UTF8)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: line {number}: not UTF-8 ({e.reason} at byte "
                         f"{e.start})") from None


def json_record(path, number: int, line: str) -> dict:
    """One JSONL line as an object; errors name the file and line. Every JSONL reader of
    the package (corpora, training data, BEIR datasets) parses its lines with this."""
    try:
        return json_object(line)
    except UserError as e:
        raise InputError(f"{path}: line {number}: {e}") from None


def jsonl_records(path: Path, progress: Callable[[int], object] | None = None
                  ) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) of every non-blank line of a .jsonl file."""
    for number, line in lines(path, progress):
        if line.strip():
            yield number, json_record(path, number, line)


def _json_record(path: str, number: int, line: str, field: str,
                 id_field: str | None) -> tuple[str, int | str | None]:
    """(text, id or None) of one JSONL line; errors name the line."""
    where = f"{path}: line {number}"
    record = json_record(path, number, line)
    for name in (field, id_field):
        if name is not None and name not in record:
            raise InputError(f"{where}: no field {name!r} (fields: "
                             f"{', '.join(sorted(record)) or 'none'})")
    text = record[field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} is {json_kind(text)}, not a string")
    if id_field is None:
        return text, None
    record_id = record[id_field]
    if type(record_id) not in (int, str):  # a bool is not an id
        raise InputError(f"{where}: id field {id_field!r} is {json_kind(record_id)}, "
                         "not a string or an integer")
    if isinstance(record_id, int) and record_id not in INT64:
        raise InputError(f"{where}: id {record_id} does not fit int64")
    return text, record_id


def _check_ids(source: Source, first: int, ids: list) -> None:
    """Ids of one chunk: all of the file's kind, none repeated within the chunk (repeats
    across chunks: `find_repeats`)."""
    kind = str if source.id_kind == "str" else int
    for number, record_id in enumerate(ids, first):
        if not isinstance(record_id, kind):
            raise InputError(f"{source.path}: {source.unit} {number}: id {record_id!r} is "
                             f"{json_kind(record_id)}, but {source.unit} 1's is "
                             f"{json_kind(kind())} (ids must be all strings or all integers)")
    check_unique(source, ids, first_row=first - 1)


def check_unique(source: Source, ids, first_row: int = 0) -> None:
    """Fails on the first repeated id (in row order), naming both lines or rows."""
    seen: dict = {}
    for row, record_id in enumerate(ids, first_row):
        earlier = seen.setdefault(record_id, row)
        if earlier != row:
            raise InputError(f"{source.path}: {source.unit} {row + 1}: id {record_id!r} "
                             f"repeats {source.unit} {earlier + 1}'s")


def id_hashes(ids: list) -> np.ndarray:
    """64-bit digests of ids (uint64): how processes compare ids without exchanging them."""
    return np.array([int.from_bytes(hashlib.blake2b(repr(i).encode(), digest_size=8).digest(),
                                    "little") for i in ids], np.uint64)
