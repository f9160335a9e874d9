#!/usr/bin/env python
"""Host throughput of one `cde-jax embed` process without the model: what it must sustain to
keep an accelerator busy. Each chunk is read and checked (`cde_jax.corpus.source`),
tokenized with the model's tokenizer, padded into the length buckets the runner uses, and
its (zero) embeddings committed to a `.zarr` sink, exactly as the corpus job does, with
Grain reading and tokenizing the next chunks in `--threads` threads.

    python scripts/host_benchmark.py [--docs 20000] [--words 200] [--chunk-rows 1024]
                                     [--threads 1,2] [--json OUT]

Each thread count runs in a fresh interpreter (TOKENIZERS_PARALLELISM is read once, by the
Rust side, and set to false: Grain's threads are the parallelism, as in the job). Prints
texts/s, with the single-thread time of each stage. Reference point: the H100 target of the
accelerator work, ~2,600 256-token documents/s per GPU, is ~20,000/s for an 8-GPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import cores

REPO = Path(__file__).resolve().parents[1]
WIDTH = 768


def make_corpus(path: Path, docs: int, words: int) -> None:
    """`docs` lines of `words` words drawn from the fallback minicorpus's vocabulary."""
    from cde_jax.minicorpus import fallback_minicorpus

    vocabulary = " ".join(fallback_minicorpus()).split()
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(" ".join(rng.choices(vocabulary, k=words)) + "\n")


def tokenizer():
    from cde_jax.resources import packaged_data
    from cde_jax.tokenization import TextTokenizer, load_tokenizer

    return TextTokenizer(load_tokenizer(packaged_data("modernbert-tokenizer")), pad_id=50283)


def pad_buckets(token_ids) -> int:
    """Pads the chunk into the runner's bucket batches; returns the padded token count."""
    from cde_jax import buckets
    from cde_jax.tokenization import pad_batch

    plan = buckets.BucketPlan()
    padded = 0
    for length, rows in buckets.plan_batches([len(t) for t in token_ids], plan,
                                              lambda n: plan.batch_size(n, 1)):
        ids, _ = pad_batch(token_ids, rows, length, 50283)
        padded += ids.size
    return padded


def run(corpus: str, out: str, chunk_rows: int, threads: int) -> dict:
    """One process, all chunks: read + tokenize in Grain threads, pad + write here."""
    import grain

    from cde_jax.corpus import sinks
    from cde_jax.corpus.source import open_chunks

    start = time.perf_counter()
    source = open_chunks(corpus, chunk_rows)
    indexed = time.perf_counter()
    sink = sinks.open_sink(out, rows=source.rows, width=WIDTH, chunk_rows=chunk_rows,
                           key="bench", id_kind="int")
    tok = tokenizer()
    reader = grain.MapDataset.source(list(range(len(source)))).map(source.__getitem__).map(
        lambda c: (c, tok.encode(["search_document: " + t for t in c.texts]))
    ).to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    texts = tokens = 0
    for chunk, token_ids in reader:
        tokens += pad_buckets(token_ids)
        sink.write_chunk(chunk.index, chunk.ids, np.zeros((len(chunk.texts), WIDTH), np.float32))
        texts += len(chunk.texts)
    done = time.perf_counter()
    return {"threads": threads, "texts": texts, "padded_tokens": tokens,
            "index_s": indexed - start, "run_s": done - indexed,
            "texts_per_s": texts / (done - indexed)}


def stages(corpus: str, chunk_rows: int) -> dict:
    """Texts/s of each stage alone, one thread."""
    from cde_jax.corpus.source import open_chunks

    t0 = time.perf_counter()
    source = open_chunks(corpus, chunk_rows)
    t1 = time.perf_counter()
    chunks = [source[i] for i in range(len(source))]
    t2 = time.perf_counter()
    tok = tokenizer()
    encoded = [tok.encode(["search_document: " + t for t in c.texts]) for c in chunks]
    t3 = time.perf_counter()
    for e in encoded:
        pad_buckets(e)
    t4 = time.perf_counter()
    n = source.rows
    return {"index": n / (t1 - t0), "read+check": n / (t2 - t1), "tokenize": n / (t3 - t2),
            "pad": n / (t4 - t3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON arguments of one `run`
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run(**json.loads(args.worker))))
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        make_corpus(corpus, args.docs, args.words)
        result = {"docs": args.docs, "words": args.words, "chunk_rows": args.chunk_rows,
                  "cpus": cores(),
                  "stages_texts_per_s": stages(str(corpus), args.chunk_rows), "runs": []}
        print(f"{args.docs} docs x {args.words} words ({corpus.stat().st_size / 1e6:.1f} MB), "
              f"chunks of {args.chunk_rows}, {result['cpus']} CPUs")
        print("one thread, per stage: " + ", ".join(
            f"{k} {v:,.0f} texts/s" for k, v in result["stages_texts_per_s"].items()))
        for threads in map(int, args.threads.split(",")):
            worker = {"corpus": str(corpus), "out": str(Path(tmp) / f"t{threads}.zarr"),
                      "chunk_rows": args.chunk_rows, "threads": threads}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(worker)],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            row = json.loads(done.stdout.strip().splitlines()[-1])
            result["runs"].append(row)
            print(f"{threads} thread(s): {row['texts_per_s']:,.0f} texts/s "
                  f"(read + tokenize + pad + write; index {row['index_s']:.2f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
