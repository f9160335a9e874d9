"""`cde-jax dataset-embeddings`: the dataset embeddings of a corpus file, saved as `.npz`
for `cde-jax embed --dataset-embeddings`.

Samples exactly what `model.dataset_embeddings_file(all_texts, seed=N)` samples without any
process holding the corpus: the file is indexed, checked line by line (each process its
share), and each process reads and embeds only its share of the chosen texts.

example:
  cde-jax dataset-embeddings --model cde-small-v2-jax --input corpus.jsonl --out dataset.npz
"""

from __future__ import annotations

import warnings

from .. import distributed, minicorpus, outputs
from ..corpus import job
from ..corpus.source import InputError, open_chunks
from . import runtime

CHUNK_ROWS = 4096  # records per read; any value samples the same texts


def register(subparsers) -> None:
    parser = runtime.add_command(
        subparsers, "dataset-embeddings", __doc__,
        help="dataset embeddings (.npz) of a corpus, for `cde-jax embed --dataset-embeddings`")
    runtime.add_input_args(parser)
    parser.add_argument("--out", required=True, help="the .npz to write (atomically)")
    parser.add_argument("--seed", type=int, default=0,
                        help="minicorpus sampling seed (MTEB setups use 42)")
    parser.set_defaults(func=run)


def run(args) -> int:
    runtime.start(args)
    with outputs.claim(args.out, overwrite=args.overwrite):
        source = distributed.all_succeed(lambda: open_chunks(args.input, CHUNK_ROWS,
                                                             field=args.field),
                                         "indexing the input")
        if source.rows == 0:
            raise InputError(f"{args.input}: no texts to sample a minicorpus from")
        job.validate(source)
        model = runtime.load_model(args)
        runtime.agree_on_run(args, {"input sha256": source.sha256, "input rows": source.rows,
                                    **runtime.model_facts(model, args.batch_size)})
        size = model.config.transductive_corpus_size
        if source.rows < size:
            warnings.warn(f"only {source.rows} texts for a minicorpus of {size}: oversampling "
                          f"with replacement (seed {args.seed})", stacklevel=1)
        chosen = minicorpus.sample_indices(source.rows, size, args.seed)
        mine = job.read_rows(source, chosen[distributed.process_share(size)])
        embeddings_md = model.embed_minicorpus(mine, total=size, batch_size=args.batch_size,
                                               show_progress_bar=not args.quiet)
        if distributed.is_main():
            minicorpus.record(embeddings_md, model.fingerprint, args.seed).save(args.out)
    return 0
