"""Retrieval evaluation of a loaded model on one BEIR split, as docs/model.md §7 prescribes.

The minicorpus is sampled from the dataset's own documents (`embed_dataset(texts, seed)`,
i.e. `default_rng(seed).choice(texts, 512, replace=len(texts) < 512)`); documents get
"search_document: ", queries "search_query: "; embeddings are L2-normalized, so the exact
inner-product search ranks by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from ..runner import process_share
from .beir import BeirDataset
from .metrics import MRR_DEPTH, ranking_metrics
from .search import SearchPlan, exact_top_k

MINICORPUS_SEED = 42  # docs/model.md §7


def rank_corpus(model, dataset: BeirDataset, depth: int, *, seed: int = MINICORPUS_SEED,
                batch_size: int | None = None, plan: SearchPlan = SearchPlan(),
                show_progress_bar: bool | None = None) -> dict[str, dict[str, float]]:
    """{query id: {document id: cosine}} of the `depth` best documents, best first, for every
    judged query (MTEB's run format, in rank order). With several processes, each embeds its
    share of the documents and queries and searches its documents; all get the result."""
    dataset_md = model.embed_dataset(dataset.doc_texts, seed=seed, batch_size=batch_size,
                                     show_progress_bar=show_progress_bar)
    kw = dict(dataset_embeddings=dataset_md, batch_size=batch_size,
              show_progress_bar=show_progress_bar)
    docs = process_share(len(dataset.doc_texts))
    docs_nd = model.encode(dataset.doc_texts[docs], prompt_name="document", **kw)
    queries = process_share(len(dataset.query_texts))
    queries_qd = model.runner.gather(
        model.encode(dataset.query_texts[queries], prompt_name="query", **kw),
        len(dataset.query_texts))
    with tqdm(total=len(docs_nd), desc="search", unit="doc",
              disable=None if show_progress_bar is None else not show_progress_bar) as bar:
        scores_qk, ids_qk = exact_top_k(queries_qd, docs_nd, depth, mesh=model.mesh,
                                        plan=plan, first_row=docs.start, progress=bar.update)
    return {q: {dataset.doc_ids[i]: float(s) for s, i in zip(srow, irow)}
            for q, srow, irow in zip(dataset.query_ids, scores_qk, ids_qk)}


def evaluate_retrieval(model, dataset: BeirDataset, k_values: Sequence[int], **kw
                       ) -> dict[str, float]:
    """nDCG@k, Recall@k, MAP@k for each k and MRR@10 (see `metrics`); `kw` as `rank_corpus`."""
    depth = max(max(k_values), MRR_DEPTH)
    return ranking_metrics(dataset.qrels, rank_corpus(model, dataset, depth, **kw), k_values)
