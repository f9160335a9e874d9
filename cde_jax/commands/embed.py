"""`cde-jax embed`: L2-normalized query or document embeddings of every text in a file, as a
float32 `.npy` of shape (texts, d) in input order.

Texts are read and embedded in chunks of --chunk-size (memory does not grow with the file).
Each finished chunk is saved with a journal beside the output (`OUT.partial`,
`OUT.journal`): a run that is killed continues, when started again with the same arguments,
from the first unfinished chunk, and writes the same bytes as an uninterrupted run. Other
arguments, another model or a changed input start over. OUT appears only when complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import inputs
from ..minicorpus import fallback_minicorpus
from ..stream import ResumableArray
from . import runtime


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed", help="embed the texts of a file (.npy, resumable)",
        description=__doc__, epilog=runtime.CACHE_HELP)
    runtime.add_input_args(parser)
    runtime.add_model_args(parser)
    parser.add_argument("--role", required=True, choices=("query", "document"),
                        help="the task prefix: search_query or search_document")
    parser.add_argument("--dataset-embeddings", required=True, metavar="NPZ|fallback",
                        help="dataset embeddings from `cde-jax dataset-embeddings` (.npz; must "
                             "come from this model), or 'fallback' for the generic fallback "
                             "minicorpus")
    parser.add_argument("--out", required=True, help="the .npy to write")
    parser.add_argument("--chunk-size", type=runtime.positive_int, default=4096,
                        help="texts per chunk, the unit of work a resumed run keeps "
                             "(default 4096)")
    parser.set_defaults(func=run)


def chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, size)):
        yield chunk


def run_key(args, scanned: inputs.Scan, fingerprint: str, dataset_md: np.ndarray) -> str:
    """Everything the output bytes depend on: a journal with another key is not resumed."""
    parts = {"input": scanned.sha256, "format": Path(args.input).suffix.lower(),
             "field": args.field, "role": args.role, "model": fingerprint,
             "context": hashlib.sha256(np.ascontiguousarray(dataset_md).tobytes()).hexdigest(),
             "chunk_size": args.chunk_size, "batch_size": args.batch_size,
             "dtype": args.dtype, "attention": args.attention}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(args) -> int:
    scanned = inputs.scan(args.input, args.field)
    model = runtime.load_model(args.model, dtype=args.dtype, attention=args.attention)
    if args.dataset_embeddings == "fallback":
        dataset_md = model.embed_dataset(fallback_minicorpus(), batch_size=args.batch_size)
    else:
        dataset_md = model.load_dataset_embeddings(args.dataset_embeddings).embeddings
    key = run_key(args, scanned, model.fingerprint, dataset_md)
    with ResumableArray(args.out, rows=scanned.count, width=model.hidden_size,
                        chunk_rows=args.chunk_size, key=key) as out:
        if out.state == "resumed":
            print(f"cde-jax embed: resuming {args.out}: {len(out.done)}/{out.n_chunks} chunks "
                  "already done", file=sys.stderr)
        elif out.state == "restarted":
            print(f"cde-jax embed: starting {args.out} over: the unfinished run there does not "
                  "match (other arguments, input or model, or its .partial is gone)",
                  file=sys.stderr)
        with tqdm(total=scanned.count, initial=out.rows_done, unit="text", unit_scale=True,
                  desc="embed", file=sys.stderr) as bar:
            for chunk, texts in enumerate(chunks(inputs.iter_texts(args.input, args.field),
                                                 args.chunk_size)):
                if chunk in out.done:
                    continue
                out.write(chunk, model.encode(texts, prompt_name=args.role,
                                              dataset_embeddings=dataset_md,
                                              batch_size=args.batch_size,
                                              show_progress_bar=False))
                bar.update(len(texts))
        inputs.check_unchanged(args.input, scanned)
        out.finish()
    return 0
