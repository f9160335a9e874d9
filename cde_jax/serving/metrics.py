"""The server's Prometheus metrics (prometheus-client), on a registry of its own: what
`GET /metrics` exports. `RequestMetrics` counts and times every HTTP request as plain ASGI
middleware: Starlette's `BaseHTTPMiddleware` wraps `receive`, which would hide a client's
disconnect from the route that waits for it."""

from __future__ import annotations

import time

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..profiling import BACKEND_COMPILE_EVENT

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TEXTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
ROUTES = ("/v1/embeddings", "/embed", "/v1/models", "/v1/contexts", "/health", "/metrics")


def route_of(path: str) -> str:
    """A metric's route label: the path, `/v1/contexts/{name}`, or "other" (bounded)."""
    if path in ROUTES:
        return path
    return "/v1/contexts/{name}" if path.startswith("/v1/contexts/") else "other"


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("cde_serve_requests", "HTTP requests answered, by route and "
                                "status", ["route", "status"], registry=registry)
        self.errors = Counter("cde_serve_errors", "error answers, by route and error type",
                              ["route", "type"], registry=registry)
        self.cancelled = Counter("cde_serve_cancelled_requests", "requests whose client went "
                                 "away before the answer (skipped if still queued)",
                                 registry=registry)
        self.in_progress = Gauge("cde_serve_requests_in_progress", "HTTP requests being "
                                 "answered", ["route"], registry=registry)
        self.latency = Histogram("cde_serve_request_seconds", "HTTP request latency, from "
                                 "the request to the last byte of the answer", ["route"],
                                 buckets=SECONDS, registry=registry)
        self.tokens = Counter("cde_serve_tokens", "tokens embedded ([CLS], [SEP] and the "
                              "prompt included)", registry=registry)
        self.truncated = Counter("cde_serve_truncated_texts", "inputs cut at max_seq_length",
                                 registry=registry)
        self.queue_texts = Gauge("cde_serve_queue_texts", "texts waiting for the model",
                                 registry=registry)
        self.queue_requests = Gauge("cde_serve_queue_requests", "requests with texts waiting "
                                    "for the model", registry=registry)
        self.running_texts = Gauge("cde_serve_running_texts", "texts the model is embedding "
                                   "now", registry=registry)
        self.queue_seconds = Histogram("cde_serve_queue_seconds", "time a request waited for "
                                       "the model", buckets=SECONDS, registry=registry)
        self.batch_texts = Histogram("cde_serve_batch_texts", "texts per dynamic batch (the "
                                     "requests taken together, run as bucket batches)",
                                     buckets=TEXTS, registry=registry)
        self.padding_rows = Counter("cde_serve_padding_rows", "rows run that held no text "
                                    "(a batch not full, at the smallest size that holds it)",
                                    registry=registry)
        self.batch_seconds = Histogram("cde_serve_batch_seconds", "model time per dynamic "
                                       "batch (the sum over wall time: the busy fraction)",
                                       buckets=SECONDS, registry=registry)
        self.compiles = Counter("cde_serve_xla_compiles", "XLA compilations in this process; "
                                "all happen at start-up, none for a request",
                                registry=registry)

    def watch_compiles(self) -> None:
        """Counts every XLA compilation of this process from now on."""
        def on_event(event: str, duration: float, **kwargs) -> None:
            if event == BACKEND_COMPILE_EVENT:
                self.compiles.inc()

        jax.monitoring.register_event_duration_secs_listener(on_event)


class RequestMetrics:
    """ASGI middleware: requests by route and status, latency, requests in progress."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_of(scope["path"])
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            with self.metrics.in_progress.labels(route).track_inprogress():
                await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
