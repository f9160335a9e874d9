"""The corpus job that `embed`, `dataset-embeddings` and `eval` share: a chunked source of
(ids, texts) that every process reads its own share of (`source`), the stage runner, and a
sink that commits chunks atomically and resumes after any kill (`sinks`); `job` ties them
together under N processes (`cde_jax.distributed`)."""

from .sinks import read_embeddings
from .source import InputError, lines, open_chunks

__all__ = ["InputError", "lines", "open_chunks", "read_embeddings"]
