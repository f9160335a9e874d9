"""cde_jax as an MTEB 2.x model: `mteb.evaluate(CdeMtebModel(model, tasks=tasks), tasks)`.

Implements MTEB's `EncoderProtocol` (`encode`, `similarity`, `similarity_pairwise`,
`mteb_model_meta`) and `SearchProtocol` (`index`, `search`), so retrieval and reranking tasks
hand their corpus to `index` and are searched exactly by `search.exact_top_k`.

The minicorpus (docs/model.md §7: `default_rng(42).choice(texts, 512, replace=len(texts) < 512)`) is
sampled once per (task name, hf_subset) and its context kept, from:
- retrieval-like tasks (`SEARCH_TYPES`): the task's corpus, joined title + " " + text by
  MTEB's own dataloader; `index` provides it, a bare `encode` looks the task up;
- classification tasks: the task's train split (the task is looked up by name);
- any other task: the texts of the first `encode` call for that (task, subset).
Tasks are looked up among `tasks` given to the constructor, else with `mteb.get_task` (which
may download). Prompts follow MTEB's priority rules (`get_prompt`) over `CDE_PROMPTS`, the
table MTEB registers for jxm/cde-small-v2: classification, pair classification, reranking,
STS and summarization "classification: ", clustering "clustering: ", otherwise queries
"search_query: " and documents "search_document: ".
Uses one private MTEB helper, `mteb._create_dataloaders.create_dataloader`, the same one MTEB's
own search wrapper uses to turn corpus and query datasets into texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mteb
import numpy as np
from mteb._create_dataloaders import create_dataloader
from mteb.models.abs_encoder import get_prompt
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from .. import prompts
from ..context import Context
from ..ops import cosine_similarity, l2_normalize
from ..text_api import CdeModel, load
from ..tokenization import MAX_LENGTH
from .retrieval import MINICORPUS_SEED
from .search import SearchTiles, exact_top_k, run_dict

CDE_PROMPTS = {
    "Classification": prompts.CLASSIFICATION,
    "MultilabelClassification": prompts.CLASSIFICATION,
    "Clustering": prompts.CLUSTERING,
    "PairClassification": prompts.CLASSIFICATION,
    "Reranking": prompts.CLASSIFICATION,
    "STS": prompts.CLASSIFICATION,
    "Summarization": prompts.CLASSIFICATION,
    PromptType.query.value: prompts.QUERY,
    PromptType.document.value: prompts.DOCUMENT,
}
SEARCH_TYPES = ("Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking")
CLASSIFICATION_TYPES = ("Classification", "MultilabelClassification")


def _texts(inputs) -> list[str]:
    """Texts from an MTEB dataloader (batches with a "text" column) or a list of strings."""
    if isinstance(inputs, str):
        raise TypeError("expected a dataloader or a list of texts, got one str")
    texts: list[str] = []
    for item in inputs:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and "text" in item:
            texts.extend(item["text"])
        else:
            raise TypeError(f"expected str items or batches with a 'text' column, got "
                            f"{type(item).__name__}")
    return texts


class CdeMtebModel:
    """A `CdeModel` (or a checkpoint dir or hub id at `revision`, loaded) behind MTEB's
    model protocols, with one `Context` per (task, subset). The metadata's revision is the
    weights' fingerprint."""

    def __init__(self, model: CdeModel | str | Path, revision: str | None = None, *,
                 device: str | None = None, tasks=(), model_prompts: dict | None = None,
                 seed: int = MINICORPUS_SEED, batch_size: int | None = None,
                 name: str | None = None, mesh=None, tiles: SearchTiles = SearchTiles()):
        if device is not None:
            raise ValueError("device is not supported: JAX places the model on `mesh`")
        if isinstance(model, CdeModel):
            if revision is not None:
                raise ValueError("revision applies to a hub id given by name, not to a loaded "
                                 "CdeModel (pass revision= to cde_jax.load)")
        else:  # a checkpoint dir, or a hub id at `revision` (converted once, then cached)
            name = name or f"cde-jax/{Path(model).name}"
            model = load(model, revision=revision, mesh=mesh)
        self.model, self.seed, self.batch_size, self.tiles = model, seed, batch_size, tiles
        self.name = name or f"cde-jax/{model.fingerprint[:16]}"
        self.model_prompts = dict(CDE_PROMPTS if model_prompts is None else model_prompts)
        self.tasks = {task.metadata.name: task for task in tasks}
        self.contexts: dict[tuple[str, str], Context] = {}  # (task, subset) -> its context
        self._index: tuple[list[str], np.ndarray] | None = None

    @property
    def mteb_model_meta(self) -> ModelMeta:
        return ModelMeta.create_empty({
            "name": self.name, "revision": self.model.fingerprint, "framework": ["JAX"],
            "embed_dim": self.model.hidden_size, "max_tokens": MAX_LENGTH,
            "similarity_fn_name": "cosine", "use_instructions": True, "open_weights": True,
            "modalities": ["text"], "model_type": ["dense"]})

    # --- one context per (task, subset) --------------------------------------------------
    def _task(self, task_metadata):
        task = self.tasks.get(task_metadata.name) or mteb.get_task(task_metadata.name)
        if not task.data_loaded:
            task.load_data()
        return task

    def minicorpus_source(self, task_metadata, hf_split: str, hf_subset: str,
                          texts: list[str]) -> list[str]:
        """The texts the minicorpus of this task is sampled from (see the module doc)."""
        if task_metadata.type in SEARCH_TYPES:
            corpus = self._task(task_metadata).dataset[hf_subset][hf_split]["corpus"]
            return _texts(create_dataloader(corpus, task_metadata=task_metadata,
                                            prompt_type=PromptType.document))
        if task_metadata.type in CLASSIFICATION_TYPES:
            task = self._task(task_metadata)
            data = task.dataset.get(hf_subset, task.dataset)
            return list(data[task.train_split][task.input_column_name])
        return texts

    def context(self, task_metadata, hf_subset: str, source) -> Context:
        """The context of (task, subset); `source()` gives the texts to sample its
        minicorpus from on first use."""
        key = (task_metadata.name, hf_subset)
        if key not in self.contexts:
            self.contexts[key] = self.model.context(source(), seed=self.seed,
                                                    batch_size=self.batch_size)
        return self.contexts[key]

    # --- EncoderProtocol -----------------------------------------------------------------
    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        """L2-normalized embeddings (len(inputs), d) with the task's prompt and context."""
        texts = _texts(inputs)
        context = self.context(
            task_metadata, hf_subset,
            lambda: self.minicorpus_source(task_metadata, hf_split, hf_subset, texts))
        prompt = get_prompt(self.model_prompts, task_metadata, prompt_type) or ""
        return context.encode(texts, prompt=prompt, batch_size=self.batch_size,
                              show_progress_bar=kwargs.get("show_progress_bar"))

    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        return cosine_similarity(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        return (l2_normalize(np.atleast_2d(np.asarray(embeddings1, np.float32)))
                * l2_normalize(np.atleast_2d(np.asarray(embeddings2, np.float32)))).sum(axis=1)

    # --- SearchProtocol ------------------------------------------------------------------
    def index(self, corpus, *, task_metadata, hf_split: str, hf_subset: str, encode_kwargs,
              num_proc: int | None = None, **kwargs: Any) -> None:
        """Embeds the corpus; its texts are the task's minicorpus source."""
        texts = _texts(create_dataloader(corpus, task_metadata=task_metadata,
                                         prompt_type=PromptType.document, num_proc=num_proc,
                                         **encode_kwargs))
        self.context(task_metadata, hf_subset, lambda: texts)
        docs = self.encode(texts, task_metadata=task_metadata, hf_split=hf_split,
                           hf_subset=hf_subset, prompt_type=PromptType.document,
                           **encode_kwargs)
        self._index = ([str(i) for i in corpus["id"]], docs)

    def search(self, queries, *, task_metadata, hf_split: str, hf_subset: str, top_k: int,
               encode_kwargs, top_ranked: dict[str, list[str]] | None = None,
               num_proc: int | None = None, **kwargs: Any) -> dict[str, dict[str, float]]:
        """{query id: {doc id: cosine}} of the top_k documents: exact search over the indexed
        corpus, or a re-ranking of `top_ranked`'s candidates."""
        if self._index is None:
            raise ValueError("search() before index(): no corpus")
        doc_ids, docs_nd = self._index
        loader = create_dataloader(queries, task_metadata=task_metadata,
                                   prompt_type=PromptType.query, num_proc=num_proc,
                                   **encode_kwargs)
        queries_qd = self.encode(loader, task_metadata=task_metadata, hf_split=hf_split,
                                 hf_subset=hf_subset, prompt_type=PromptType.query,
                                 **encode_kwargs)
        query_ids = [str(q) for q in queries["id"]]
        if top_ranked is None:
            return run_dict(query_ids, doc_ids, *exact_top_k(
                queries_qd, docs_nd, top_k, mesh=self.model.mesh, tiles=self.tiles))
        return rerank(query_ids, queries_qd, doc_ids, docs_nd, top_ranked, top_k)


def rerank(query_ids, queries_qd, doc_ids, docs_nd, top_ranked: dict[str, list[str]],
           top_k: int) -> dict[str, dict[str, float]]:
    """Each query's `top_ranked` candidates ordered by score, the best `top_k` kept."""
    row_of = {d: r for r, d in enumerate(doc_ids)}
    out = {}
    for q, query_d in zip(query_ids, queries_qd):
        candidates = top_ranked.get(q, [])
        unknown = [d for d in candidates if d not in row_of]
        if unknown:
            raise ValueError(f"top_ranked for query {q!r} names {len(unknown)} document(s) "
                             f"not in the corpus (e.g. {unknown[0]!r})")
        scores = docs_nd[[row_of[d] for d in candidates]] @ query_d
        best = np.argsort(-scores, kind="stable")[:top_k]
        out[q] = {candidates[i]: float(scores[i]) for i in best}
    return out
