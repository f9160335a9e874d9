"""One embedding output written chunk by chunk, by any number of processes, resumable after
any of them is killed (even with SIGKILL).

Every sink has the same life: `open_sink(path, rows, width, chunk_rows, key, id_kind)`, then
`done_chunks()` (exact: a chunk is listed only once its rows and ids are durable),
`write_chunk(i, ids, values)` (atomic: a killed write leaves chunk i not done, and writing
it again is harmless), `ids()` (all ids in row order, for the duplicate check) and
`finish()` (one process, after every chunk is done). `key` names everything the bytes depend
on (input, model, arguments); the process count is not part of it, so a run resumes with
any number of processes. `quantization` (`cde_jax.quantize`) says how values are stored:
float32 by default (the outputs are then as they were before precisions existed); any other
precision is recorded beside the key (with its calibration ranges), in the zarr attributes,
the parquet schema metadata or an `OUT.quantization.json` sidecar, and must match for a run
to resume. `read_embeddings(path)` reads a finished output of any format, with that record.

- `.zarr` (tensorstore, zarr v3; `gs://` and `s3://` paths work the same): a group whose
  attributes hold the run (`cde_jax`: key, shape, id kind), the (rows, width) float32 array
  `embeddings` chunked by `chunk_rows` rows, so that each work chunk is one storage object
  and processes never write the same one, `ids/<i>.json` per chunk and, once finished, an
  object `complete`. The ids object is written after the chunk's rows and doubles as its
  commit marker. Tensorstore 0.1.86's zarr3 has no string data type, hence JSON ids.
  Every object is written with one value per run (whoever writes it): tensorstore's file
  kvstore reuses a `<key>.__lock` temp file left by a killed writer without truncating it,
  which is harmless only because the stale bytes are then a prefix of the same value.
  A different key is refused, not overwritten: deleting the old run safely needs every
  process to agree first (the real command can do it on process 0 before a barrier).
- `.parquet` (local paths): one part file per chunk in `OUT.parts/` (temp + rename), then
  `finish` concatenates them in chunk order into OUT (one row group per chunk; the key is in
  the schema metadata) and removes the parts. A different key is refused, as for `.zarr`.
- `.npy` (one process): `npy.ResumableArray` (its journal, its start-over on another key),
  plus `OUT.ids.parts/<i>.json` during the run and `OUT.ids.jsonl` (one JSON id per line, in
  row order) when finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import storage
from ..outputs import atomic_file
from ..quantize import Embeddings, Quantization
from ..validation import UserError
from .npy import ResumableArray

FORMATS = (".npy", ".parquet", ".zarr")
GROUP_ATTR = "cde_jax"
_COMMITTED = re.compile(r"(\d+)\.(?:json|parquet)")  # not temp or lock files


class OutputError(UserError):
    """An output that belongs to another run (or is unfinished) where this one was asked for."""


class Sink(Protocol):
    """What the corpus job needs of an output (the module docstring gives the life)."""

    def done_chunks(self) -> set[int]: ...

    def write_chunk(self, chunk: int, ids: list, values: np.ndarray) -> None: ...

    def ids(self) -> list: ...

    def finish(self) -> None: ...


def sink_type(path: str | Path) -> type[ZarrSink | ParquetSink | NpySink]:
    """The class of `path`'s format, from its suffix: the one place that dispatches on it.
    Only a .zarr may be a gs:// or s3:// URL (tensorstore writes it chunk by chunk)."""
    suffix = Path(str(path).rstrip("/")).suffix.lower()
    if suffix not in FORMATS:
        raise OutputError(f"{path}: unknown output format {suffix or '(no suffix)'!r}; use "
                          f"{', '.join(FORMATS)}")
    if storage.is_url(path) and suffix != ".zarr":
        raise OutputError(f"{path}: only .zarr outputs may be in a bucket (gs://, s3://); "
                          f"write {suffix} to a local path")
    return {".zarr": ZarrSink, ".parquet": ParquetSink, ".npy": NpySink}[suffix]


def output_format(path: str | Path) -> str:
    """".npy", ".parquet" or ".zarr", from the path's suffix (refused as `sink_type` says)."""
    return sink_type(path).suffix


def open_sink(path: str | Path, *, rows: int, width: int, chunk_rows: int, key: str,
              id_kind: str, quantization: Quantization | None = None) -> Sink:
    """The sink for `path`'s suffix; every process of a run opens it with the same arguments.
    `width` is the embeddings'; they are stored as `quantization` says (default float32)."""
    return sink_type(path).open(str(path), rows=rows, width=width, chunk_rows=chunk_rows,
                                key=key, id_kind=id_kind, quantization=quantization
                                or Quantization("float32", width))


def read_embeddings(path: str | Path) -> Embeddings:
    """A finished output: its ids (int64, or object for str), its values as stored and their
    `Quantization` (precision, width, calibration ranges). `ids, values = read_embeddings(p)`
    unpacks the first two."""
    ids, values, quantization = sink_type(path).read(str(path))
    if (values.dtype, values.shape[1]) != (quantization.dtype, quantization.stored_width):
        raise OutputError(f"{path}: holds {values.dtype} rows of {values.shape[1]} values; its "
                          f"metadata says {quantization.precision} of width {quantization.width}")
    return Embeddings(_id_array(ids), values, quantization)


def unfinished_run(path: str | Path) -> dict | None:
    """The record an unfinished run left at `path` (its "key" and, unless float32, its
    "quantization"), or None: nothing there, finished, or unreadable (opening the sink then
    starts over or refuses, as it would anyway)."""
    try:
        return sink_type(path).unfinished(str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def exists(path: str | Path) -> bool:
    """Whether a finished output is at `path` (any format)."""
    return sink_type(path).exists(str(path))


def remove(path: str | Path) -> None:
    """Deletes an output and everything an unfinished run left beside it."""
    sink_type(path).remove(str(path))


def embeddings_by_id(path: str | Path, want_ids: list) -> np.ndarray:
    """The rows of a finished output with these ids, in their order: (len(want_ids), d)
    float32. A repeated id in the file, or a wanted id it lacks, is an error naming it."""
    file_ids, values_nd = read_embeddings(path)
    row_of: dict = {}
    for row, record_id in enumerate(file_ids.tolist()):
        if row_of.setdefault(record_id, row) != row:
            raise UserError(f"{path}: id {record_id!r} repeats (rows {row_of[record_id] + 1} "
                            f"and {row + 1})")
    missing = next((i for i in want_ids if i not in row_of), None)
    if missing is not None:
        raise UserError(f"{path}: no vector with id {missing!r}")
    rows = np.array([row_of[i] for i in want_ids], np.int64)
    return values_nd.reshape(len(values_nd), -1)[rows].astype(np.float32)


def _remove_local(path: str) -> None:
    """Deletes a local output and everything an unfinished run left beside it."""
    path = Path(path)
    for p in (path, *(path.with_name(path.name + s) for s in SIDECARS)):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class _Format:
    """What each sink class has besides a sink's life: `open` (every process of a run, with
    the same arguments), and class-level `read`, `exists`, `unfinished` and `remove`."""

    @classmethod
    def open(cls, path: str, **run):
        return cls(path, **run)


class _LocalFormat(_Format):
    """A format whose output is one local file (plus sidecars while unfinished)."""

    @staticmethod
    def exists(path: str) -> bool:
        return Path(path).exists()

    remove = staticmethod(_remove_local)


def _check_local(path: str) -> None:
    """A missing local output: unfinished (a run left its sidecars) or absent."""
    if not Path(path).exists():
        if any(Path(path + s).exists() for s in SIDECARS):
            raise _unfinished(path)
        raise FileNotFoundError(f"{path}: no such output")


# What a run leaves beside OUT while unfinished (`remove` deletes them too).
QUANTIZATION_FILE = ".quantization.json"  # beside a non-float32 .npy
SIDECARS = (".parts", ".ids.parts", ".ids.jsonl", ".partial", ".journal", QUANTIZATION_FILE)


def _id_array(ids: list) -> np.ndarray:
    if ids and isinstance(ids[0], str):
        out = np.empty(len(ids), object)
        out[:] = ids
        return out
    return np.asarray(ids, np.int64)


def _n_chunks(rows: int, chunk_rows: int) -> int:
    return -(-rows // chunk_rows)


def _run(rows: int, width: int, chunk_rows: int, key: str, id_kind: str,
         quantization: Quantization) -> dict:
    return {"key": key, "rows": rows, "width": width, "chunk_rows": chunk_rows,
            "id_kind": id_kind, **_stored_as(quantization)}


def _stored_as(quantization: Quantization) -> dict:
    """The run record's entry for how values are stored: none for float32, so that float32
    outputs (and the runs they resume) are byte for byte what they were before."""
    if quantization.precision == "float32":
        return {}
    return {"quantization": quantization.record()}


def _quantization(record: dict | None, width: int) -> Quantization:
    """A run's stored quantization record (None: float32 of this width) read back."""
    return Quantization("float32", width) if record is None else Quantization.from_record(record)


def _unfinished(path) -> OutputError:
    return OutputError(f"{path}: unfinished (run the same command again to finish it)")


def _refuse(path: str) -> OutputError:
    return OutputError(f"{path}: holds a run with other arguments, input or model; delete it "
                       "or choose another output")


class ZarrSink(_Format):
    """`.zarr`: tensorstore, a local directory or a gs:// / s3:// prefix."""

    suffix = ".zarr"

    def __init__(self, path: str, *, rows: int, width: int, chunk_rows: int, key: str,
                 id_kind: str, quantization: Quantization):
        import tensorstore as ts

        self.path, self.rows, self.chunk_rows = path, rows, chunk_rows
        self.quantization, stored_width = quantization, quantization.stored_width
        self.n_chunks = _n_chunks(rows, chunk_rows)
        self._kv = _kv(path)
        run = _run(rows, width, chunk_rows, key, id_kind, quantization)
        found = self._kv.read(b"zarr.json").result()
        if found.state == "missing":  # process 0, before the others open the sink
            group = {"zarr_format": 3, "node_type": "group", "attributes": {GROUP_ATTR: run}}
            self._kv.write(b"zarr.json", json.dumps(group, sort_keys=True).encode()).result()
        elif json.loads(found.value).get("attributes", {}).get(GROUP_ATTR) != run:
            raise _refuse(path)
        self.complete = self._kv.read(b"complete").result().state != "missing"
        self._array = ts.open(
            {"driver": "zarr3",
             "metadata": {"shape": [rows, stored_width], "data_type": quantization.dtype.name,
                          "chunk_grid": {"name": "regular", "configuration": {
                              "chunk_shape": [chunk_rows, stored_width]}}}},
            kvstore=self._kv / "embeddings/", open=True, create=True).result()

    def done_chunks(self) -> set[int]:
        """One listing of `ids/` (the commit markers)."""
        if self.complete:
            return set(range(self.n_chunks))
        import tensorstore as ts

        keys = self._kv.list(ts.KvStore.KeyRange(b"ids/", b"ids0")).result()
        found = (_COMMITTED.fullmatch(k.decode()[len("ids/"):]) for k in keys)
        return {int(m[1]) for m in found if m} & set(range(self.n_chunks))

    def write_chunk(self, chunk: int, ids: list, values: np.ndarray) -> None:
        start = chunk * self.chunk_rows
        values = np.asarray(values, self.quantization.dtype)
        self._array[start:start + len(values)].write(values).result()
        # Only now, with the rows durable (tensorstore's file kvstore fsyncs and renames; an
        # object store has completed the PUT), may the chunk be listed as done.
        self._kv.write(f"ids/{chunk}.json".encode(), json.dumps(ids).encode()).result()

    def ids(self) -> list:
        reads = [self._kv.read(f"ids/{i}.json".encode()) for i in range(self.n_chunks)]
        return [record_id for r in reads for record_id in json.loads(r.result().value)]

    def finish(self) -> None:
        """Writes the `complete` mark that readers check."""
        _check_done(self.path, self.done_chunks(), self.n_chunks)
        if not self.complete:
            # Not empty: gcp-storage-emulator fails an empty upload (readers only ask
            # whether the object is there).
            self._kv.write(b"complete", b"complete").result()
            self.complete = True

    @classmethod
    def read(cls, path: str) -> tuple[list, np.ndarray, Quantization]:
        """(ids, values, quantization) of a finished output."""
        group = _kv(path).read(b"zarr.json").result()
        if group.state == "missing":
            raise FileNotFoundError(f"{path}: no such output")
        run = json.loads(group.value)["attributes"][GROUP_ATTR]
        quantization = _quantization(run.pop("quantization", None), run["width"])
        sink = cls(path, **run, quantization=quantization)
        if not sink.complete:
            raise _unfinished(path)
        return sink.ids(), sink._array.read().result(), quantization

    @staticmethod
    def exists(path: str) -> bool:
        return _kv(path).read(b"complete").result().state != "missing"

    @staticmethod
    def unfinished(path: str) -> dict | None:
        kv = _kv(path)
        if kv.read(b"complete").result().state != "missing":
            return None
        return json.loads(kv.read(b"zarr.json").result().value)["attributes"][GROUP_ATTR]

    @staticmethod
    def remove(path: str) -> None:
        import tensorstore as ts

        _kv(path).delete_range(ts.KvStore.KeyRange()).result()


def _kv(path: str):
    import tensorstore as ts

    return ts.KvStore.open(storage.kvstore_spec(path)).result()


class ParquetSink(_LocalFormat):
    """`.parquet` (local): one part file per chunk, concatenated by `finish`."""

    suffix = ".parquet"

    def __init__(self, path: str, *, rows: int, width: int, chunk_rows: int, key: str,
                 id_kind: str, quantization: Quantization):
        import pyarrow as pa

        self.path, self.chunk_rows, self.quantization = Path(path), chunk_rows, quantization
        self.n_chunks = _n_chunks(rows, chunk_rows)
        self.parts = Path(path + ".parts")
        self._metadata = {"key": key, **{name: json.dumps(record, sort_keys=True) for name, record
                                         in _stored_as(quantization).items()}}
        self._schema = pa.schema(
            [("id", pa.int64() if id_kind == "int" else pa.string()),
             ("embedding", pa.list_(pa.from_numpy_dtype(quantization.dtype),
                                    quantization.stored_width))])
        run = json.dumps(_run(rows, width, chunk_rows, key, id_kind, quantization),
                         sort_keys=True)
        self.complete = self.path.exists()
        if self.complete:
            if any(_parquet_metadata(self.path, name) != value
                   for name, value in self._metadata.items()):
                raise _refuse(path)
            return
        try:
            found = (self.parts / "run.json").read_text(encoding="utf-8")
        except FileNotFoundError:
            _atomic_write(self.parts / "run.json", run.encode())  # process 0, first
            found = run
        if found != run:
            raise _refuse(str(self.parts))

    def done_chunks(self) -> set[int]:
        if self.complete:
            return set(range(self.n_chunks))
        found = (_COMMITTED.fullmatch(name) for name in os.listdir(self.parts))
        return {int(m[1]) for m in found if m} & set(range(self.n_chunks))

    def _part(self, chunk: int) -> Path:
        return self.parts / f"{chunk}.parquet"

    def write_chunk(self, chunk: int, ids: list, values: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = pa.array(np.ascontiguousarray(values, self.quantization.dtype).ravel())
        table = pa.Table.from_arrays(
            [pa.array(ids, self._schema.field("id").type),
             pa.FixedSizeListArray.from_arrays(flat, self.quantization.stored_width)],
            schema=self._schema)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        _atomic_write(self._part(chunk), buffer.getvalue().to_pybytes())

    def ids(self) -> list:
        import pyarrow.parquet as pq

        if self.complete:
            return pq.read_table(self.path, columns=["id"]).column("id").to_pylist()
        return [record_id for i in range(self.n_chunks)
                for record_id in pq.read_table(self._part(i), columns=["id"])
                .column("id").to_pylist()]

    def finish(self) -> None:
        """Parts -> OUT in chunk order (temp + rename), then the parts go. A kill in between
        leaves OUT complete and the parts are removed by the next finish."""
        import pyarrow.parquet as pq

        if not self.complete:
            _check_done(str(self.path), self.done_chunks(), self.n_chunks)
            schema = self._schema.with_metadata(
                {f"{GROUP_ATTR}.{name}": value for name, value in self._metadata.items()})
            with atomic_file(self.path) as f, pq.ParquetWriter(f, schema) as writer:
                for i in range(self.n_chunks):
                    writer.write_table(pq.read_table(self._part(i)))
            self.complete = True
        shutil.rmtree(self.parts, ignore_errors=True)

    @staticmethod
    def read(path: str) -> tuple[list, np.ndarray, Quantization]:
        import pyarrow.parquet as pq

        _check_local(path)
        table = pq.read_table(path)
        stored_width = table.schema.field("embedding").type.list_size
        values = table.column("embedding").combine_chunks().flatten().to_numpy()
        found = _parquet_metadata(Path(path), "quantization")
        return (table.column("id").to_pylist(), values.reshape(-1, stored_width),
                _quantization(json.loads(found) if found else None, stored_width))

    @staticmethod
    def unfinished(path: str) -> dict | None:
        if Path(path).exists():
            return None
        return json.loads(Path(path + ".parts/run.json").read_bytes())


def _parquet_metadata(path: Path, name: str) -> str | None:
    """The schema metadata entry `cde_jax.NAME` of a finished .parquet ("key", and
    "quantization" unless float32)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return metadata.get(f"{GROUP_ATTR}.{name}".encode(), b"").decode() or None


class NpySink(_LocalFormat):
    """`.npy` (local, one process): `npy.ResumableArray` and the ids beside it."""

    suffix = ".npy"

    def __init__(self, path: str, *, rows: int, width: int, chunk_rows: int, key: str,
                 id_kind: str, quantization: Quantization):
        self.path = Path(path)
        self.id_parts = Path(path + ".ids.parts")
        self.ids_path = Path(path + ".ids.jsonl")
        self._stored_as = _stored_as(quantization)
        self._array = ResumableArray(path, rows=rows, width=quantization.stored_width,
                                     chunk_rows=chunk_rows, key=key, dtype=quantization.dtype,
                                     extra=self._stored_as)
        if not self._array.resumed:  # ids of another run must not be finished with ours
            shutil.rmtree(self.id_parts, ignore_errors=True)
        self.id_parts.mkdir(parents=True, exist_ok=True)

    def done_chunks(self) -> set[int]:
        return set(self._array.done)

    def write_chunk(self, chunk: int, ids: list, values: np.ndarray) -> None:
        """Ids first: the journal line that makes the chunk done implies both are durable."""
        _atomic_write(self.id_parts / f"{chunk}.json", json.dumps(ids).encode())
        self._array.write(chunk, values)

    def ids(self) -> list:
        return [record_id for i in range(self._array.n_chunks)
                for record_id in json.loads((self.id_parts / f"{i}.json").read_bytes())]

    def finish(self) -> None:
        """OUT.ids.jsonl and OUT.quantization.json (unless float32), then OUT (each atomic):
        OUT present means all are complete."""
        _check_done(str(self.path), self.done_chunks(), self._array.n_chunks)
        _atomic_write(self.ids_path, "".join(json.dumps(i) + "\n" for i in self.ids()).encode())
        sidecar = Path(str(self.path) + QUANTIZATION_FILE)
        if self._stored_as:
            _atomic_write(sidecar, json.dumps(self._stored_as["quantization"]).encode())
        else:  # not a stale one from an earlier output of this name
            sidecar.unlink(missing_ok=True)
        self._array.finish()
        shutil.rmtree(self.id_parts, ignore_errors=True)

    @staticmethod
    def read(path: str) -> tuple[list, np.ndarray, Quantization]:
        _check_local(path)
        sidecar = Path(path + QUANTIZATION_FILE)
        with open(path + ".ids.jsonl", encoding="utf-8") as f:
            ids = [json.loads(line) for line in f]
        values = np.load(path)
        return ids, values, _quantization(json.loads(sidecar.read_bytes()) if sidecar.exists()
                                          else None, values.shape[1])

    @staticmethod
    def unfinished(path: str) -> dict | None:
        if Path(path).exists():
            return None
        with open(path + ".journal", encoding="utf-8") as f:
            return json.loads(f.readline())


def _check_done(path: str, done: set[int], n_chunks: int) -> None:
    missing = sorted(set(range(n_chunks)) - done)
    if missing:
        raise OutputError(f"{path}: chunks {missing[:10]} not written yet")


def _atomic_write(out: Path, data: bytes) -> None:
    with atomic_file(out) as f:
        f.write(data)
