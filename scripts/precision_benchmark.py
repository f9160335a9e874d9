#!/usr/bin/env python
"""Retrieval quality and size of each `--precision`: nDCG@10, Recall@10 and agreement with
float32's top 10, without and with rescoring, and the bytes of one stored row.

    python scripts/precision_benchmark.py [--model DIR] [--docs 2000] [--queries 500]
                                          [--multiplier 4] [--json OUT]

Two synthetic BEIR sets from random_docs.txt, built as tests/test_evaluation.py builds its
fixture (query i is the last sentence of document i, judged relevant to it alone): that
fixture (24 documents under 200 characters, 8 queries) and a larger one (--docs documents of
two sentences or more under 1,000 characters, the first --queries of them queried). The
model is --model (a converted or released checkpoint) or, by default, the tests'
random-weight tiny checkpoint (64 dimensions): its numbers show what each precision loses
relative to float32 at that width, not the real model's retrieval quality. Embeddings are
computed once per set (`evaluation.retrieval.embed_dataset_split`) and searched as
`cde-jax eval --precision` searches them (`search_embedded`); bytes per row are those of the
stored values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import cde_jax
from cde_jax.evaluation.beir import BeirDataset
from cde_jax.evaluation.metrics import ranking_metrics
from cde_jax.evaluation.retrieval import embed_dataset_split, search_embedded
from cde_jax.evaluation.search import run_dict
from cde_jax.minicorpus import fallback_minicorpus
from cde_jax.quantize import PRECISIONS, RANGED, Quantization

K = 10


def synthetic_beir(lines: list[str], docs: int, queries: int, max_chars: int) -> BeirDataset:
    """Documents of two sentences or more (shorter than `max_chars`); query i is document i's
    last sentence."""
    texts = [d.strip() for d in lines if d.count(". ") >= 2 and len(d) < max_chars][:docs]
    doc_ids = [f"doc{i}" for i in range(len(texts))]
    query_ids = [f"q{i}" for i in range(queries)]
    return BeirDataset(Path("synthetic"), "test", doc_ids, texts, query_ids,
                       [texts[i].rsplit(". ", 1)[1] for i in range(queries)],
                       {f"q{i}": {f"doc{i}": 1} for i in range(queries)})


def bytes_per_row(precision: str, docs_nd: np.ndarray) -> float:
    """The stored array's bytes per row (what every format stores, besides ids)."""
    ranges = np.stack([docs_nd.min(0), docs_nd.max(0)]) if precision in RANGED else None
    stored = Quantization(precision, docs_nd.shape[1], ranges).apply(docs_nd)
    return stored.nbytes / len(stored)


def measure(model, dataset: BeirDataset, multiplier: int) -> list[dict]:
    """One row per precision and rescoring: nDCG@10, Recall@10, mean overlap with float32's
    top 10."""
    first_row, docs_nd, queries_qd = embed_dataset_split(model, dataset, batch_size=32,
                                                         show_progress_bar=False)
    reference = None
    rows = []
    for precision in PRECISIONS:
        settings = [(None, None)] + ([] if precision == "float32" else
                                     [(multiplier, "dequantized"), (multiplier, "float32")])
        for rescore, documents in settings:
            scores_qk, ids_qk = search_embedded(
                queries_qd, docs_nd, K, first_row=first_row, precision=precision,
                rescore_multiplier=rescore, rescore_documents=documents or "dequantized",
                mesh=model.mesh)
            reference = ids_qk if reference is None else reference
            run = run_dict(dataset.query_ids, dataset.doc_ids, scores_qk, ids_qk)
            metrics = ranking_metrics(dataset.qrels, run, [K])
            overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(ids_qk, reference)])
            rows.append({"precision": precision, "rescore": f"x{rescore} {documents}"
                         if rescore else "none", "ndcg@10": round(metrics["ndcg@10"], 4),
                         "recall@10": round(metrics["recall@10"], 4),
                         "top10_overlap": round(float(overlap), 4),
                         "bytes_per_row": bytes_per_row(precision, docs_nd)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint dir (default: a tiny random-weight one)")
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--multiplier", type=int, default=4, help="rescore multiplier")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # the fixture's 24 documents oversample the minicorpus
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from cde_jax.convert.synthetic import make_synthetic_checkpoint

            path = make_synthetic_checkpoint(Path(tmp) / "tiny", preset="tiny", seed=0)
        model = cde_jax.load(path)
        lines = fallback_minicorpus()
        sets = {"fixture": synthetic_beir(lines, 24, 8, 200),
                "larger": synthetic_beir(lines, args.docs, args.queries, 1000)}
        results = {}
        for name, dataset in sets.items():
            start = time.perf_counter()
            results[name] = measure(model, dataset, args.multiplier)
            print(f"\n{name}: {len(dataset.doc_ids)} documents, {len(dataset.query_ids)} "
                  f"queries, width {model.hidden_size} ({time.perf_counter() - start:.0f} s)")
            print("| precision | rescoring | nDCG@10 | Recall@10 | top-10 overlap with float32 "
                  "| bytes/row |\n|---|---|---|---|---|---|")
            for r in results[name]:
                print(f"| {r['precision']} | {r['rescore']} | {r['ndcg@10']:.4f} | "
                      f"{r['recall@10']:.4f} | {r['top10_overlap']:.3f} | "
                      f"{r['bytes_per_row']:g} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
