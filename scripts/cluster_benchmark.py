#!/usr/bin/env python
"""Spherical k-means per iteration, cde-jax (JAX, `cde_jax.clustering`) vs faiss-cpu; the
starts (k-means||, random, greedy k-means++) by total time and objective; and the
end-to-end `cde-jax cluster` time with the tiny model.

    python scripts/cluster_benchmark.py [--points 200000] [--width 256] [--k 2048]
        [--iterations 8] [--rounds 3] [--inits kmeans||,random,kmeans++] [--pairs 100000]
        [--skip-iterations] [--skip-e2e] [--json OUT]

k-means: random unit vectors; each round runs JAX then faiss (contenders alternate), each
for `--iterations` Lloyd iterations from its own random init, faiss without subsampling and
with as many threads as JAX's CPU client uses (the cores this process may run on). The time
of an iteration is the gap between consecutive iterations (JAX: its progress callback, which
follows the iteration's device-to-host sync; faiss: `iteration_stats`), the first of each
run left out (it holds the init, and JAX's first round its compile); reported as medians.
Memory: the process's peak RSS, against the n x k float32 score matrix that the chunked
assignment never holds.

Starts: each init runs `spherical_kmeans` with the default settings (100 iterations at most,
nredo 3) on the same points, after one untimed 1-iteration run that compiles its programs;
total time (init and iterations of all runs) and the final objective.

End to end: `cde-jax cluster --model TINY` on `--pairs` synthetic pairs (defaults: 100
iterations, nredo 3), then the same command again with --overwrite, which reuses the vector
files: the difference is the embedding step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import cores

REPO = Path(__file__).resolve().parents[1]


def jax_gaps(points, k: int, iterations: int, seed: int) -> list[float]:
    from cde_jax import sharding
    from cde_jax.clustering import KMeansConfig, place_points, spherical_kmeans

    mesh = sharding.make_mesh()
    placed = place_points(points, np.arange(len(points)), mesh, KMeansConfig().tile_rows)
    stamps = []
    spherical_kmeans(placed, k, KMeansConfig(iterations=iterations, nredo=1), seed=seed,
                     mesh=mesh, progress=lambda _: stamps.append(time.perf_counter()))
    return np.diff(stamps).tolist()


def bench_inits(n: int, width: int, k: int, inits: list[str]) -> dict:
    from cde_jax import sharding
    from cde_jax.clustering import KMeansConfig, place_points, spherical_kmeans

    rng = np.random.default_rng(0)
    points = rng.standard_normal((n, width), dtype=np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    mesh = sharding.make_mesh()
    placed = place_points(points, np.arange(n), mesh, KMeansConfig().tile_rows)
    out = {}
    for init in inits:
        spherical_kmeans(placed, k, KMeansConfig(init=init, iterations=1, nredo=1), seed=0,
                         mesh=mesh)  # compile
        start = time.perf_counter()
        result = spherical_kmeans(placed, k, KMeansConfig(init=init), seed=0, mesh=mesh)
        out[init] = {"seconds": time.perf_counter() - start, "objective": result.objective,
                     "iterations": len(result.history)}
    return {"points": n, "width": width, "k": k, "inits": out}


def faiss_gaps(points, k: int, iterations: int, seed: int) -> list[float]:
    import faiss

    index = faiss.Kmeans(points.shape[1], k, niter=iterations, spherical=True, seed=seed,
                         max_points_per_centroid=len(points))  # every point, as cde-jax
    index.train(points)
    return np.diff([s["time"] for s in index.iteration_stats]).tolist()


def bench_kmeans(n: int, width: int, k: int, iterations: int, rounds: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(cores())
    rng = np.random.default_rng(0)
    points = rng.standard_normal((n, width), dtype=np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    jax_gaps(points, k, 2, seed=0)  # compile
    gaps: dict[str, list[float]] = {"jax": [], "faiss": []}
    for r in range(rounds):
        gaps["jax"] += jax_gaps(points, k, iterations, seed=r)
        gaps["faiss"] += faiss_gaps(points, k, iterations, seed=r)
    seconds = {name: statistics.median(g) for name, g in gaps.items()}
    return {"points": n, "width": width, "k": k, "threads": cores(),
            "seconds_per_iteration": seconds,
            "iterations_per_second": {name: 1 / s for name, s in seconds.items()},
            "jax_speed_vs_faiss": seconds["faiss"] / seconds["jax"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "score_matrix_bytes": n * k * 4}


def write_pairs(path: Path, pairs: int) -> None:
    """Positive = 20 to 60 consecutive words of a fallback-minicorpus document, query = 6 of
    its words."""
    from cde_jax.minicorpus import fallback_minicorpus

    docs = [d.split() for d in fallback_minicorpus() if len(d.split()) > 60]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(pairs):
            words = rng.choice(docs)
            start, length = rng.randrange(len(words) - 60), rng.randint(20, 60)
            positive = words[start:start + length]
            f.write(json.dumps({"query": " ".join(rng.sample(positive, 6)),
                                "positive": " ".join(positive)}) + "\n")


def bench_cluster_command(pairs: int, work: Path) -> dict:
    from cde_jax.convert.synthetic import make_synthetic_checkpoint
    from cde_jax.resources import packaged_data

    model = make_synthetic_checkpoint(work / "tiny", preset="tiny", seed=0,
                                      tokenizer_dir=packaged_data("modernbert-tokenizer"))
    data = work / "pairs.jsonl"
    write_pairs(data, pairs)
    cmd = [sys.executable, "-m", "cde_jax.cli", "cluster", "--model", str(model), "--data",
           str(data), "--out", str(work / "clustered.jsonl"), "--batch-size", "64", "-q"]
    env = {**os.environ, "CDE_JAX_CACHE_DIR": str(work / "xla")}
    seconds = []
    for again in ([], ["--overwrite"]):
        start = time.perf_counter()
        proc = subprocess.run(cmd + again, capture_output=True, text=True, env=env)
        seconds.append(time.perf_counter() - start)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
    return {"pairs": pairs, "batch_size": 64, "seconds": seconds[0],
            "seconds_vectors_reused": seconds[1], "embedding_seconds": seconds[0] - seconds[1],
            "summary": proc.stdout.strip()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inits", default="kmeans||,random,kmeans++",
                        help="starts to time end to end, comma-separated ('' for none)")
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--skip-iterations", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = {}
    if not args.skip_iterations:
        km = result["kmeans"] = bench_kmeans(args.points, args.width, args.k, args.iterations,
                                             args.rounds)
        print(f"k-means {args.points} x {args.width}, k {args.k}, {km['threads']} threads: "
              f"jax {km['iterations_per_second']['jax']:.3f} it/s, faiss "
              f"{km['iterations_per_second']['faiss']:.3f} it/s: jax at "
              f"{km['jax_speed_vs_faiss']:.2f}x faiss; peak RSS "
              f"{km['peak_rss_bytes'] / 2**30:.2f} GiB (an n x k score matrix: "
              f"{km['score_matrix_bytes'] / 2**30:.2f} GiB)")
    if args.inits:
        starts = result["inits"] = bench_inits(args.points, args.width, args.k,
                                               args.inits.split(","))
        for init, got in starts["inits"].items():
            print(f"init {init}: {got['seconds']:.1f} s in total ({got['iterations']} "
                  f"iterations over 3 runs), objective {got['objective']:.5f}")
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory() as work:
            e2e = result["cluster_command"] = bench_cluster_command(args.pairs, Path(work))
        print(f"cde-jax cluster, {args.pairs} pairs, tiny model: {e2e['seconds']:.1f} s "
              f"({e2e['embedding_seconds']:.1f} s embedding; {e2e['seconds_vectors_reused']:.1f}"
              f" s again with the vectors reused): {e2e['summary']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
