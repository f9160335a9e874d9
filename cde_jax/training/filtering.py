"""False-negative filtering (upstream's `hn_tune_threshold`): in a batch drawn from one
neighbourhood, another query's positive is often a right answer too. A fixed filter model
scores every query of a batch against every document of it; a document that scores at least
the threshold (a cosine), or at least the query's own positive (`positive`), counts as one
of the query's positives in the contrastive loss instead of a negative. The query's own
hard negatives are never promoted (they were mined as negatives), as upstream.

Filter vectors come from a cde-jax model's first stage (every distinct query and document
of the training file embedded once, before the first step) or from precomputed files whose
ids are the training file's line numbers (`cde-jax cluster --model` writes such files):
those hold each line's query and positive, so a hard negative is scored only when its text
is also some line's positive.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .. import distributed, prompts
from ..config import setting
from ..corpus.sinks import embeddings_by_id
from ..ops import l2_normalize
from ..validation import UserError, finite_rows
from .data import Example

log = logging.getLogger(__name__)

POSITIVE = "positive"


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    false_negative_threshold: str | None = setting(
        None, help="count an in-batch document as a query's positive when the filter's "
                   "cosine for the pair is at least this number, or at least the query's "
                   "own positive's ('positive') (default: no filtering)")
    filter_model: str | None = setting(None, help="the filter: a cde-jax model (its first "
                                                  "stage)")
    filter_query_embeddings: str | None = setting(
        None, help="the filter: precomputed query vectors, ids = the training file's line "
                   "numbers (any `read_embeddings` format)")
    filter_document_embeddings: str | None = setting(
        None, help="the filter: precomputed positive vectors, ids as the query vectors'")

    def __post_init__(self):
        sources = (self.filter_model, self.filter_query_embeddings,
                   self.filter_document_embeddings)
        if self.false_negative_threshold is None:
            if any(sources):
                raise UserError("a filter model or filter vectors need "
                                "--false-negative-threshold")
            return
        self.threshold  # noqa: B018 (checks the value)
        files = sources[1:]
        if (self.filter_model is None) == (None in files) or (None in files and any(files)):
            raise UserError("--false-negative-threshold needs --filter-model, or both "
                            "--filter-query-embeddings and --filter-document-embeddings")

    @property
    def threshold(self) -> float | None:
        """The cosine limit, or None for the query's own positive's score."""
        if self.false_negative_threshold == POSITIVE:
            return None
        try:
            value = float(self.false_negative_threshold)
        except ValueError:
            value = np.nan
        if not -1.0 <= value <= 1.0:
            raise UserError(f"false_negative_threshold must be a cosine in [-1, 1] or "
                            f"'{POSITIVE}', got {self.false_negative_threshold!r}")
        return value


class FalseNegativeFilter:
    """Fixed unit vectors of texts; called on a batch's texts, its false-negative mask."""

    def __init__(self, threshold: float | None, queries: dict[str, np.ndarray],
                 documents: dict[str, np.ndarray]):
        self.threshold, self.queries, self.documents = threshold, queries, documents
        self._missing = np.full(next(iter(queries.values())).shape, np.nan, np.float32)

    def __call__(self, queries: list[str], documents: list[str], negatives: int,
                 positive_qc: np.ndarray) -> np.ndarray:
        """(q, c) bool: the pairs that were negatives and count as positives. `documents`
        are the q positives, then each query's `negatives` hard negatives in query order."""
        queries_qd = np.stack([self.queries[t] for t in queries])
        documents_cd = np.stack([self.documents.get(t, self._missing) for t in documents])
        scores_qc = queries_qd @ documents_cd.T  # NaN where a document has no vector
        q = len(queries)
        limit_q = (np.diagonal(scores_qc)[:q] if self.threshold is None
                   else np.full(q, self.threshold, np.float32))
        owner_c = np.concatenate([np.arange(q), np.repeat(np.arange(q), negatives)])
        own_qc = owner_c[None, :] == np.arange(q)[:, None]
        return (scores_qc >= limit_q[:, None]) & ~own_qc & ~positive_qc


def _first_stage(model, texts: list[str], prompt: str) -> np.ndarray:
    """Unit first-stage vectors of `texts` on every process, each embedding its share."""
    mine = texts[distributed.process_share(len(texts))]
    rows = model.run_texts(model.tokenize(mine, prompt), model.runner.first(), batch_size=None,
                           show_progress_bar=None, desc="filter vectors")
    return l2_normalize(distributed.gather_rows(rows, len(texts)))


def build_filter(cfg: FilterConfig, examples: list[Example], load_model
                 ) -> FalseNegativeFilter | None:
    """The filter `cfg` describes (None without a threshold); `load_model(path)` loads the
    filter model."""
    if cfg.false_negative_threshold is None:
        return None
    if cfg.filter_model is not None:
        model = load_model(cfg.filter_model)
        queries = list(dict.fromkeys(e.query for e in examples))
        documents = list(dict.fromkeys(d for e in examples for d in (e.positive, *e.negatives)))
        return FalseNegativeFilter(
            cfg.threshold, dict(zip(queries, _first_stage(model, queries, prompts.QUERY))),
            dict(zip(documents, _first_stage(model, documents, prompts.DOCUMENT))))
    lines = [e.line for e in examples]

    def by_text(texts: list[str], path: str) -> dict[str, np.ndarray]:
        vectors_nd = l2_normalize(finite_rows(embeddings_by_id(path, lines), f"{path}: vectors"))
        table: dict[str, np.ndarray] = {}
        for text, vector_d in zip(texts, vectors_nd):  # a repeated text: its first line's
            table.setdefault(text, vector_d)
        return table

    vectors = (by_text([e.query for e in examples], cfg.filter_query_embeddings),
               by_text([e.positive for e in examples], cfg.filter_document_embeddings))
    unscored = {n for e in examples for n in e.negatives} - vectors[1].keys()
    if unscored:
        log.warning("%d hard negative texts are no line's positive: the filter vectors do "
                    "not cover them, so they are never counted as positives", len(unscored))
    return FalseNegativeFilter(cfg.threshold, *vectors)
