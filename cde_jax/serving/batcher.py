"""Continuous batching: every request's token ids wait in one bounded queue; one thread
takes whatever is queued the moment the devices are free, up to a token budget, and runs it.

Why it does not lose to one text at a time: it never waits, and it splits a batch by
measured times (below). A request that finds the devices
idle runs at once, alone, as it would without batching; requests that arrive while a batch
runs are the next batch. A batch holds at most `max_batch_tokens` positions, each text
counting its bucket's length plus the context's prefix (TEI's `--max-batch-tokens`, with
the positions a CDE adds); a request over the budget is split across batches. The texts
taken run through the runner's length buckets (`Context.encode_tokens`) in the batch sizes
that run them soonest by the warm-up's times (`BatchShapes.split`): on an accelerator full
batches and the nearest size for the rest; on a CPU, where a row of a big batch can cost
more than a lone row, as many batches of one as that takes, never worse than one text at a
time. The sizes are every one up to 8 (data-shard multiples), then powers of two, all
compiled (and timed) by `BatchShapes.warm_up` before the server listens: no request pays a
compilation. The queue is counted in texts: a request that does not fit is refused at once
(`QueueFull`, HTTP 429), never parked. A request whose client goes away before it runs
is dropped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Sequence

import numpy as np

from .. import sharding
from ..context import Context
from ..text_api import CdeModel
from ..validation import UserError
from .metrics import Metrics

log = logging.getLogger(__name__)
SMALL_SIZES = 8  # batch sizes 1..8 (times the data shards) are all compiled; then powers of 2
TIMED_RUNS = 3  # per batch shape at warm-up, the fastest kept (other work shares the host)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full: retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(eq=False)
class Job:
    """One request's texts for one context; `future` gets their (n, d) float32 embeddings,
    unnormalized, once every part of them has run (`taken`: texts handed to batches;
    `rows_nd` is allocated when the first part is)."""

    context: Context
    token_ids: Sequence[Sequence[int]]
    queued_at: float
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)
    rows_nd: np.ndarray | None = None
    taken: int = 0
    done: int = 0


class BatchShapes:
    """The batch shapes the server runs: every bucket up to `model.max_seq_length`, each at
    the sizes of `sizes`, for contexts of one prefix length; `warm_up` compiles them all."""

    def __init__(self, model: CdeModel, prefix_length: int, batch_size: int | None = None):
        self.model, self.prefix_length = model, prefix_length
        self.plan = model.plan.with_batch_size(batch_size)
        self.top = self.plan.bucket_of(model.max_seq_length)
        self.seconds: dict[tuple[int, int], float] = {}  # (bucket, batch size): a run's time

    def warm_up(self, context: Context) -> None:
        """Runs every bucket up to `model.max_seq_length` at every batch size, compiling it
        then timing `TIMED_RUNS` runs (`seconds`: the fastest), and the first stage once (at
        the plan's size, as `embed_dataset` runs it): every shape a request can make, or a
        context made from texts, is compiled before the server accepts a request."""
        pad_id = self.model.backbone_config.pad_token_id
        for length in (n for n in self.plan.lengths if n <= self.top):
            self.model.run_texts([[pad_id] * length], self.model.runner.first(),
                                 batch_size=None, show_progress_bar=False, desc="warm-up")
            for size in self.sizes(length):
                runs = []
                for _ in range(TIMED_RUNS + 1):  # the first compiles
                    start = time.perf_counter()
                    context.encode_tokens([[pad_id] * length] * size, batch_size=size,
                                          normalize_embeddings=False, show_progress_bar=False)
                    runs.append(time.perf_counter() - start)
                self.seconds[length, size] = min(runs[1:])

    def split(self, length: int, n: int) -> list[int]:
        """The batch sizes that run `n` texts of bucket `length` soonest, by the warm-up's
        times: on a CPU, where a row of a big batch can cost more than a lone row (its
        attention over the prefix leaves the caches), n batches of one; on an accelerator,
        full batches and the nearest size for the rest. Untimed sizes count by rows."""
        sizes = self.sizes(length)
        best: list[tuple[float, list[int]]] = [(0.0, [])]
        for m in range(1, n + 1):
            best.append(min((self.seconds.get((length, s), s) + best[max(0, m - s)][0],
                             best[max(0, m - s)][1] + [s]) for s in sizes))
        return best[n][1]

    def cost(self, n_tokens: int) -> int:
        """Positions one text runs at: its bucket plus the prefix."""
        return self.plan.bucket_of(n_tokens) + self.prefix_length

    def default_budget(self) -> int:
        """Positions of the largest full batch of the plan (over the buckets served)."""
        return max(self.rows(n) * (n + self.prefix_length)
                   for n in self.plan.lengths if n <= self.top)

    def rows(self, length: int) -> int:
        """Rows of a full batch of bucket `length` (as `run_buckets` plans them)."""
        return self.plan.batch_size(length, sharding.data_shards(self.model.mesh),
                                    self.prefix_length)

    def sizes(self, length: int) -> list[int]:
        """The batch sizes bucket `length` runs at: full (the plan's, or --batch-size), every
        multiple of the data shards up to `SMALL_SIZES` of them, then their powers of two.
        Padding rows are not free: on a CPU a batch's time grows with its rows (each row
        carries the prefix through every layer), on an accelerator past a few rows."""
        full, step = self.rows(length), sharding.data_shards(self.model.mesh)
        small = {step * k for k in range(1, SMALL_SIZES + 1)}
        powers = {step << i for i in range(full.bit_length())}
        return sorted({s for s in small | powers if s < full} | {full})

    def embed(self, context: Context, token_ids: Sequence[Sequence[int]]
              ) -> tuple[np.ndarray, int]:
        """((n, d) float32 unnormalized, padding rows run): each bucket's texts in the
        batch sizes of `split`."""
        out = np.empty((len(token_ids), self.model.hidden_size), np.float32)
        padding = 0
        by_bucket: dict[int, list[int]] = {}
        for i, ids in enumerate(token_ids):
            by_bucket.setdefault(self.plan.bucket_of(len(ids)), []).append(i)
        for length, rows in by_bucket.items():
            start = 0
            for size in self.split(length, len(rows)):
                part = rows[start:start + size]
                out[part] = context.encode_tokens(
                    [token_ids[i] for i in part], batch_size=size,
                    normalize_embeddings=False, show_progress_bar=False)
                padding += size - len(part)
                start += size
        return out, padding


class Batcher:
    def __init__(self, shapes: BatchShapes, metrics: Metrics, *, max_queue: int,
                 max_batch_tokens: int | None = None):
        self.shapes, self.metrics, self.max_queue = shapes, metrics, max_queue
        self.model = shapes.model
        self.max_batch_tokens = max_batch_tokens or shapes.default_budget()
        longest = shapes.cost(self.model.max_seq_length)
        if self.max_batch_tokens < longest:
            raise UserError(f"max_batch_tokens {self.max_batch_tokens} is less than one text "
                            f"of max_seq_length: {longest} positions (bucket "
                            f"{shapes.top} + the prefix's {shapes.prefix_length})")
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued = 0  # texts in _jobs not yet taken
        self._busy_s, self._done = 0.0, 0  # model seconds and texts so far (for Retry-After)
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="cde-serve-batcher")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Runs what is queued, then stops the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def submit(self, context: Context, token_ids: Sequence[Sequence[int]]
               ) -> concurrent.futures.Future:
        """Queues one request's texts (at most `max_queue`); `QueueFull` if they do not fit."""
        if context.prefix_length != self.shapes.prefix_length:
            raise ValueError(f"a context of prefix length {context.prefix_length}; this "
                             f"server compiled {self.shapes.prefix_length}")
        with self._wake:
            if self._queued + len(token_ids) > self.max_queue:
                raise QueueFull(self._retry_after_s())
            self._jobs.append(Job(context, token_ids, time.monotonic()))
            self._queued += len(token_ids)
            self.metrics.queue_texts.set(self._queued)
            self.metrics.queue_requests.set(len(self._jobs))
            self._wake.notify()
            return self._jobs[-1].future

    def _retry_after_s(self) -> int:
        """Seconds until the queue has drained at the rate seen so far (at least 1)."""
        per_text = self._busy_s / self._done if self._done else 0.0
        return max(1, math.ceil(self._queued * per_text))

    def _take(self) -> list[tuple[Job, int, int]] | None:
        """What is queued, oldest first, up to `max_batch_tokens` positions, as (job, start,
        stop) parts; None when closed and drained. Never waits for more: the devices are
        free now. Jobs cancelled before any part ran are dropped."""
        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            parts, tokens = [], 0
            while self._jobs:
                job = self._jobs[0]
                if job.rows_nd is None:  # not started
                    if not job.future.set_running_or_notify_cancel():
                        self._jobs.popleft()
                        self._queued -= len(job.token_ids)
                        continue
                    self.metrics.queue_seconds.observe(time.monotonic() - job.queued_at)
                    job.rows_nd = np.empty((len(job.token_ids), self.model.hidden_size),
                                           np.float32)
                stop = job.taken
                while stop < len(job.token_ids):
                    cost = self.shapes.cost(len(job.token_ids[stop]))
                    if tokens + cost > self.max_batch_tokens:
                        break
                    tokens, stop = tokens + cost, stop + 1
                if stop > job.taken:
                    parts.append((job, job.taken, stop))
                    self._queued -= stop - job.taken
                    job.taken = stop
                if stop < len(job.token_ids):
                    break  # the budget is spent
                self._jobs.popleft()
            self.metrics.queue_texts.set(self._queued)
            self.metrics.queue_requests.set(len(self._jobs))
            return parts or (None if self._closed and not self._jobs else [])

    def _loop(self) -> None:
        while (parts := self._take()) is not None:
            by_context: dict[int, list[tuple[Job, int, int]]] = {}
            for part in parts:
                by_context.setdefault(id(part[0].context), []).append(part)
            for group in by_context.values():
                self._run(group)

    def _run(self, parts: list[tuple[Job, int, int]]) -> None:
        token_ids = [ids for job, start, stop in parts for ids in job.token_ids[start:stop]]
        self.metrics.running_texts.set(len(token_ids))
        start_s = time.perf_counter()
        try:
            rows_nd, padding = self.shapes.embed(parts[0][0].context, token_ids)
            self.metrics.padding_rows.inc(padding)
        except Exception as e:  # a bug: every request of the batch gets it (HTTP 500)
            log.exception("embedding a batch of %d texts failed", len(token_ids))
            for job, _, _ in parts:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            seconds = time.perf_counter() - start_s
            self.metrics.running_texts.set(0)
            self.metrics.batch_seconds.observe(seconds)
            self.metrics.batch_texts.observe(len(token_ids))
        with self._wake:
            self._busy_s, self._done = self._busy_s + seconds, self._done + len(token_ids)
        row = 0
        for job, start, stop in parts:
            job.rows_nd[start:stop] = rows_nd[row:row + stop - start]
            row += stop - start
            job.done += stop - start
            if job.done == len(job.token_ids) and not job.future.done():
                job.future.set_result(job.rows_nd)
