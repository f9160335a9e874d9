"""A `.npy` (float32 unless told otherwise) written chunk by chunk, resumable after the
process is killed (even with SIGKILL) and renamed into place only when complete.

Beside `out` live two files while a run is unfinished: `out.partial`, the final file at its
final size from the start (the `.npy` header, then chunk i's rows at a fixed offset), and
`out.journal`, a JSON header line (the run's key, shape and any `extra` record) followed by
one line per finished chunk. A chunk is journaled only after its rows are fsynced, so the
journal never claims rows that are not on disk; a torn last line is ignored. A journal with
another key (other arguments, input or model) or without its data file means starting over.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ..outputs import atomic_file

DTYPE = np.dtype("<f4")


def npy_header(shape: tuple[int, ...], dtype: np.dtype = DTYPE) -> bytes:
    """The header `np.save` writes for a C-ordered array of this shape and dtype."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


class ResumableArray:
    """`rows` x `width` rows of `dtype` in chunks of `chunk_rows`; `done` holds the chunk
    indices already on disk, `resumed` whether they come from an interrupted run with this
    key (and `extra`, what else its journal header must match)."""

    def __init__(self, out: str | Path, *, rows: int, width: int, chunk_rows: int, key: str,
                 dtype: np.dtype = DTYPE, extra: dict | None = None):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.out = Path(out)
        self.data_path = self.out.with_name(self.out.name + ".partial")
        self.journal_path = self.out.with_name(self.out.name + ".journal")
        self.rows, self.width, self.chunk_rows = rows, width, chunk_rows
        self.n_chunks = -(-rows // chunk_rows)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._header = npy_header((rows, width), self.dtype)
        head = {"version": 1, "key": key, "rows": rows, "width": width, "chunk_rows": chunk_rows,
                **(extra or {})}
        done = self._journaled(head)
        self.resumed = done is not None
        if done is None:
            self._start(head)
            done = set()
        self.done = done
        self._data = os.open(self.data_path, os.O_RDWR)
        self._journal = self.journal_path.open("a", encoding="utf-8")

    def _journaled(self, head: dict) -> set[int] | None:
        """Finished chunks of an interrupted run with this header, or None (none to resume)."""
        try:
            lines = self.journal_path.read_text(encoding="utf-8").split("\n")
            found = json.loads(lines[0])
            size = self.data_path.stat().st_size
        except (FileNotFoundError, ValueError):  # no journal or data file, or garbage
            return None
        if found != head or size != self._size():
            return None
        # lines[-1] follows the last "\n": empty, or a line torn by the kill.
        return {int(s) for s in lines[1:-1] if s.isdigit() and int(s) < self.n_chunks}

    def _start(self, head: dict) -> None:
        # The old journal goes first: it must never describe the new data file.
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()
        with atomic_file(self.data_path) as f:
            f.write(self._header)
            f.truncate(self._size())
        with atomic_file(self.journal_path, "w") as f:
            f.write(json.dumps(head, sort_keys=True) + "\n")

    def _size(self) -> int:
        return len(self._header) + self.rows * self.width * self.dtype.itemsize

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_rows, min(self.rows, (chunk + 1) * self.chunk_rows))

    def write(self, chunk: int, values_rd: np.ndarray) -> None:
        """Stores chunk `chunk`'s rows durably, then journals it."""
        rows = self.chunk_slice(chunk)
        if values_rd.shape != (rows.stop - rows.start, self.width):
            raise ValueError(f"chunk {chunk} needs shape {(rows.stop - rows.start, self.width)}, "
                             f"got {values_rd.shape}")
        data = memoryview(np.ascontiguousarray(values_rd, self.dtype)).cast("B")
        offset = len(self._header) + rows.start * self.width * self.dtype.itemsize
        while data:
            written = os.pwrite(self._data, data, offset)
            data, offset = data[written:], offset + written
        os.fsync(self._data)
        self._journal.write(f"{chunk}\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self.done.add(chunk)

    def finish(self) -> Path:
        """Renames the complete file onto `out` (atomic) and drops the journal."""
        missing = sorted(set(range(self.n_chunks)) - self.done)
        if missing:
            raise RuntimeError(f"{self.out}: chunks {missing[:10]} not written yet")
        self.close()
        os.replace(self.data_path, self.out)
        self.journal_path.unlink()
        return self.out

    def close(self) -> None:
        """Releases the files, keeping an unfinished run's state for the next one."""
        if not self._journal.closed:
            os.close(self._data)
            self._journal.close()

    def __enter__(self) -> ResumableArray:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
