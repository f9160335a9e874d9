"""Ranking metrics by `pytrec_eval` (trec_eval's C code), the library BEIR and MTEB use.

Measures (mean over the judged queries): `ndcg@k` (trec_eval `ndcg_cut`: linear gains = the
judged score, log2 discount), `recall@k`, `map@k` (`map_cut`), and `mrr@10` (`recip_rank` on
the top 10). trec_eval re-sorts a run by score and breaks ties by document id, so a ranking
is handed over with strictly decreasing rank-derived scores: the metrics are those of exactly
the order given, whatever the similarities were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytrec_eval

from ..validation import UserError

MRR_DEPTH = 10


def _run(ranked: Mapping[str, Sequence[str]], depth: int | None = None):
    return {q: {d: float(len(docs) - r) for r, d in enumerate(docs[:depth])}
            for q, docs in ranked.items()}


def _means(qrels, run, measures: set[str]) -> dict[str, float]:
    """{trec_eval key: mean over every judged query}; a query with an empty ranking (which
    trec_eval leaves out) counts as 0."""
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    keys = {key for values in per_query.values() for key in values}
    return {key: float(np.mean([per_query.get(q, {}).get(key, 0.0) for q in qrels]))
            for key in keys}


def ranking_metrics(qrels: Mapping[str, Mapping[str, int]],
                    ranked: Mapping[str, Sequence[str]],
                    k_values: Sequence[int]) -> dict[str, float]:
    """qrels: {query id: {doc id: relevance}}; ranked: {query id: doc ids, best first (a list,
    or a run dict in rank order)} for every judged query."""
    if not qrels:
        raise UserError("no judged queries")
    if any(not isinstance(k, int) or k < 1 for k in k_values):
        raise UserError(f"k values must be positive integers, got {list(k_values)}")
    missing = [q for q in qrels if q not in ranked]
    if missing:
        raise UserError(f"{len(missing)} judged queries have no ranking (e.g. {missing[0]!r})")
    for q, docs in ranked.items():
        if len(set(docs)) != len(docs):
            raise UserError(f"ranking for query {q!r} lists a document twice")
    qrels = {q: dict(v) for q, v in qrels.items()}
    ranked = {q: list(ranked[q]) for q in qrels}
    ks = sorted(set(k_values))
    cut = ",".join(map(str, ks))
    means = _means(qrels, _run(ranked), {f"ndcg_cut.{cut}", f"recall.{cut}", f"map_cut.{cut}"})
    out = {}
    for k in ks:
        out[f"ndcg@{k}"] = means[f"ndcg_cut_{k}"]
        out[f"recall@{k}"] = means[f"recall_{k}"]
        out[f"map@{k}"] = means[f"map_cut_{k}"]
    mrr = _means(qrels, _run(ranked, MRR_DEPTH), {"recip_rank"})
    out[f"mrr@{MRR_DEPTH}"] = mrr.get("recip_rank", 0.0)
    return out
