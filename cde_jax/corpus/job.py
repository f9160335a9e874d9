"""The corpus job, as every process of a run executes it:

    claim OUT (`outputs.claim`: process 0 locks it; a finished OUT is refused unless
              --overwrite)
    validate: each process reads its share of the chunks; any bad line stops every process
              before an output exists (and, with ids, no id may repeat in the file); the
              command does it before it loads the model, so that bad input fails fast
    the command makes every process agree on the run record (`distributed.agree`:
              arguments, input digest, model, chunk size, batch plan), then
    calibrate int8/uint8 ranges (`calibration`): embed a fixed sample first, or take the
              ranges an unfinished run recorded
    replace a finished OUT (--overwrite), open the sink (process 0 first: it writes the
              output's record of the run, the others check it)
    todo = chunks not committed yet (read by every process before any writes)
    process p embeds the todo chunks it owns (`Source.owner`: for a URL, those whose bytes
              it fetched while indexing), Grain reading the next chunks while the current one runs;
    every process joins every round (the model is one program over all devices)
    process 0 finishes the output once every chunk is committed

The unit of work is the chunk, not the process: a run killed anywhere resumes from the
committed chunks when started again, with the same or another number of processes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import grain
import numpy as np
from tqdm.auto import tqdm

from .. import distributed, outputs
from ..validation import UserError
from . import calibration, sinks
from .source import InputError, Source, id_hashes

# prepare(texts) -> what `embed` takes (e.g. token ids), run in Grain's reader threads;
# embed(prepared, progress(n)) -> (rows, d) float32, called by every process in every round.
Prepare = Callable[[list[str]], object]
Embed = Callable[[object, Callable[[int], object]], np.ndarray]


def shares(source: Source, chunks) -> list[list[int]]:
    """`chunks` split by the process that owns each (`source.owner`), in process order."""
    n = distributed.process_count()
    split: list[list[int]] = [[] for _ in range(n)]
    for chunk in chunks:
        split[source.owner(chunk, n)].append(chunk)
    return split


def my_chunks(source: Source) -> list[int]:
    return shares(source, range(len(source)))[distributed.process_index()]


def validate(source: Source) -> None:
    """Reads every chunk once (each process its share), so that bad input fails before any
    output is created; with ids, checks that none repeats anywhere in the file."""
    def check() -> np.ndarray:
        hashes = [np.zeros(0, np.uint64)]
        for i in my_chunks(source):
            chunk = source[i]  # parses and checks every record
            if source.id_field:
                hashes.append(id_hashes(chunk.ids))
        return np.concatenate(hashes)

    hashes = distributed.all_succeed(check, "reading the input")
    if source.id_field:
        distributed.all_succeed(lambda: _no_repeated_ids(source, hashes), "checking ids")


def _no_repeated_ids(source: Source, my_hashes: np.ndarray) -> None:
    """Compares 64-bit id digests across processes; only when two agree are the ids
    themselves read again, so a repeat is reported by its lines and a digest collision of
    different ids is not an error."""
    digests, counts = np.unique(distributed.concat_all(my_hashes), return_counts=True)
    repeated = set(digests[counts > 1].tolist())
    if not repeated:
        return
    rows = [i * source.chunk_rows + j for i in my_chunks(source)
            for j, h in enumerate(id_hashes(source[i].ids).tolist()) if h in repeated]
    first_row: dict = {}
    for row in sorted(distributed.concat_all(np.asarray(rows, np.int64)).tolist()):
        record_id = source[row // source.chunk_rows].ids[row % source.chunk_rows]
        earlier = first_row.setdefault(record_id, row)
        if earlier != row:
            raise InputError(f"{source.path}: {source.unit} {row + 1}: id {record_id!r} "
                             f"repeats {source.unit} {earlier + 1}'s")


def claim(out: str, overwrite: bool):
    """`outputs.claim` for a corpus output: a finished OUT of any format is refused unless
    `overwrite` (and deleted only once the job has checked its input). Entered first, so
    that a second run fails before any work."""
    kind = sinks.sink_type(out)
    if distributed.process_count() > 1 and kind is sinks.NpySink:
        raise UserError(f"{out}: a .npy is written by one process; with several, write "
                        ".zarr or .parquet")
    return outputs.claim(out, overwrite=overwrite, exists=kind.exists)


def embed_corpus(source: Source, out: str, *, key: str, width: int, embed: Embed,
                 prepare: Prepare = lambda texts: texts, read_threads: int = 2,
                 prefetch: int = 4, show_progress: bool = True,
                 precision: str = "float32") -> Path:
    """Runs (or resumes) the job inside `claim(out, ...)`, on a `validate`d source; every
    process calls it with the same arguments. `read_threads` Grain threads read, check and
    `prepare` the next `prefetch` chunks while the current one is embedded (tokenizing is
    most of a host's work: threads scale it). Rows are stored in `precision`
    (`cde_jax.quantize`)."""
    quantization = calibration.calibrate(
        out, key=key, width=width, precision=precision, rows=source.rows,
        embed_rows=lambda rows: embed(prepare(read_rows(source, rows)), lambda n: None))
    kind = sinks.sink_type(out)
    if distributed.is_main() and kind.exists(out):  # --overwrite: replaced, input checked
        kind.remove(out)
    distributed.barrier("claimed")
    # Process 0 writes the output's run record (or checks the one there), then the others
    # read and check it: one writer, and a record no process disagrees with.
    sink = distributed.main_first(lambda: kind.open(
        out, rows=source.rows, width=width, chunk_rows=source.chunk_rows, key=key,
        id_kind=source.id_kind, quantization=quantization), "opening the output")
    done = sink.done_chunks()
    if distributed.is_main() and show_progress and 0 < len(done) < len(source):
        print(f"cde-jax: resuming {out}: {len(done)}/{len(source)} chunks already done",
              file=sys.stderr)
    distributed.barrier("planned")  # nobody writes before everyone has read `done`
    todo = shares(source, (i for i in range(len(source)) if i not in done))
    mine = grain.MapDataset.source(todo[distributed.process_index()])
    reader = iter(mine.map(source.__getitem__).map(lambda c: (c, prepare(c.texts)))
                  .to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                     prefetch_buffer_size=prefetch)))
    total = sum(min(source.chunk_rows, source.rows - i * source.chunk_rows)
                for i in todo[distributed.process_index()])
    with contextlib.closing(reader), tqdm(total=total, unit="text", unit_scale=True,
                                          desc="embed", file=sys.stderr,
                                          disable=not show_progress) as bar:
        for _ in range(max(map(len, todo))):  # every process joins every round
            chunk, prepared = next(reader, (None, prepare([])))
            values = quantization.apply(embed(prepared, bar.update))
            if chunk:
                sink.write_chunk(chunk.index, chunk.ids, values)
    distributed.barrier("written")
    if distributed.is_main():
        sink.finish()
    return Path(out)


def read_rows(source: Source, rows: np.ndarray) -> list[str]:
    """The texts at these 0-based record indices, in their order, reading each chunk once."""
    chunks: dict[int, list[str]] = {}
    for row in sorted(set(rows.tolist())):
        index = row // source.chunk_rows
        if index not in chunks:
            chunks[index] = source[index].texts
    return [chunks[r // source.chunk_rows][r % source.chunk_rows] for r in rows.tolist()]
