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

import numpy as np

from .. import prompts
from ..corpus import job, sinks
from ..corpus.source import Source, open_chunks
from ..distributed import all_succeed
from ..minicorpus import fallback_minicorpus
from ..quantize import PRECISIONS
from . import runtime


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


def run_key(args, source: Source, fingerprint: str, dataset_md: np.ndarray) -> str:
    """Everything the output bytes depend on (not the number of processes): a run with
    another key does not resume this one."""
    parts = {"input": source.sha256, "format": Path(args.input).suffix.lower(),
             "field": args.field, "id_field": args.id_field, "role": args.role,
             "model": fingerprint, "chunk_size": args.chunk_size, "batch_size": args.batch_size,
             "dtype": args.dtype, "attention": args.attention,
             "dataset_embeddings": hashlib.sha256(
                 np.ascontiguousarray(dataset_md).tobytes()).hexdigest()}
    if args.precision != "float32":  # float32 keys as before the option existed
        parts["precision"] = args.precision
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(args) -> int:
    sinks.output_format(args.out)
    runtime.start(args)
    with job.claim(args.out, args.overwrite):  # a second run on OUT stops here, at once
        source = all_succeed(lambda: open_chunks(args.input, args.chunk_size, field=args.field,
                                                 id_field=args.id_field), "indexing the input")
        model = runtime.load_model(args)
        corpus = (fallback_minicorpus() if args.dataset_embeddings == "fallback"
                  else args.dataset_embeddings)
        context = model.context(corpus, batch_size=args.batch_size)

        def embed(token_ids, progress):
            return context.encode_tokens(token_ids, batch_size=args.batch_size,
                                         progress=progress)

        key = run_key(args, source, model.fingerprint, context.dataset_embeddings)
        job.embed_corpus(source, args.out, key=key, width=model.hidden_size, embed=embed,
                         prepare=lambda texts: model.tokenize(texts, prompts.by_name(args.role)),
                         read_threads=args.read_threads, show_progress=not args.quiet,
                         precision=args.precision)
    return 0
