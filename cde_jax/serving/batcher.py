"""Dynamic batching: every request's token ids wait in one bounded queue; one thread takes
whatever has arrived and runs it on the devices, each context's texts together.

Why one thread and one queue: the devices run one program at a time anyway, and requests
that arrive while a batch runs are exactly the next batch, so under load batches fill by
themselves; when the devices are idle, a batch that is not yet full waits at most
`max_wait_s` for more. The texts taken together go through the runner's length buckets
(`Context.encode_tokens` -> `StageRunner.run_buckets`), so every batch has one of the
shapes `warm_up` compiled at start-up and no request pays a compilation. The queue is
counted in texts: a request that does not fit is refused at once (`QueueFull`, HTTP 429),
never parked. A request whose client goes away is cancelled; if it is still queued it is
dropped without running.
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
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full: retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class Job:
    """One request's texts for one context; `future` gets their (n, d) float32 embeddings,
    unnormalized."""

    context: Context
    token_ids: Sequence[Sequence[int]]
    queued_at: float
    future: concurrent.futures.Future = dataclasses.field(
        default_factory=concurrent.futures.Future)


class Batcher:
    def __init__(self, model: CdeModel, metrics: Metrics, *, max_queue: int,
                 max_wait_s: float, batch_size: int | None = None):
        self.model, self.metrics, self.max_queue = model, metrics, max_queue
        self.max_wait_s, self.batch_size = max_wait_s, batch_size
        self.plan = model.plan.with_batch_size(batch_size)
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued = 0  # texts in _jobs
        self._busy_s, self._done = 0.0, 0  # model seconds and texts so far (for Retry-After)
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="cde-serve-batcher")

    def warm_up(self, contexts: Sequence[Context]) -> None:
        """Runs one batch of every bucket up to `model.max_seq_length`, for each prefix
        length among `contexts`: every shape a request can make is compiled before the
        server accepts one."""
        top = self.plan.bucket_of(self.model.max_seq_length)
        pad_id = self.model.backbone_config.pad_token_id
        for context in {c.prefix_length: c for c in contexts}.values():
            for length in (n for n in self.plan.lengths if n <= top):
                context.encode_tokens([[pad_id] * length] * self._rows(length, context),
                                      batch_size=self.batch_size, normalize_embeddings=False,
                                      show_progress_bar=False)

    def _rows(self, length: int, context: Context) -> int:
        """Rows of one batch of bucket `length` (as `run_buckets` plans them)."""
        return self.plan.batch_size(length, sharding.data_shards(self.model.mesh),
                                    context.prefix_length)

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
        with self._wake:
            if self._queued + len(token_ids) > self.max_queue:
                raise QueueFull(self._retry_after_s())
            self._jobs.append(Job(context, token_ids, time.monotonic()))
            self._queued += len(token_ids)
            self.metrics.queue_texts.set(self._queued)
            self._wake.notify()
            return self._jobs[-1].future

    def _retry_after_s(self) -> int:
        """Seconds until the queue has drained at the rate seen so far (at least 1)."""
        per_text = self._busy_s / self._done if self._done else 0.0
        return max(1, math.ceil(self._queued * per_text))

    def _take(self) -> list[Job] | None:
        """Everything queued, once the first job's batch is full or has waited
        `max_wait_s`; None when closed and drained. Cancelled jobs are dropped."""
        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            if not self._jobs:
                return None
            first = self._jobs[0]
            full = self._rows(self.plan.bucket_of(max(map(len, first.token_ids))),
                              first.context)
            deadline = first.queued_at + self.max_wait_s
            while (self._queued < full and not self._closed
                   and (left := deadline - time.monotonic()) > 0):
                self._wake.wait(left)
            jobs, self._jobs, self._queued = list(self._jobs), collections.deque(), 0
            self.metrics.queue_texts.set(0)
        now = time.monotonic()
        for job in jobs:
            self.metrics.queue_seconds.observe(now - job.queued_at)
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            by_context: dict[int, list[Job]] = {}
            for job in jobs:
                by_context.setdefault(id(job.context), []).append(job)
            for group in by_context.values():
                self._run(group)

    def _run(self, jobs: list[Job]) -> None:
        token_ids = [ids for job in jobs for ids in job.token_ids]
        self.metrics.running_texts.set(len(token_ids))
        start = time.perf_counter()
        try:
            rows_nd = jobs[0].context.encode_tokens(
                token_ids, batch_size=self.batch_size, normalize_embeddings=False,
                show_progress_bar=False)
        except Exception as e:  # a bug: every request of the batch gets it (HTTP 500)
            log.exception("embedding a batch of %d texts failed", len(token_ids))
            for job in jobs:
                job.future.set_exception(e)
            return
        finally:
            seconds = time.perf_counter() - start
            self.metrics.running_texts.set(0)
            self.metrics.batch_seconds.observe(seconds)
            self.metrics.batch_texts.observe(len(token_ids))
        with self._wake:
            self._busy_s, self._done = self._busy_s + seconds, self._done + len(token_ids)
        for job, rows in zip(jobs, np.split(rows_nd, np.cumsum(
                [len(job.token_ids) for job in jobs])[:-1])):
            job.future.set_result(rows)
