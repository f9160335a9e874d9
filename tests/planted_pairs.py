"""Planted query/document pairs (tests/test_kmeans_init.py, scripts/cluster_benchmark.py):
`clusters` random centers in `d` dimensions, `per` pairs around each; query and positive are
the center plus independent noise. Written as `cde-jax cluster` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def planted_pairs(root: Path, seed: int, clusters: int = 64, per: int = 32, d: int = 64,
                  noise: float = 0.1) -> np.ndarray:
    """Writes root/train.jsonl, q.npy, d.npy (ids: line numbers); returns each line's
    planted cluster."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(clusters), per))
    centers = rng.standard_normal((clusters, d))
    root.mkdir(parents=True, exist_ok=True)
    ids = "".join(f"{i}\n" for i in range(1, len(labels) + 1))
    for name in ("q", "d"):
        side = centers[labels] + noise * rng.standard_normal((len(labels), d))
        np.save(root / f"{name}.npy", side.astype(np.float32))
        (root / f"{name}.npy.ids.jsonl").write_text(ids)
    (root / "train.jsonl").write_text("".join(
        json.dumps({"query": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(len(labels))))
    return labels


def batch_purity(labels: np.ndarray, batches: list) -> float:
    """The share of batched pairs whose planted cluster is their batch's most common one."""
    by_batch: dict[int, list[int]] = {}
    for label, batch in zip(labels, batches):
        if batch is not None:
            by_batch.setdefault(batch, []).append(int(label))
    return sum(np.bincount(m).max() for m in by_batch.values()) / sum(map(len,
                                                                         by_batch.values()))
