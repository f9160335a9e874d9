"""The minicorpus behind the dataset embeddings: sampling it, and saving what it produced.

Sampling follows SPEC section 5: `default_rng(seed).choice(texts, size, replace=len(texts) <
size)`, so fewer texts are oversampled deterministically (with a warning) and more are
sampled down to exactly `size`. No texts at all selects upstream's generic fallback
minicorpus (`random_docs.txt`, shipped with the package), which costs ~1.2 MTEB points.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from .io_utils import atomic_file
from .tokenization import packaged_data

DOCUMENT_PREFIX = "search_document: "


def fallback_minicorpus() -> list[str]:
    with packaged_data("random_docs.txt").open(encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def sample_minicorpus(texts, size: int, seed: int) -> list[str]:
    """Exactly `size` texts drawn from `texts` (None: the fallback minicorpus)."""
    if texts is None:
        texts = fallback_minicorpus()
    texts = list(texts)
    if not texts:
        raise ValueError("cannot build dataset embeddings from an empty list of texts "
                         "(pass None to use the generic fallback minicorpus)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"minicorpus text at index {i} is {type(text).__name__}, not str")
    if len(texts) < size:
        warnings.warn(f"only {len(texts)} texts for a minicorpus of {size}: oversampling "
                      f"with replacement (seed {seed})", stacklevel=3)
    return [texts[i] for i in sample_indices(len(texts), size, seed)]


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Which of `n` texts make the minicorpus, in order: one rule for the in-memory and the
    streaming (CLI) paths, so that both sample the same texts."""
    return np.random.default_rng(seed).choice(n, size, replace=n < size)


@dataclasses.dataclass(frozen=True)
class DatasetEmbeddings:
    """Dataset embeddings plus where they came from, as saved to `.npz`."""

    embeddings: np.ndarray  # (n, d) float32
    fingerprint: str        # the weights that made them
    prefix: str
    seed: int

    def save(self, path: str | Path) -> Path:
        with atomic_file(path) as f:
            np.savez(f, embeddings=self.embeddings, fingerprint=self.fingerprint,
                     prefix=self.prefix, seed=self.seed)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str, width: int) -> "DatasetEmbeddings":
        """Refuses embeddings made by other weights, of another width, or non-finite."""
        with np.load(path, allow_pickle=False) as z:
            missing = {"embeddings", "fingerprint", "prefix", "seed"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a dataset-embeddings file (missing "
                                 f"{sorted(missing)})")
            emb = np.asarray(z["embeddings"], np.float32)
            out = cls(emb, str(z["fingerprint"]), str(z["prefix"]), int(z["seed"]))
        if out.fingerprint != fingerprint:
            raise ValueError(f"{path}: made by model {out.fingerprint}, this model is "
                             f"{fingerprint}")
        if emb.ndim != 2 or emb.shape[1] != width:
            raise ValueError(f"{path}: embeddings of shape {emb.shape}, this model needs "
                             f"(n, {width})")
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad.size:
            raise ValueError(f"{path}: non-finite values in row(s) {bad[:10].tolist()}")
        return out
