"""Training data: JSONL rows -> fixed-shape contrastive batches whose minicorpus is their own
documents.

A line is `{"query": str, "positive": str, "negatives": [str, ...], "cluster": str | int,
"batch": int | null}` (all but the first two optional; other keys are ignored; `cde-jax
cluster` writes "cluster" and "batch"). Queries get "search_query: ", documents
"search_document: ".

A batch of q examples holds q queries and c = q * (1 + K) documents: the q positives, then
each row's K hard negatives (rows with more are sampled down per batch). Its minicorpus (the
first stage's input, as upstream trains) is drawn from those c documents:
  - c >= corpus size: `corpus size` of them, sampled without replacement;
  - c < corpus size: all c documents (the second stage then sees c dataset-embedding rows,
    as upstream does when given fewer), or, with `oversample_corpus`, all c plus random
    repeats up to the corpus size (the inference-time prefix length, at the price of a longer
    sequence).
With the released config (corpus size 512) a small batch therefore trains with a short
prefix; pass `corpus_size` to change the config's `transductive_corpus_size` instead.

Order: each epoch shuffles the examples (`default_rng([seed, epoch])`); with
`group_by_cluster`, full batches are cut inside each cluster and the leftovers of all
clusters are pooled into mixed batches; with `packed_batches`, the batches are the lines'
"batch" values (each must hold exactly `batch_size` lines; lines with null are left out),
visited in a new random order each epoch as upstream shuffles its packed batches.
Incomplete batches are dropped (fixed shapes).

False negatives: with a filter (`filtering.FalseNegativeFilter`), each batch carries the
(query, document) pairs the filter counts as positives (`false_negative_qc`), which the loss
adds to the positives. The
data position is one integer, the number of batches consumed, so a run restarts exactly.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import prompts
from ..config import setting
from ..corpus.source import jsonl_records
from ..tokenization import MAX_LENGTH, TextTokenizer
from ..validation import UserError, int_in_range


class Example(NamedTuple):
    query: str
    positive: str
    negatives: tuple[str, ...]
    cluster: str | int | None
    line: int  # in the source file, for error messages
    batch: int | None = None  # a packed batch (`cde-jax cluster`)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{what} is {type(value).__name__}, not a string")
    if not value.strip():
        raise UserError(f"{what} is empty")
    return value


def parse_example(row: dict, line: int = 0) -> Example:
    for key in ("query", "positive"):
        if key not in row:
            raise UserError(f"missing field {key!r}")
    negatives = row.get("negatives", [])
    if not isinstance(negatives, list):
        raise UserError(f"'negatives' is {type(negatives).__name__}, not a list of strings")
    cluster = row.get("cluster")
    if cluster is not None and (isinstance(cluster, bool) or not isinstance(cluster, (str, int))):
        raise UserError(f"'cluster' is {type(cluster).__name__}, not a string or integer")
    batch = row.get("batch")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)):
        raise UserError(f"'batch' is {type(batch).__name__}, not an integer or null")
    return Example(_text(row["query"], "'query'"), _text(row["positive"], "'positive'"),
                   tuple(_text(n, f"'negatives'[{i}]") for i, n in enumerate(negatives)),
                   cluster, line, batch)


def read_examples(path: str | Path) -> list[Example]:
    """Every example of a JSONL file; the first bad line is an error naming it."""
    path = Path(path)
    examples = []
    for lineno, row in jsonl_records(path):  # bad UTF-8 or JSON: errors naming the line
        try:
            examples.append(parse_example(row, lineno))
        except ValueError as e:
            raise UserError(f"{path}: line {lineno}: {e}") from None
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    batch_size: int = setting(help="examples per contrastive batch (global, over all devices)")
    negatives: int | None = setting(
        None, help="hard negatives per example (default: the fewest any example has)")
    corpus_size: int | None = setting(
        None, help="the minicorpus rows per batch: the config's transductive_corpus_size "
                   "(default), changed in the export too")
    oversample_corpus: bool = setting(
        False, help="repeat a batch's documents up to the corpus size")
    group_by_cluster: bool = setting(
        False, help="draw each batch from one `cluster` value where possible")
    packed_batches: bool = setting(
        False, help="train on the lines' `batch` values (from `cde-jax cluster`), each "
                    "batch whole; their order shuffled each epoch")
    query_length: int = setting(64, help="query tokens, [CLS]/[SEP] included (longer: cut)")
    document_length: int = setting(256, help="document tokens, [CLS]/[SEP] included")

    def __post_init__(self):
        int_in_range(self.batch_size, "batch_size")
        for name in ("query_length", "document_length"):
            int_in_range(getattr(self, name), name, 2, MAX_LENGTH)
        if self.negatives is not None:
            int_in_range(self.negatives, "negatives", 0)
        if self.corpus_size is not None:
            int_in_range(self.corpus_size, "corpus_size")
        if self.group_by_cluster and self.packed_batches:
            raise UserError("group_by_cluster and packed_batches exclude each other")


class TextBatch(NamedTuple):
    queries: list[str]      # q, prefixed
    documents: list[str]    # c, prefixed: positives then negatives
    query_label: np.ndarray  # (q,) int32: identity of each query's positive document
    doc_label: np.ndarray    # (c,) int32: identity of each document (equal text, equal id)
    corpus: np.ndarray       # (m,) indices into `documents`: the minicorpus
    false_negative_qc: np.ndarray  # (q, c) bool: negatives the filter counts as positives


class TrainData:
    """Deterministic batches of a list of examples: `batch(position)` is a pure function of
    (examples, config, seed, position) and the filter."""

    def __init__(self, examples: list[Example], cfg: BatchConfig, seed: int,
                 false_negatives: Callable | None = None):
        counts = [len(e.negatives) for e in examples]
        if cfg.negatives is None:
            cfg = dataclasses.replace(cfg, negatives=min(counts))
            if min(counts) < max(counts):
                warnings.warn(f"examples have {min(counts)} to {max(counts)} negatives: using "
                              f"{min(counts)} per example (set `negatives` to choose)",
                              stacklevel=2)
        if cfg.corpus_size is None:
            raise UserError("corpus_size is unresolved (None): give the model's")
        short = next((e for e in examples if len(e.negatives) < cfg.negatives), None)
        if short is not None:
            raise UserError(f"line {short.line}: {len(short.negatives)} negatives, fewer than "
                            f"the {cfg.negatives} asked for")
        self.examples, self.cfg, self.seed = examples, cfg, seed
        self.false_negatives = false_negatives
        self._packed = _packed_batches(examples, cfg.batch_size) if cfg.packed_batches else None
        self.batches_per_epoch = len(self._epoch_order(0))
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(examples)} examples do not fill one batch of "
                            f"{cfg.batch_size}" + (" inside any cluster" if cfg.group_by_cluster
                                                    else ""))
        self._cached_epoch: tuple[int, list[np.ndarray]] | None = None

    @property
    def documents_per_batch(self) -> int:
        return self.cfg.batch_size * (1 + self.cfg.negatives)

    @property
    def corpus_rows(self) -> int:
        c, n = self.documents_per_batch, self.cfg.corpus_size
        return n if self.cfg.oversample_corpus else min(c, n)

    def _epoch_order(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        b = self.cfg.batch_size
        if self._packed is not None:
            return [self._packed[i] for i in rng.permutation(len(self._packed))]
        if not self.cfg.group_by_cluster:
            order = rng.permutation(len(self.examples))
            return list(order[:len(order) // b * b].reshape(-1, b))
        clusters: dict = {}
        for i, e in enumerate(self.examples):
            clusters.setdefault((type(e.cluster).__name__, e.cluster), []).append(i)
        batches, leftovers = [], []
        for key in sorted(clusters, key=str):
            rows = rng.permutation(clusters[key])
            full = len(rows) // b * b
            batches += list(rows[:full].reshape(-1, b))
            leftovers += list(rows[full:])
        leftovers = rng.permutation(np.asarray(leftovers, np.int64))
        batches += list(leftovers[:len(leftovers) // b * b].reshape(-1, b))
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch(self, position: int) -> TextBatch:
        epoch, index = divmod(position, self.batches_per_epoch)
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            self._cached_epoch = (epoch, self._epoch_order(epoch))
        rows = [self.examples[i] for i in self._cached_epoch[1][index]]
        rng = np.random.default_rng([self.seed, epoch, index])
        k = self.cfg.negatives
        negatives = [e.negatives[j] for e in rows
                     for j in rng.choice(len(e.negatives), k, replace=False)]
        documents = [e.positive for e in rows] + negatives
        ids: dict[str, int] = {}
        doc_label = np.array([ids.setdefault(d, len(ids)) for d in documents], np.int32)
        c, n = len(documents), self.cfg.corpus_size
        if c >= n:
            corpus = np.sort(rng.choice(c, n, replace=False))
        elif self.cfg.oversample_corpus:
            corpus = np.concatenate([np.arange(c), rng.choice(c, n - c)])
        else:
            corpus = np.arange(c)
        q = len(rows)
        if self.false_negatives is None:
            false_negative_qc = np.zeros((q, c), bool)
        else:
            false_negative_qc = self.false_negatives(
                [e.query for e in rows], documents, k,
                doc_label[:q, None] == doc_label[None, :])
        return TextBatch([prompts.QUERY + e.query for e in rows],
                         [prompts.DOCUMENT + d for d in documents], doc_label[:q],
                         doc_label, corpus, false_negative_qc)


def _packed_batches(examples: list[Example], batch_size: int) -> list[np.ndarray]:
    """The lines' batches, by `batch` value; each must hold exactly `batch_size` lines."""
    members: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        if e.batch is not None:
            members.setdefault(e.batch, []).append(i)
    if not members:
        raise UserError("no line has a 'batch' value: make the file with `cde-jax cluster`")
    for batch, rows in sorted(members.items()):
        if len(rows) != batch_size:
            raise UserError(f"batch {batch} has {len(rows)} lines (line "
                            f"{examples[rows[0]].line} ...), not the batch size {batch_size}: "
                            "cluster with the same --batch-size")
    return [np.asarray(rows) for _, rows in sorted(members.items())]


class BatchTokenizer:
    """TextBatch -> int32 arrays padded to the configured lengths (fixed shapes: one compile)."""

    def __init__(self, tokenizer: TextTokenizer, cfg: BatchConfig):
        self.queries = TextTokenizer(tokenizer.tokenizer, pad_id=tokenizer.pad_id,
                                     max_length=cfg.query_length)
        self.documents = TextTokenizer(tokenizer.tokenizer, pad_id=tokenizer.pad_id,
                                       max_length=cfg.document_length)
        self.cfg = cfg

    def __call__(self, batch: TextBatch) -> dict[str, np.ndarray]:
        q_ids, q_mask = self.queries(batch.queries, self.cfg.query_length)
        d_ids, d_mask = self.documents(batch.documents, self.cfg.document_length)
        return {"query_ids": q_ids, "query_mask": q_mask, "doc_ids": d_ids, "doc_mask": d_mask,
                "corpus_ids": d_ids[batch.corpus], "corpus_mask": d_mask[batch.corpus],
                "query_label": batch.query_label, "doc_label": batch.doc_label,
                "false_negative_qc": batch.false_negative_qc}

    @property
    def truncated(self) -> tuple[int, int]:
        return self.queries.truncated, self.documents.truncated


def stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Micro-batches -> arrays with a leading accumulation axis."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}
