"""`cde-jax embed`: L2-normalized query or document embeddings of every text in a file, with
their ids, as `.npy` (one process; ids in OUT.ids.jsonl), `.parquet` (id + embedding
columns) or `.zarr` (tensorstore zarr v3, any tensorstore path such as gs://); read any of
them back with `cde_jax.read_embeddings(OUT)`.

--precision stores them compactly, as sentence-transformers' `quantize_embeddings` does:
float16 (2 bytes a value), int8 / uint8 (1 byte: each dimension's range, calibrated on a
fixed sample of up to 1024 input texts embedded first, cut into 256 levels) or binary /
ubinary (the sign bits, packed: d / 8 bytes a row). The precision and the calibration
ranges are kept in the output's metadata.

The input is read in chunks of --chunk-size texts, the unit of work: each process of a run
embeds its share of the chunks and commits each chunk atomically. A run that is killed
continues, when started again with the same arguments (and any number of processes), from
the committed chunks, and writes the same bytes as an uninterrupted run. Other arguments,
another model or a changed input start over (.npy) or are refused (.parquet, .zarr). OUT
appears only when complete.

example:
  cde-jax embed --model cde-small-v2-jax --input corpus.jsonl --id-field _id \\
      --role document --dataset-embeddings dataset.npz --out corpus.parquet
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import prompts
from ..corpus import job, sinks
from ..corpus.source import Source, file_sha256, open_chunks
from ..distributed import all_succeed
from ..minicorpus import fallback_minicorpus
from ..quantize import PRECISIONS
from . import runtime

RESUME = "the committed chunks are kept: run the same command again on every process to resume"


def register(subparsers) -> None:
    parser = runtime.add_command(
        subparsers, "embed", __doc__,
        help="embed the texts of a file (.npy / .parquet / .zarr, resumable)")
    runtime.add_input_args(parser)
    parser.add_argument("--id-field", default=None,
                        help="the JSONL field or parquet column holding each text's id "
                             "(default: the 1-based line or row number)")
    parser.add_argument("--role", required=True, choices=("query", "document"),
                        help="the task prefix: search_query or search_document")
    parser.add_argument("--dataset-embeddings", required=True, metavar="NPZ|fallback",
                        help="dataset embeddings from `cde-jax dataset-embeddings` (.npz; must "
                             "come from this model), or 'fallback' for the generic fallback "
                             "minicorpus")
    parser.add_argument("--out", required=True, help="the .npy, .parquet or .zarr to write")
    parser.add_argument("--chunk-size", type=runtime.positive_int, default=4096,
                        help="texts per chunk, the unit of work a resumed run keeps")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="how values are stored: float32, float16, int8 / uint8 (256 levels "
                             "per dimension, ranges calibrated on a fixed sample of the input) "
                             "or binary / ubinary (packed sign bits)")
    parser.add_argument("--read-threads", type=runtime.positive_int, default=2,
                        help="threads reading and tokenizing the next chunks while one is "
                             "embedded (scripts/host_benchmark.py measures what they reach)")
    parser.set_defaults(func=run)


def run_record(args, source: Source, model) -> dict:
    """Everything the output bytes depend on (not the number of processes, nor where the
    files are): every process must have process 0's (`runtime.agree_on_run`), and its digest
    is the key of the output, so that a run with another record does not resume this one."""
    corpus = args.dataset_embeddings
    return {"input sha256": source.sha256, "input format": Path(args.input).suffix.lower(),
            "input rows": source.rows, "ids": source.id_kind, "--field": args.field,
            "--id-field": args.id_field, "--role": args.role, "--chunk-size": args.chunk_size,
            "--precision": args.precision,
            "dataset embeddings": corpus if corpus == "fallback" else file_sha256(corpus),
            **runtime.model_facts(model, args.batch_size)}


def run(args) -> int:
    sinks.output_format(args.out)
    runtime.start(args, RESUME)
    with job.claim(args.out, args.overwrite):  # a second run on OUT stops here, at once
        source = all_succeed(lambda: open_chunks(args.input, args.chunk_size, field=args.field,
                                                 id_field=args.id_field), "indexing the input")
        job.validate(source)  # every line checked, before the model loads
        model = runtime.load_model(args)
        record = all_succeed(lambda: run_record(args, source, model), "reading the inputs")
        runtime.agree_on_run(args, record)
        corpus = (fallback_minicorpus() if args.dataset_embeddings == "fallback"
                  else args.dataset_embeddings)
        context = model.context(corpus, batch_size=args.batch_size)

        def embed(token_ids, progress):
            return context.encode_tokens(token_ids, batch_size=args.batch_size,
                                         progress=progress)

        key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        job.embed_corpus(source, args.out, key=key, width=model.hidden_size, embed=embed,
                         prepare=lambda texts: model.tokenize(texts, prompts.by_name(args.role)),
                         read_threads=args.read_threads, show_progress=not args.quiet,
                         precision=args.precision)
    return 0
