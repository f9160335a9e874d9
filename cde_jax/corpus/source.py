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

import atexit
import codecs
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .. import distributed, storage
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
    with storage.open_file(input_file(path)) as f:
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
    stat: tuple  # (size, mtime_ns), or a URL's (size, version): a read refuses a changed file
    id_kind: str  # "int" or "str"
    share: Share | None = None  # a URL: this process's bytes, fetched once when indexing

    unit = "line"

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def owner(self, chunk: int, n: int) -> int:
        """The process (of `n`) that reads and embeds `chunk`: the one whose byte range
        (`Share`) holds the chunk's first byte, so that a process of a run on a URL reads
        its own bytes once, when it indexes them."""
        return min(n - 1, self.offsets[chunk] * n // max(1, self.offsets[-1]))

    def __getitem__(self, chunk: int) -> Chunk:
        start, stop = self.offsets[chunk], self.offsets[chunk + 1]
        if storage.is_url(self.path):
            _check_unchanged(self.path, self.stat, _remote_stamp(self.path))
            raw = Share.read(self.share, self.path, start, stop).split(b"\n")
        else:
            with open(self.path, "rb") as f:
                _check_unchanged(self.path, self.stat, _local_stamp(f))
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
    stat: tuple
    id_kind: str

    unit = "row"

    def __len__(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def owner(self, chunk: int, n: int) -> int:
        """The process (of `n`) that reads and embeds `chunk`: contiguous runs of chunks."""
        return chunk * n // len(self)

    def __getitem__(self, chunk: int) -> Chunk:
        import pyarrow.parquet as pq

        start = chunk * self.chunk_rows
        stop = min(self.rows, start + self.chunk_rows)
        starts = self.group_starts
        groups = [g for g in range(len(starts) - 1) if starts[g] < stop and starts[g + 1] > start]
        columns = [self.field] + ([self.id_field] if self.id_field else [])
        with storage.open_file(self.path) as f:
            _check_unchanged(self.path, self.stat, _stamp(self.path, f))
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
    if storage.is_url(path):
        return _index_remote_text(path, suffix == ".jsonl", chunk_rows, field, id_field)
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
    id_kind = _id_kind(path, rows, field, id_field)
    return TextChunks(path, jsonl, chunk_rows, field, id_field, rows,
                      tuple(starts[:-(-rows // chunk_rows)]) + (size,), digest.hexdigest(),
                      (stat.st_size, stat.st_mtime_ns), id_kind)


def _id_kind(path: str, rows: int, field: str, id_field: str | None,
             share: Share | None = None) -> str:
    """"str" or "int": the kind of line 1's id (int without ids). Of a URL, only line 1's
    bytes are read (from `share` where it holds them)."""
    if id_field is None or not rows:
        return "int"
    if storage.is_url(path):
        size, head = storage.info(path)["size"], b""
        for stop in (min(size, 256 << k) for k in range(64)):
            head = Share.read(share, path, 0, stop)
            if b"\n" in head or stop == size:
                break
        line = head.split(b"\n", 1)[0]
    else:
        with open(path, "rb") as f:
            line = f.readline().removesuffix(b"\n")
    first_line = _decode(path, 1, line)
    _, record_id = _json_record(path, 1, first_line, field, id_field)
    return "str" if isinstance(record_id, str) else "int"


def _index_remote_text(path: str, jsonl: bool, chunk_rows: int, field: str,
                       id_field: str | None) -> TextChunks:
    """`_index_text` of a URL by every process of the run together: each fetches only its
    `Share` of the bytes (kept on local disk for its chunks), finds the newlines in it, and
    the processes exchange their counts and chunk starts (`distributed.concat_all`). The
    object's version stands for the file's digest: the same object, the same run."""
    found = storage.info(path)
    size, n, p = found["size"], distributed.process_count(), distributed.process_index()
    share = Share.fetch(path, size * p // n, size * (p + 1) // n)
    newlines = share.newlines()
    counts = _concat_int64(np.asarray([len(newlines)], np.int64))
    before, total = int(counts[:p].sum()), int(counts.sum())
    # Newline number g (0-based, in the file) ends line g + 1: chunk c starts after g = cR - 1.
    ending = (before + np.arange(len(newlines)) + 1) % chunk_rows == 0
    starts = _concat_int64(share.start + newlines[ending] + 1)
    last = storage.filesystem(path).cat_file(path, start=size - 1, end=size) if size else b"\n"
    rows = total + (last != b"\n")
    offsets = (0, *starts.tolist()[:-(-rows // chunk_rows) - 1], size)
    chunks = TextChunks(path, jsonl, chunk_rows, field, id_field, rows, offsets,
                        f"{found['version']} ({size} bytes)", (size, found["version"]),
                        _id_kind(path, rows, field, id_field, share))
    # This process's last chunk ends past its share, before the next one's first chunk:
    # those bytes join the share, so that reading its chunks fetches nothing more.
    mine = [c for c in range(len(chunks)) if chunks.owner(c, n) == p]
    end = offsets[mine[-1] + 1] if mine else share.stop
    return dataclasses.replace(chunks, share=share.extended(path, max(end, share.stop)))


def _concat_int64(values: np.ndarray) -> np.ndarray:
    """`distributed.concat_all` of int64 values (byte offsets past 2 GiB): JAX gathers 32-bit
    integers unless x64 is on, so the high and low 31 bits travel apart."""
    values = np.asarray(values, np.int64)
    high = distributed.concat_all((values >> 31).astype(np.int32)).astype(np.int64)
    low = distributed.concat_all((values & 0x7FFFFFFF).astype(np.int32)).astype(np.int64)
    return (high << 31) | low


@dataclasses.dataclass(frozen=True)
class Share:
    """Bytes [start, stop) of a URL, fetched once (in BLOCK_BYTES reads) into a local file
    that later chunk reads take them from; bytes outside it are fetched when read."""

    start: int
    stop: int
    local: str

    @classmethod
    def fetch(cls, url: str, start: int, stop: int) -> Share:
        fd, local = tempfile.mkstemp(prefix="cde-jax-share-")
        atexit.register(lambda: os.path.exists(local) and os.unlink(local))
        fs = storage.filesystem(url)
        with os.fdopen(fd, "wb") as out:
            for at in range(start, stop, BLOCK_BYTES):
                out.write(fs.cat_file(url, start=at, end=min(stop, at + BLOCK_BYTES)))
        return cls(start, stop, local)

    def extended(self, url: str, stop: int) -> Share:
        """This share with bytes [self.stop, stop) fetched and appended."""
        if stop > self.stop:
            with open(self.local, "ab") as out:
                out.write(storage.filesystem(url).cat_file(url, start=self.stop, end=stop))
        return dataclasses.replace(self, stop=stop)

    def newlines(self) -> np.ndarray:
        """Offsets, from `start`, of the newlines in the share."""
        found, at = [], 0
        with open(self.local, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                found.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + at)
                at += len(block)
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    @staticmethod
    def read(share: Share | None, url: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of `url`: what `share` holds from its file, the rest fetched."""
        if share is None or stop <= share.start or start >= share.stop:
            return storage.filesystem(url).cat_file(url, start=start, end=stop)
        parts = []
        if start < share.start:
            parts.append(storage.filesystem(url).cat_file(url, start=start, end=share.start))
        with open(share.local, "rb") as f:
            f.seek(max(start, share.start) - share.start)
            parts.append(f.read(min(stop, share.stop) - max(start, share.start)))
        if stop > share.stop:
            parts.append(storage.filesystem(url).cat_file(url, start=share.stop, end=stop))
        return b"".join(parts)


def _index_parquet(path: str, chunk_rows: int, field: str, id_field: str | None
                   ) -> ParquetChunks:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                         "which is not installed") from None
    with storage.open_file(path) as f:
        stat = _stamp(path, f)
        # A URL's version stands for its digest (reading it all is what a share avoids).
        digest = (f"{stat[1]} ({stat[0]} bytes)" if storage.is_url(path) else _sha256(f))
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
                         tuple(np.cumsum([0] + counts).tolist()), digest, stat,
                         kinds.get("id", "int"))


def input_file(path: str | Path) -> str | Path:
    """`path`, when it is a file: a directory or nothing there is a one-line error."""
    if storage.is_url(path):
        if storage.info(str(path))["type"] == "directory":
            raise InputError(f"{path}: is a directory, not a file")
        return path
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes: how the processes of a run tell that they read the same
    file (`distributed.agree`). A file that cannot be read is an `InputError`. A URL's
    version (GCS generation, S3 ETag) and size stand for its bytes: not read again."""
    if storage.is_url(path):
        found = storage.info(str(input_file(path)))
        return f"{found['version']} ({found['size']} bytes)"
    try:
        with storage.open_file(input_file(path)) as f:
            return _sha256(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None


def _sha256(f) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(BLOCK_BYTES), b""):
        digest.update(block)
    return digest.hexdigest()


def _local_stamp(f) -> tuple[int, int]:
    stat = os.fstat(f.fileno())
    return stat.st_size, stat.st_mtime_ns


def _remote_stamp(url: str) -> tuple[int, str]:
    found = storage.info(url)
    return found["size"], found["version"]


def _stamp(path: str, f) -> tuple:
    """What tells that a file changed: its (size, mtime_ns), or a URL's (size, version)."""
    return _remote_stamp(path) if storage.is_url(path) else _local_stamp(f)


def _check_unchanged(path: str, indexed: tuple, now: tuple) -> None:
    if tuple(now) != tuple(indexed):
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
