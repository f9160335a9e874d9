"""`cde-jax eval`: retrieval metrics of a checkpoint on a local BEIR-layout dataset
(corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv): nDCG@k, Recall@k, MAP@k and MRR@10.

Writes (atomically; one run per output at a time) a JSON object: the model's path and
fingerprint, the dataset's path, split and sizes, the minicorpus seed, the k values, the
precision and rescoring, and the metrics.

--precision scores the corpus as `cde-jax embed --precision` would store it (int8 / uint8
ranges calibrated on the same sample of the corpus): documents ranked by the quantized
scores, the queries quantized like them; --rescore-multiplier M rescores each query's best
k x M documents with the float32 query against the dequantized documents (as
sentence-transformers does) or, with --rescore-documents float32, against their float32
embeddings (a compact index searched, the full embeddings kept beside it).

example:
  cde-jax eval --model cde-small-v2-jax --dataset beir/scifact --out scifact.json --k 10,100
  cde-jax eval --model cde-small-v2-jax --dataset beir/scifact --out scifact-binary.json \\
      --precision ubinary --rescore-multiplier 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cde_jax

from .. import bucket_cache, distributed, outputs, storage
from ..corpus.source import file_sha256
from ..evaluation.beir import load_beir
from ..evaluation.retrieval import MINICORPUS_SEED, evaluate_retrieval
from ..evaluation.search import RESCORE_DOCUMENTS, candidates
from ..quantize import PRECISIONS
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
    p = runtime.add_command(subparsers, "eval", __doc__,
                            help="retrieval metrics on a BEIR-layout dataset")
    runtime.add_model_args(p)
    p.add_argument("--dataset", required=True,
                   help="dir with corpus.jsonl, queries.jsonl, qrels/<split>.tsv (or a gs:// "
                        "or s3:// prefix: read through a local copy)")
    p.add_argument("--out", required=True, help="results JSON file (a path or a URL)")
    p.add_argument("--split", default="test", help="the qrels file to score (qrels/SPLIT.tsv)")
    p.add_argument("--k", type=k_values, default=(10, 100),
                   help="cutoffs, comma-separated (default: 10,100)")
    p.add_argument("--seed", type=int, default=MINICORPUS_SEED,
                   help="minicorpus sampling seed (docs/model.md §7: 42)")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="score the corpus stored in this precision, as `embed --precision` "
                        "stores it")
    p.add_argument("--rescore-multiplier", type=runtime.positive_int, default=None, metavar="M",
                   help="rescore each query's best k x M documents by quantized score with the "
                        "float32 query (default: no rescoring)")
    p.add_argument("--rescore-documents", choices=RESCORE_DOCUMENTS, default="dequantized",
                   help="what rescoring compares the float32 query with: the stored documents "
                        "dequantized, or their float32 embeddings")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args) -> int:
    start = time.perf_counter()
    candidates(1, args.precision, args.rescore_multiplier)  # refuses bad options before work
    runtime.start(args)
    with outputs.claim(args.out, overwrite=args.overwrite):
        # Bad files fail before the model loads (every process reads the dataset).
        dataset = distributed.all_succeed(lambda: load_beir(local_dir(args.dataset),
                                                            args.split), "reading the dataset")
        model = runtime.load_model(args)
        runtime.agree_on_run(args, {**{f"{f.relative_to(dataset.path)} sha256": file_sha256(f)
                                       for f in dataset.files},
                                    **runtime.model_facts(model, args.batch_size)})
        metrics = evaluate_retrieval(model, dataset, args.k, seed=args.seed,
                                     batch_size=args.batch_size,
                                     show_progress_bar=False if args.quiet else None,
                                     precision=args.precision,
                                     rescore_multiplier=args.rescore_multiplier,
                                     rescore_documents=args.rescore_documents)
        if distributed.is_main():
            write_result(args, model, dataset, metrics, time.perf_counter() - start)
    return 0


def local_dir(path: str) -> Path:
    """A dataset dir, or a gs:// / s3:// one's local copy (`bucket_cache.local_copy`)."""
    return bucket_cache.local_copy(path) if storage.is_url(path) else Path(path)


def absolute(path: str) -> str:
    return path if storage.is_url(path) else str(Path(path).resolve())


def write_result(args, model, dataset, metrics: dict, seconds: float) -> None:
    result = {
        "model": {"path": args.model if storage.is_url(args.model)
                  else str(Path(args.model).absolute()), "fingerprint": model.fingerprint},
        "dataset": {"path": absolute(args.dataset),
                    "name": Path(absolute(args.dataset).rstrip("/")).name,
                    "split": args.split, "documents": len(dataset.doc_ids),
                    "queries": len(dataset.query_ids)},
        "seed": args.seed,
        "minicorpus_size": model.config.transductive_corpus_size,
        "k": list(args.k),
        "precision": args.precision,
        "rescore_multiplier": args.rescore_multiplier,
        "rescore_documents": args.rescore_documents if args.rescore_multiplier else None,
        "metrics": metrics,
        "seconds": round(seconds, 3),
        "cde_jax_version": cde_jax.__version__,
    }
    with outputs.atomic_file(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(metrics, indent=2))
