"""Retrieval evaluation of a loaded model on one BEIR split, as docs/model.md §7 prescribes.

The minicorpus is sampled from the dataset's own documents (`embed_dataset(texts, seed)`,
i.e. `default_rng(seed).choice(texts, 512, replace=len(texts) < 512)`); documents get
"search_document: ", queries "search_query: "; embeddings are L2-normalized, so the exact
inner-product search ranks by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from .. import distributed
from .beir import BeirDataset
from .metrics import MRR_DEPTH, ranking_metrics
from .search import SearchTiles, exact_top_k, run_dict

MINICORPUS_SEED = 42  # docs/model.md §7


def rank_corpus(model, dataset: BeirDataset, depth: int, *, seed: int = MINICORPUS_SEED,
                batch_size: int | None = None, tiles: SearchTiles = SearchTiles(),
                show_progress_bar: bool | None = None) -> dict[str, dict[str, float]]:
    """{query id: {document id: cosine}} of the `depth` best documents, best first, for every
    judged query (MTEB's run format, in rank order). With several processes, each embeds its
    share of the documents and queries and searches its documents; all get the result."""
    context = model.context(model.embed_dataset(dataset.doc_texts, seed=seed,
                                                batch_size=batch_size,
                                                show_progress_bar=show_progress_bar))
    kw = dict(batch_size=batch_size, show_progress_bar=show_progress_bar)
    docs = distributed.process_share(len(dataset.doc_texts))
    docs_nd = context.encode_document(dataset.doc_texts[docs], **kw)
    queries = distributed.process_share(len(dataset.query_texts))
    queries_qd = distributed.gather_rows(
        context.encode_query(dataset.query_texts[queries], **kw), len(dataset.query_texts))
    with tqdm(total=len(docs_nd), desc="search", unit="doc",
              disable=None if show_progress_bar is None else not show_progress_bar) as bar:
        scores_qk, ids_qk = exact_top_k(queries_qd, docs_nd, depth, mesh=model.mesh,
                                        tiles=tiles, first_row=docs.start,
                                        progress=bar.update)
    return run_dict(dataset.query_ids, dataset.doc_ids, scores_qk, ids_qk)


def evaluate_retrieval(model, dataset: BeirDataset, k_values: Sequence[int], **kw
                       ) -> dict[str, float]:
    """nDCG@k, Recall@k, MAP@k for each k and MRR@10 (see `metrics`); `kw` as `rank_corpus`."""
    depth = max(max(k_values), MRR_DEPTH)
    return ranking_metrics(dataset.qrels, rank_corpus(model, dataset, depth, **kw), k_values)
