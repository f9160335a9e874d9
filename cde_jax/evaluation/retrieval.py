"""Retrieval evaluation of a loaded model on one BEIR split, as docs/model.md §7 prescribes.

The minicorpus is sampled from the dataset's own documents (`embed_dataset(texts, seed)`,
i.e. `default_rng(seed).choice(texts, 512, replace=len(texts) < 512)`); documents get
"search_document: ", queries "search_query: "; embeddings are L2-normalized, so the exact
inner-product search ranks by cosine similarity. With a `precision` other than float32 the
documents are stored as `cde-jax embed --precision` stores them (int8/uint8 ranges from the
same calibration sample of the corpus) and ranked by quantized score, optionally rescored
(`search.quantized_top_k`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import distributed
from ..corpus.calibration import calibrated
from ..validation import UserError
from .beir import BeirDataset
from .metrics import MRR_DEPTH, ranking_metrics
from .search import RESCORE_DOCUMENTS, quantized_top_k, run_dict

MINICORPUS_SEED = 42  # docs/model.md §7


def rank_corpus(model, dataset: BeirDataset, depth: int, *, seed: int = MINICORPUS_SEED,
                batch_size: int | None = None, show_progress_bar: bool | None = None, **kw
                ) -> dict[str, dict[str, float]]:
    """{query id: {document id: score}} of the `depth` best documents, best first, for every
    judged query (MTEB's run format, in rank order); the score is the cosine in float32,
    else the quantized or rescored score (`kw`: `search_embedded`'s options). With several
    processes, each embeds its share of the documents and queries and searches its
    documents; all get the result."""
    first_row, docs_nd, queries_qd = embed_dataset_split(
        model, dataset, seed=seed, batch_size=batch_size, show_progress_bar=show_progress_bar)
    with tqdm(total=len(docs_nd), desc="search", unit="doc",
              disable=None if show_progress_bar is None else not show_progress_bar) as bar:
        scores_qk, ids_qk = search_embedded(queries_qd, docs_nd, depth, first_row=first_row,
                                            mesh=model.mesh, progress=bar.update, **kw)
    return run_dict(dataset.query_ids, dataset.doc_ids, scores_qk, ids_qk)


def embed_dataset_split(model, dataset: BeirDataset, *, seed: int = MINICORPUS_SEED,
                        batch_size: int | None = None, show_progress_bar: bool | None = None
                        ) -> tuple[int, np.ndarray, np.ndarray]:
    """(the first document row of this process's share, its documents' embeddings, every
    query's embedding), in the context of the dataset's own minicorpus."""
    context = model.context(model.embed_dataset(dataset.doc_texts, seed=seed,
                                                batch_size=batch_size,
                                                show_progress_bar=show_progress_bar))
    kw = dict(batch_size=batch_size, show_progress_bar=show_progress_bar)
    docs = distributed.process_share(len(dataset.doc_texts))
    docs_nd = context.encode_document(dataset.doc_texts[docs], **kw)
    queries = distributed.process_share(len(dataset.query_texts))
    queries_qd = distributed.gather_rows(
        context.encode_query(dataset.query_texts[queries], **kw), len(dataset.query_texts))
    return docs.start, docs_nd, queries_qd


def search_embedded(queries_qd: np.ndarray, docs_nd: np.ndarray, depth: int, *,
                    first_row: int = 0, precision: str = "float32",
                    rescore_multiplier: int | None = None, rescore_documents: str = "dequantized",
                    **kw) -> tuple[np.ndarray, np.ndarray]:
    """(scores (q, depth), document rows (q, depth)) of float32 embeddings, the documents
    stored in `precision` as `cde-jax embed` stores them (int8/uint8 ranges from the same
    calibration sample), rescored from the "dequantized" stored documents or the "float32"
    ones when `rescore_multiplier` is given (`search.quantized_top_k`; `kw`: its options)."""
    if rescore_documents not in RESCORE_DOCUMENTS:
        raise UserError(f"rescore_documents must be one of {RESCORE_DOCUMENTS}, got "
                        f"{rescore_documents!r}")
    n = int(distributed.sum_all(np.asarray(len(docs_nd))))
    mine = slice(first_row, first_row + len(docs_nd))
    quantization = calibrated(precision, docs_nd.shape[1], n, lambda sample: docs_nd[
        sample[(sample >= mine.start) & (sample < mine.stop)] - mine.start])
    return quantized_top_k(queries_qd, quantization.apply(docs_nd), quantization, depth,
                           rescore_multiplier=rescore_multiplier, first_row=first_row,
                           rescore_nd=docs_nd if rescore_documents == "float32" else None, **kw)


def evaluate_retrieval(model, dataset: BeirDataset, k_values: Sequence[int], **kw
                       ) -> dict[str, float]:
    """nDCG@k, Recall@k, MAP@k for each k and MRR@10 (see `metrics`); `kw` as `rank_corpus`."""
    depth = max(max(k_values), MRR_DEPTH)
    return ranking_metrics(dataset.qrels, rank_corpus(model, dataset, depth, **kw), k_values)
