"""Dynamic batching: every request's token ids wait in one bounded queue; one thread takes
whatever has arrived and runs it on the devices, each context's texts together.

Why one thread and one queue: the devices run one program at a time anyway, and requests
that arrive while a batch runs are exactly the next batch, so under load batches fill by
themselves; when the devices are idle, a batch that is not yet full waits at most
`max_wait_s` for requests already arriving (read, not yet queued), and not at all when
none is. The texts taken together go through the runner's length buckets
(`Context.encode_tokens` -> `StageRunner.run_buckets`) in full batches, and what does not
fill one in the smallest of a few batch sizes (`BatchShapes.sizes`), so every batch has
one of the shapes `BatchShapes.warm_up` compiled at start-up and no request pays a
compilation. The queue is
counted in texts: a request that does not fit is refused at once (`QueueFull`, HTTP 429),
never parked. A request whose client goes away is cancelled; if it is still queued it is
dropped without running.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
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


class BatchShapes:
    """The batch shapes the server runs: every bucket up to `model.max_seq_length`, each at
    a few batch sizes; `warm_up` compiles them all."""

    def __init__(self, model: CdeModel, batch_size: int | None = None):
        self.model = model
        self.plan = model.plan.with_batch_size(batch_size)

    def warm_up(self, contexts: Sequence[Context]) -> None:
        """Runs one batch of every bucket up to `model.max_seq_length` at every batch size
        (`sizes`), for each prefix length among `contexts`: every shape a request can make
        is compiled before the server accepts one."""
        top = self.plan.bucket_of(self.model.max_seq_length)
        pad_id = self.model.backbone_config.pad_token_id
        for context in {c.prefix_length: c for c in contexts}.values():
            for length in (n for n in self.plan.lengths if n <= top):
                for size in self.sizes(length, context):
                    context.encode_tokens([[pad_id] * length] * size, batch_size=size,
                                          normalize_embeddings=False, show_progress_bar=False)

    def rows(self, length: int, context: Context) -> int:
        """Rows of a full batch of bucket `length` (as `run_buckets` plans them)."""
        return self.plan.batch_size(length, sharding.data_shards(self.model.mesh),
                                    context.prefix_length)

    def sizes(self, length: int, context: Context) -> list[int]:
        """The batch sizes bucket `length` runs at: full (the plan's, or --batch-size), and
        the data shards times the powers of two below that, so that texts that do not fill
        a batch run in the smallest that holds them. Padding rows are not free: on a CPU a
        batch's time grows with its rows, and on an accelerator past a few rows."""
        full = self.rows(length, context)
        step = sharding.data_shards(self.model.mesh)
        return [step << i for i in range(full.bit_length()) if step << i < full] + [full]

    def embed(self, context: Context, token_ids: Sequence[Sequence[int]]
              ) -> tuple[np.ndarray, int]:
        """((n, d) float32 unnormalized, padding rows run): each bucket's texts in full
        batches, and what is left in the smallest batch size that holds it."""
        out = np.empty((len(token_ids), self.model.hidden_size), np.float32)
        padding = 0
        by_bucket: dict[int, list[int]] = {}
        for i, ids in enumerate(token_ids):
            by_bucket.setdefault(self.plan.bucket_of(len(ids)), []).append(i)
        for length, rows in by_bucket.items():
            sizes = self.sizes(length, context)
            whole = len(rows) - len(rows) % sizes[-1]
            for part in (rows[:whole], rows[whole:]):
                if part:
                    size = min((s for s in sizes if s >= len(part)), default=sizes[-1])
                    out[part] = context.encode_tokens(
                        [token_ids[i] for i in part], batch_size=size,
                        normalize_embeddings=False, show_progress_bar=False)
                    padding += -len(part) % size
        return out, padding


class Batcher:
    def __init__(self, model: CdeModel, metrics: Metrics, *, max_queue: int,
                 max_wait_s: float, batch_size: int | None = None):
        self.model, self.metrics, self.max_queue = model, metrics, max_queue
        self.max_wait_s = max_wait_s
        self.shapes = BatchShapes(model, batch_size)
        self._jobs: collections.deque[Job] = collections.deque()
        self._queued = 0  # texts in _jobs
        self._busy_s, self._done = 0.0, 0  # model seconds and texts so far (for Retry-After)
        self._arriving = 0  # requests between being read and `submit`
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

    @contextlib.contextmanager
    def arriving(self):
        """Marks a request on its way to `submit` (being checked and tokenized): a batch
        that is not full waits for such requests (at most `max_wait_s`), never for none, so
        a lone request runs at once."""
        with self._wake:
            self._arriving += 1
        try:
            yield
        finally:
            with self._wake:
                self._arriving -= 1
                self._wake.notify()

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
        """Everything queued, once the first job's batch is full, no request is arriving,
        or it has waited `max_wait_s`; None when closed and drained. Cancelled jobs are
        dropped."""
        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            if not self._jobs:
                return None
            first = self._jobs[0]
            full = self.shapes.rows(self.shapes.plan.bucket_of(max(map(len, first.token_ids))),
                                    first.context)
            deadline = first.queued_at + self.max_wait_s
            while (self._queued < full and self._arriving and not self._closed
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
            rows_nd, padding = self.shapes.embed(jobs[0].context, token_ids)
            self.metrics.padding_rows.inc(padding)
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
