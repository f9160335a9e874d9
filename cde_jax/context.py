"""The dataset context: one corpus's dataset embeddings bound to one model, with the second
stage's prefix computed from them once.

A CDE embedding is always relative to a corpus. `model.context(corpus)` makes that explicit
and reusable: build it once per corpus, then embed any number of queries and documents with
it; the prefix (the dataset embeddings and soft tokens through the embedding norm, and
their layer-0 q/k/v) lives on the devices for as long as the context does. The corpus job,
evaluation, MTEB and the server each hold one per corpus.

    ctx = model.context(corpus_texts)          # or a DatasetEmbeddings, an (m, d) array,
                                               # a dataset-embeddings .npz, None
    queries = ctx.encode_query(["what is a cde?"])
    docs = ctx.encode_document(corpus_texts)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol, Union

import numpy as np

from . import prompts, validation
from .minicorpus import DatasetEmbeddings
from .model import Prefix
from .ops import l2_normalize
from .runner import StageRunner
from .validation import UserError


class CdeModel(Protocol):
    """What a context uses of its model; `text_api.CdeModel` is one. Named here, not imported,
    so that the import runs one way: text_api -> context."""

    runner: StageRunner
    fingerprint: str
    hidden_size: int

    def tokenize(self, texts: Sequence[str], prompt: str = "") -> list[list[int]]: ...

    def array_batch(self, input_ids, attention_mask
                    ) -> tuple[np.ndarray, np.ndarray, StageRunner]: ...

    def run_texts(self, token_ids: Sequence[Sequence[int]], stage, **kw) -> np.ndarray: ...

    def embed_dataset(self, texts: Sequence[str], *, seed: int = 0, **kw) -> np.ndarray: ...

    def load_dataset_embeddings(self, path: str | os.PathLike) -> DatasetEmbeddings: ...

# What a context can be made from (`Context.of`).
ContextSource = Union["Context", DatasetEmbeddings, np.ndarray, str, os.PathLike,
                      Sequence[str], None]


class Context:
    """Dataset embeddings (m, d) float32, or None for null-dataset mode, and their prefix."""

    def __init__(self, model: CdeModel, dataset_embeddings_md: np.ndarray | None):
        self.model = model
        self.dataset_embeddings = dataset_embeddings_md
        self.prefix: Prefix = model.runner.prefix(dataset_embeddings_md)

    @classmethod
    def of(cls, model: CdeModel, source: ContextSource, *, seed: int = 0,
           batch_size: int | None = None) -> Context:
        """`model`'s context of `source`: the corpus's texts (a minicorpus is sampled with
        `seed` and embedded, `model.embed_dataset`), a `DatasetEmbeddings` made by this
        model, an (m, d) array of dataset embeddings, the path of a dataset-embeddings file,
        a `Context` of this model (returned as it is), or None (null-dataset mode)."""
        if isinstance(source, Context):
            if source.model is not model:
                raise UserError("this context belongs to another model")
            return source
        if isinstance(source, (str, os.PathLike)):
            source = model.load_dataset_embeddings(source)
        if isinstance(source, DatasetEmbeddings):
            source = source.for_model(model.fingerprint)
        elif isinstance(source, Sequence) and source and isinstance(source[0], str):
            source = model.embed_dataset(source, seed=seed, batch_size=batch_size)
        rows_md = None if source is None else validation.embedding_rows(
            source, "dataset embeddings", model.hidden_size)
        return cls(model, rows_md)

    @property
    def prefix_length(self) -> int:
        """Positions the prefix adds before each text (dataset rows + soft tokens)."""
        return self.prefix.embeds.shape[-2]

    def encode(self, texts: str | Sequence[str], *, prompt_name: str | None = None,
               prompt: str | None = None, batch_size: int | None = None,
               normalize_embeddings: bool = True, show_progress_bar: bool | None = None,
               progress: Callable[[int], object] | None = None) -> np.ndarray:
        """Embeddings (len(texts), d) float32 in input order, or one (d,) vector for one
        str; L2-normalized by default. prompt_name: "query" or "document" selects the task
        prefix; `prompt` gives one directly (e.g. "clustering: "); neither: texts as they
        are. progress: called with the number of texts done after each batch (an outer
        progress bar), instead of this call's own bar."""
        prompt = prompts.by_name(prompt_name) if prompt is None else prompt
        one = isinstance(texts, str)
        out = self.encode_tokens(self.model.tokenize([texts] if one else texts, prompt),
                                 batch_size=batch_size,
                                 normalize_embeddings=normalize_embeddings,
                                 show_progress_bar=show_progress_bar, progress=progress)
        return out[0] if one else out

    def encode_query(self, texts: str | Sequence[str], **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="query", **kw)

    def encode_document(self, texts: str | Sequence[str], **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="document", **kw)

    def encode_tokens(self, token_ids: Sequence[Sequence[int]], *,
                      batch_size: int | None = None, normalize_embeddings: bool = True,
                      show_progress_bar: bool | None = None,
                      progress: Callable[[int], object] | None = None) -> np.ndarray:
        """`encode` of token id lists from `model.tokenize(texts, prompt)` (which hold their
        prompt): how texts tokenized ahead, e.g. in reader threads, are embedded."""
        out = self.model.run_texts(token_ids, self.model.runner.second(self.prefix),
                                   batch_size=batch_size, show_progress_bar=show_progress_bar,
                                   desc="encode", extra_len=self.prefix_length,
                                   progress=progress)
        return l2_normalize(out) if normalize_embeddings else out

    def second_stage(self, input_ids, attention_mask) -> np.ndarray:
        """The array API: (b, d) float32, unnormalized, of tokenized texts (validated)."""
        ids_bs, mask_bs, runner = self.model.array_batch(input_ids, attention_mask)
        return runner.run(runner.second(self.prefix), ids_bs, mask_bs)
