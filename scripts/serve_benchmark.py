#!/usr/bin/env python
"""Load on `cde-jax serve`: dynamic batching against batch size 1, on 127.0.0.1 only.

    python scripts/serve_benchmark.py [--model DIR] [--preset tiny|base] [--clients 1,8,32]
                                      [--requests 16] [--rounds 3] [--max-seq-length 64]
                                      [--json OUT]

Two servers of the same checkpoint and context run side by side: the default (dynamic
batching over the device's bucket plan) and `--batch-size 1`. For each number of concurrent
clients, each client sends `--requests` short queries (one text each, OpenAI route) one
after the other; the servers take turns (A, B, A, B, ...) for `--rounds` rounds after one
warm-up round, and every figure is the median of the rounds: requests/s, p50 and p99
latency, mean texts per batch, batch fill (texts / rows run: padding rows lower it), the
batcher's model time per text
(`cde_serve_batch_seconds_sum` from /metrics over the texts), and the device-idle fraction,
1 - (that model time) / (wall time). The load generator (asyncio +
httpx) runs on the same machine as the servers. Without --model a random-weight synthetic
checkpoint of --preset is made, with random dataset embeddings. The queries are under 16
tokens: --max-seq-length (64) only bounds what the servers compile at start.

On an accelerator run it with `--preset base` (or --model): there a batch of a few rows
costs about what one row does, so the dynamic server's requests/s should grow with the
clients (toward 8x the batch-size-1 server's at 8 clients, more at 32), at a p50 near one
batch's time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

START_SECONDS = 900  # start-up compiles every bucket; base size on a CPU takes minutes
QUERY_WORDS = ("what", "is", "a", "contextual", "document", "embedding", "for", "retrieval")


def checkpoint_and_context(args, work: Path) -> tuple[Path, Path]:
    from cde_jax.convert import convert, read_converted
    from cde_jax.convert.synthetic import make_synthetic_checkpoint
    from cde_jax.minicorpus import DatasetEmbeddings
    from cde_jax.prompts import DOCUMENT

    model = args.model or convert(make_synthetic_checkpoint(
        work / "released", preset=args.preset), work / "converted")
    ckpt = read_converted(model)
    rows = np.random.default_rng(0).standard_normal(
        (ckpt.cde.transductive_corpus_size, ckpt.backbone.hidden_size)).astype(np.float32)
    return model, DatasetEmbeddings(rows, ckpt.fingerprint, DOCUMENT, 0).save(
        work / "context.npz")


def start_server(model: Path, context: Path, log: Path, extra: list[str],
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "cde_jax.cli", "serve", "--model", str(model), "--context",
             f"bench={context}", "--host", "127.0.0.1", "--port", "0", *extra],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + START_SECONDS
    while not (found := re.search(r"listening on (http://\S+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return process, found.group(1)


def metric_samples(url: str, headers: dict | None = None) -> dict[tuple, float]:
    """Every sample of /metrics: {(name, ((label, value), ...)): value}."""
    answer = httpx.get(url + "/metrics", timeout=60, headers=headers)
    answer.raise_for_status()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(answer.text) for s in f.samples}


def metric_sums(url: str) -> dict[str, float]:
    return {name: value for (name, labels), value in metric_samples(url).items() if not labels}


async def load(url: str, clients: int, requests: int) -> dict:
    """`clients` concurrent clients, each sending `requests` one-text queries in turn."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client(c: int):
            for r in range(requests):
                words = " ".join(QUERY_WORDS[(c + r) % len(QUERY_WORDS):] or QUERY_WORDS)
                start = time.perf_counter()
                answer = await http.post("/v1/embeddings", json={
                    "model": "bench", "input": f"{words} {c} {r}"})
                latencies.append(time.perf_counter() - start)
                answer.raise_for_status()

        before = metric_sums(url)
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
        after = metric_sums(url)
    batches = after["cde_serve_batch_texts_count"] - before["cde_serve_batch_texts_count"]
    texts = after["cde_serve_batch_texts_sum"] - before["cde_serve_batch_texts_sum"]
    busy = after["cde_serve_batch_seconds_sum"] - before["cde_serve_batch_seconds_sum"]
    padding = after["cde_serve_padding_rows_total"] - before["cde_serve_padding_rows_total"]
    return {"requests_per_s": len(latencies) / wall,
            "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
            "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
            "texts_per_batch": texts / batches, "batch_fill": texts / (texts + padding),
            "model_ms_per_text": 1e3 * busy / texts,
            "device_idle": 1 - busy / wall,
            "compiles": after["cde_serve_xla_compiles_total"]
            - before["cde_serve_xla_compiles_total"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a converted checkpoint (default: synthetic)")
    ap.add_argument("--preset", choices=("tiny", "base"), default="tiny")
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=16, help="queries per client per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args(argv)
    modes = {"dynamic": [], "batch_size_1": ["--batch-size", "1"]}
    common = ["--max-seq-length", str(args.max_seq_length)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("CDE_JAX_CACHE_DIR", str(work / "xla"))
        model, context = checkpoint_and_context(args, work)
        servers = {}
        try:
            for mode, extra in modes.items():
                servers[mode] = start_server(model, context, work / f"{mode}.log",
                                             common + extra)
            results: dict = {}
            for clients in map(int, args.clients.split(",")):
                rounds = {mode: [] for mode in modes}
                for r in range(args.rounds + 1):  # round 0 warms up
                    for mode, (_, url) in servers.items():
                        result = asyncio.run(load(url, clients, args.requests))
                        if r:
                            rounds[mode].append(result)
                results[clients] = {mode: {key: statistics.median(x[key] for x in runs)
                                           for key in runs[0]} for mode, runs in rounds.items()}
                for mode, figures in results[clients].items():
                    print(f"{clients:3d} clients, {mode:13s}: " + ", ".join(
                        f"{k} {v:.3g}" for k, v in figures.items()), flush=True)
                ratio = (results[clients]["dynamic"]["requests_per_s"]
                         / results[clients]["batch_size_1"]["requests_per_s"])
                results[clients]["throughput_ratio"] = ratio
                print(f"{clients:3d} clients: dynamic / batch size 1 throughput {ratio:.2f}x "
                      f"(1-min load average {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            for process, _ in servers.values():
                process.send_signal(signal.SIGTERM)
            codes = [process.wait(120) for process, _ in servers.values()]
    if any(codes):
        raise SystemExit(f"a server exited with {codes}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "model": str(args.model),
                                         "load_average": os.getloadavg(),
                                         "requests_per_client": args.requests,
                                         "rounds": args.rounds, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
