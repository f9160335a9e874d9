"""`cde-jax eval`: retrieval metrics of a checkpoint on a local BEIR-layout dataset.

    cde-jax eval --model PATH --dataset DIR --out results.json [--split test] [--k 10,100]
                 [--seed 42] [--batch-size N] [--overwrite]

Writes (atomically) a JSON object: the model's path and fingerprint, the dataset's path,
split and sizes, the minicorpus seed, the k values and the metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cde_jax

from ..evaluation.beir import load_beir
from ..evaluation.retrieval import MINICORPUS_SEED, evaluate_retrieval
from ..io_utils import atomic_file
from . import runtime


def k_values(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"k values must be positive, got {text!r}")
    return tuple(sorted(set(ks)))


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="retrieval metrics on a BEIR-layout dataset",
                              description=__doc__.splitlines()[0], epilog=runtime.CACHE_HELP)
    p.add_argument("--model", required=True, help="converted or released checkpoint dir")
    p.add_argument("--dataset", required=True, type=Path,
                   help="dir with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--out", required=True, type=Path, help="results JSON file")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=k_values, default=(10, 100), help="e.g. 10,100")
    p.add_argument("--seed", type=int, default=MINICORPUS_SEED,
                   help="minicorpus sampling seed (docs/model.md §7: 42)")
    p.add_argument("--batch-size", type=runtime.positive_int, default=None,
                   help="fixed batch size (default: about 8192 tokens per batch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    runtime.add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists (pass --overwrite to replace it)")
    start = time.perf_counter()
    dataset = load_beir(args.dataset, args.split)  # bad files fail before the model loads
    model = runtime.load_model(args.model, dtype=args.dtype, attention=args.attention)
    metrics = evaluate_retrieval(model, dataset, args.k, seed=args.seed,
                                 batch_size=args.batch_size)
    result = {
        "model": {"path": str(Path(args.model).absolute()), "fingerprint": model.fingerprint},
        "dataset": {"path": str(args.dataset.resolve()), "name": args.dataset.resolve().name,
                    "split": args.split, "documents": len(dataset.doc_ids),
                    "queries": len(dataset.query_ids)},
        "seed": args.seed,
        "minicorpus_size": model.config.transductive_corpus_size,
        "k": list(args.k),
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 3),
        "cde_jax_version": cde_jax.__version__,
    }
    with atomic_file(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(metrics, indent=2))
    return 0
