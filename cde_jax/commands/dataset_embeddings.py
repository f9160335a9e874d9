"""`cde-jax dataset-embeddings`: the dataset embeddings of a corpus file, saved as `.npz`
for `cde-jax embed --dataset-embeddings`.

Samples exactly what `model.dataset_embeddings_file(all_texts, seed=N)` samples, without
holding the corpus: a counting pass, then a pass that keeps only the chosen texts.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import inputs, minicorpus
from . import runtime


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dataset-embeddings", help="dataset embeddings (.npz) of a corpus, for `cde-jax embed "
        "--dataset-embeddings`", description=__doc__, epilog=runtime.CACHE_HELP)
    runtime.add_input_args(parser)
    runtime.add_model_args(parser)
    parser.add_argument("--out", required=True, help="the .npz to write (atomically)")
    parser.add_argument("--seed", type=int, default=0,
                        help="minicorpus sampling seed (default 0; MTEB setups use 42)")
    parser.set_defaults(func=run)


def sample_streamed(texts: Iterable[str], count: int, size: int, seed: int) -> list[str]:
    """What `sample_minicorpus(all texts, size, seed)` returns, holding only the chosen texts
    when the corpus is larger than the minicorpus."""
    if count < size:
        return minicorpus.sample_minicorpus(list(texts), size, seed)
    chosen = minicorpus.sample_indices(count, size, seed)
    wanted = set(chosen.tolist())
    kept = {i: text for i, text in enumerate(texts) if i in wanted}
    return [kept[i] for i in chosen]


def run(args) -> int:
    scanned = inputs.scan(args.input, args.field)
    if scanned.count == 0:
        raise inputs.InputError(f"{args.input}: no texts to sample a minicorpus from")
    model = runtime.load_model(args.model, dtype=args.dtype, attention=args.attention)
    docs = sample_streamed(inputs.iter_texts(args.input, args.field), scanned.count,
                           model.config.transductive_corpus_size, args.seed)
    inputs.check_unchanged(args.input, scanned)
    embeddings_md = model.embed_minicorpus(docs, batch_size=args.batch_size,
                                           show_progress_bar=True)
    minicorpus.record(embeddings_md, model.fingerprint, args.seed).save(args.out)
    return 0
