"""Retrieval evaluation (BEIR-layout datasets, exact sharded search, trec_eval metrics) and
the MTEB encoder (`cde_jax.evaluation.mteb`, imported on demand: it needs `mteb`)."""

from .beir import BeirDataset, document_text, load_beir
from .metrics import ranking_metrics
from .retrieval import evaluate_retrieval, rank_corpus
from .search import SearchTiles, exact_top_k

__all__ = ["BeirDataset", "SearchTiles", "document_text", "evaluate_retrieval", "exact_top_k",
           "load_beir", "rank_corpus", "ranking_metrics"]
