"""`cde-jax context`: the dataset embeddings of a corpus file, saved as `.npz`.

Samples exactly what `model.context_record(all_texts, seed=N)` samples, without holding the
corpus: a counting pass, then a pass that keeps only the chosen texts.
"""

from __future__ import annotations

from typing import Iterable

from .. import inputs
from ..context import sample_indices, sample_minicorpus
from . import runtime


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "context", help="dataset embeddings (.npz) of a corpus, for `cde-jax embed --context`",
        description=__doc__, epilog=runtime.CACHE_HELP)
    runtime.add_input_args(parser)
    parser.add_argument("--out", required=True, help="the .npz to write (atomically)")
    parser.add_argument("--seed", type=int, default=0,
                        help="minicorpus sampling seed (default 0; MTEB setups use 42)")
    parser.set_defaults(func=run)


def minicorpus(texts: Iterable[str], count: int, size: int, seed: int) -> list[str]:
    """What `sample_minicorpus(all texts, size, seed)` returns, holding only the chosen texts
    when the corpus is larger than the minicorpus."""
    if count < size:
        return sample_minicorpus(list(texts), size, seed)
    chosen_k = sample_indices(count, size, seed)
    wanted = set(chosen_k.tolist())
    kept = {i: text for i, text in enumerate(texts) if i in wanted}
    return [kept[i] for i in chosen_k]


def run(args) -> int:
    scanned = inputs.scan(args.input, args.field)
    if scanned.count == 0:
        raise inputs.InputError(f"{args.input}: no texts to sample a minicorpus from")
    model = runtime.load_model(args.model)
    docs = minicorpus(inputs.iter_texts(args.input, args.field), scanned.count,
                      model.config.transductive_corpus_size, args.seed)
    inputs.check_unchanged(args.input, scanned)
    record = model.context_record(seed=args.seed, sampled=docs, batch_size=args.batch_size,
                                  show_progress_bar=True)
    record.save(args.out)
    return 0
