#!/usr/bin/env python
"""Embed a corpus and search it: dataset embeddings from the corpus itself, documents and
queries embedded with them, cosine top-k.

    python examples/search.py MODEL [--corpus FILE] [--limit N] [--top-k K] [--json OUT]
        [--query TEXT ...]

MODEL: a hub id (jxm/cde-small-v2, converted once and cached; --revision), a converted dir
or a released-layout dir. FILE: one document a line (default: the corpus cde_jax ships,
cde_jax/data/random_docs.txt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cde_jax
from cde_jax.convert.synthetic import is_synthetic
from cde_jax.resources import packaged_data

QUERIES = ["how do I check my phone's data usage?", "who is Jason Voorhees?",
           "macdonald polynomials"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    ap.add_argument("--corpus", default=packaged_data("random_docs.txt"))
    ap.add_argument("--limit", type=int, default=2000, help="first N lines of the corpus")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--query", action="append", help="a query (repeatable)")
    ap.add_argument("--json", help="write the hits here as JSON")
    args = ap.parse_args(argv)

    model = cde_jax.load(args.model, revision=args.revision)
    lines = Path(args.corpus).read_text(encoding="utf-8").splitlines()
    corpus = [line for line in lines if line.strip()][:args.limit]
    queries = args.query or QUERIES

    # 1. The corpus's own minicorpus -> dataset embeddings (once per corpus).
    dataset = model.embed_dataset(corpus, seed=0)
    # 2. Documents and queries, embedded with those dataset embeddings (L2-normalized).
    docs = model.encode_document(corpus, dataset_embeddings=dataset)
    hits = {}
    for query in queries:
        scores = model.similarity(model.encode_query(query, dataset_embeddings=dataset), docs)[0]
        best = scores.argsort()[::-1][:args.top_k]
        hits[query] = [{"doc": int(i), "score": float(scores[i]), "text": corpus[i]} for i in best]
        print(f"\n{query}")
        for hit in hits[query]:
            print(f"  {hit['score']:.3f}  [{hit['doc']}] {hit['text'][:90]}")
    print(f"\n{len(corpus)} documents, {docs.shape[1]}-dimensional embeddings")
    if is_synthetic(model.config_json):
        print("NOTE: random weights (a synthetic checkpoint): these scores mean nothing")
    if args.json:
        Path(args.json).write_text(json.dumps(hits, indent=2) + "\n")
    return hits


if __name__ == "__main__":
    main()
