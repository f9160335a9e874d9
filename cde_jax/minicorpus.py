"""The minicorpus behind dataset embeddings: sampling it, and the dataset-embeddings file.

Sampling follows docs/model.md ("The minicorpus"): `default_rng(seed).choice(texts, size,
replace=len(texts) < size)`, so fewer texts are oversampled deterministically (with a
warning) and more are sampled down to exactly `size`. When nothing is known about the
corpus, `fallback_minicorpus()` gives upstream's generic documents (`random_docs.txt`,
shipped with the package), which cost ~1.2 MTEB points.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
import zipfile
from pathlib import Path

import numpy as np

from . import prompts, storage, validation
from .outputs import atomic_file
from .resources import packaged_data
from .validation import UserError


def fallback_minicorpus() -> list[str]:
    with packaged_data("random_docs.txt").open(encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def sample_minicorpus(texts, size: int, seed: int) -> list[str]:
    """Exactly `size` texts drawn from `texts`."""
    if texts is None:
        raise TypeError("texts is None: pass the corpus's texts, or fallback_minicorpus() "
                        "when nothing is known about the corpus")
    texts = validation.texts(texts, "minicorpus text")
    if not texts:
        raise UserError("cannot build dataset embeddings from an empty list of texts "
                        "(use fallback_minicorpus() when there is no corpus)")
    if len(texts) < size:
        warnings.warn(f"only {len(texts)} texts for a minicorpus of {size}: oversampling "
                      f"with replacement (seed {seed})", stacklevel=3)
    return [texts[i] for i in sample_indices(len(texts), size, seed)]


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """Which of `n` texts make the minicorpus, in order: one rule for the in-memory and the
    streaming (CLI) paths, so that both sample the same texts."""
    return np.random.default_rng(seed).choice(n, size, replace=n < size)


MEMBERS = {"embeddings", "fingerprint", "prefix", "seed"}  # of a dataset-embeddings file


@dataclasses.dataclass(frozen=True)
class DatasetEmbeddings:
    """A dataset-embeddings file (`.npz`): the (m, d) array plus where it came from."""

    embeddings: np.ndarray  # (m, d) float32
    fingerprint: str        # the weights that made them
    prefix: str
    seed: int

    def save(self, path: str | Path) -> str | Path:
        """Atomically (`outputs.atomic_file`: a local path or a gs:// / s3:// URL)."""
        with atomic_file(path) as f:
            np.savez(f, embeddings=self.embeddings, fingerprint=self.fingerprint,
                     prefix=self.prefix, seed=self.seed)
        return path if storage.is_url(path) else Path(path)

    def for_model(self, fingerprint: str) -> np.ndarray:
        """The embeddings, when they were made by the weights with this fingerprint."""
        if self.fingerprint != fingerprint:
            raise UserError(f"dataset embeddings made by model {self.fingerprint}; this model "
                            f"is {fingerprint}")
        return self.embeddings

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str, width: int) -> DatasetEmbeddings:
        """Refuses a file that is not one, and embeddings made by other weights, of another
        width, or non-finite."""
        try:
            out = cls._read(path)
        except UserError:
            raise
        except (IsADirectoryError, PermissionError) as e:
            raise UserError(f"{path}: cannot read it ({e.strerror})") from None
        except (ValueError, TypeError, EOFError, zipfile.BadZipFile) as e:
            detail = f"{type(e).__name__}: {e}".splitlines()[0]
            raise UserError(f"{path}: not a dataset-embeddings file ({detail})") from None
        if out.fingerprint != fingerprint:
            raise UserError(f"{path}: made by model {out.fingerprint}, this model is "
                            f"{fingerprint}")
        validation.embedding_rows(out.embeddings, f"{path}: dataset embeddings", width)
        return out

    @classmethod
    def _read(cls, path: str | Path) -> DatasetEmbeddings:
        with storage.open_file(path) as f:
            data = f.read()
        head = data[:6]
        if not head.startswith(b"PK\x03\x04"):  # np.savez writes a zip archive
            what = "a .npy array" if head == b"\x93NUMPY" else "not an .npz archive"
            raise UserError(f"{path}: not a dataset-embeddings file ({what}; make one with "
                            "`cde-jax dataset-embeddings`)")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:  # never unpickled
            missing, unknown = MEMBERS - set(z.files), set(z.files) - MEMBERS
            if missing or unknown:
                wrong = ", ".join(f"{what} {sorted(names)}" for what, names in
                                  (("missing", missing), ("unknown members", unknown)) if names)
                raise UserError(f"{path}: not a dataset-embeddings file ({wrong})")
            return cls(np.asarray(z["embeddings"], np.float32), str(z["fingerprint"]),
                       str(z["prefix"]), int(z["seed"]))


def record(embeddings_md: np.ndarray, fingerprint: str, seed: int) -> DatasetEmbeddings:
    """The file record of dataset embeddings made from "search_document: " texts."""
    return DatasetEmbeddings(embeddings_md, fingerprint, prompts.DOCUMENT, seed)
