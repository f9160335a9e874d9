"""The ASGI app (FastAPI): the routes, their errors and the service behind them.

A request passes the key check and the body limit (`security`), is checked (pydantic,
`protocol`), tokenized in a worker thread (the `tokenizers` library releases the GIL; the
event loop keeps accepting), queued for the batcher and awaited; the device work runs in
the batcher's thread, a context being made in the context maker's (`contexts`). A client
that disconnects while it waits cancels its request: still queued, it is dropped; already
running, its rows are discarded. Nothing here blocks the event loop for longer than
building an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .. import prompts
from ..validation import UserError
from . import protocol
from .batcher import Batcher, QueueFull
from .contexts import ContextStore
from .metrics import Metrics, RequestMetrics, route_of
from .protocol import ApiError, ContextRequest, EmbeddingsRequest, EmbedRequest
from .security import PayloadLimit, RequireKey

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def until_answered(request: Request, answer: asyncio.Future) -> np.ndarray:
    """The batcher's answer, unless the client disconnects first (`ClientGone`)."""

    async def disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        answer.cancel()  # no effect once answered; a job still queued is dropped
    if answer.cancelled():
        raise ClientGone()
    return answer.result()


class EmbeddingService:
    """The contexts, the request limits and the batcher, behind the embedding routes."""

    def __init__(self, contexts: ContextStore, batcher: Batcher, metrics: Metrics, *,
                 max_client_batch_size: int):
        self.contexts, self.batcher, self.metrics = contexts, batcher, metrics
        self.model = batcher.model
        self.max_inputs = max_client_batch_size
        self.started = int(time.time())

    async def embed(self, request: Request, body: protocol.Request, inputs: list, *,
                    field: str) -> tuple[np.ndarray, int]:
        """(rows (n, d) float32 unnormalized, tokens) of one request's inputs."""
        token_ids, future = await self._queue(body, inputs, field)
        rows_nd = await until_answered(request, asyncio.wrap_future(future))
        tokens = sum(map(len, token_ids))
        self.metrics.tokens.inc(tokens)
        return rows_nd, tokens

    async def _queue(self, body: protocol.Request, inputs: list, field: str):
        """(token ids, the batcher's future) of a checked request."""
        context = self.contexts.get(body.model)
        limit, flag = min((self.max_inputs, "--max-client-batch-size"),
                          (self.batcher.max_queue, "--max-queue"))
        if len(inputs) > limit:
            raise ApiError(413, f"{field} has {len(inputs)} items, more than this server "
                                f"takes in one request ({flag} {limit}): split it",
                           param=field, code="too_many_inputs")
        if body.dimensions is not None and body.dimensions > self.model.hidden_size:
            raise ApiError(400, f"dimensions must be in 1..{self.model.hidden_size}, got "
                                f"{body.dimensions}", param="dimensions")
        if isinstance(inputs[0], str):
            prompt = prompts.by_name(body.prompt_name or "query")
            token_ids, cut = await run_in_threadpool(self.model.tokenize_with_cuts, inputs,
                                                     prompt)
        else:
            token_ids, cut = self._checked_ids(inputs, body, field)
        if cut and body.truncate:
            self.metrics.truncated.inc(len(cut))
        elif cut:
            raise ApiError(413, f"{field}[{cut[0]}] is longer than max_seq_length "
                                f"({self.model.max_seq_length} tokens, prompt, [CLS] and [SEP] "
                                f"included): shorten it, or send truncate=true to cut it",
                           param=field, code="context_length_exceeded")
        try:
            return token_ids, self.batcher.submit(context, token_ids)
        except QueueFull as e:
            raise ApiError(429, f"{e}; the server is at capacity", type="rate_limit_error",
                           code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None

    def _checked_ids(self, inputs: list[list[int]], body: protocol.Request, field: str):
        """Token id lists in the vocabulary, cut at max_seq_length; the indices cut."""
        if body.prompt_name is not None:
            raise ApiError(400, "prompt_name does not apply to token ids: they are embedded "
                                "as given, prompt included", param="prompt_name")
        vocab, limit = self.model.backbone_config.vocab_size, self.model.max_seq_length
        for i, ids in enumerate(inputs):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"{field}[{i}] has token id {bad}, outside the "
                                    f"vocabulary [0, {vocab})", param=field)
        return [ids[:limit] for ids in inputs], [i for i, ids in enumerate(inputs)
                                                 if len(ids) > limit]

    async def add_context(self, body: ContextRequest) -> dict:
        if (body.texts is None) == (body.dataset_embeddings is None):
            raise ApiError(400, "send one of texts (the corpus) or dataset_embeddings "
                                "(base64 float32)", param="texts")
        self.contexts.reserve(body.name)
        context = None
        try:
            context = await asyncio.wrap_future(self.contexts.make(
                body.name, body.texts, body.dataset_embeddings, body.seed))
        finally:
            self.contexts.added(body.name, context)
        return self.contexts.describe(body.name)


def build_app(service: EmbeddingService, *, keys: list[str], public_metrics: bool,
              payload_limit: int) -> FastAPI:
    """The server's routes over `service`; its batcher runs from startup to shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        yield
        await run_in_threadpool(service.contexts.close)
        await run_in_threadpool(service.batcher.close)  # after uvicorn drained the requests

    app = FastAPI(title="cde-jax", lifespan=lifespan)

    def reject(path: str, e: ApiError) -> JSONResponse:
        service.metrics.errors.labels(route_of(path), e.code or e.type).inc()
        tei = path == "/embed" and e.status != 401  # 401: OpenAI's body on every route
        return JSONResponse(protocol.error_body(e, tei=tei), e.status, headers=e.headers)

    app.add_middleware(PayloadLimit, limit=payload_limit, reject=reject)
    if keys:
        app.add_middleware(RequireKey, keys=keys, reject=reject, open_paths={"/health"} | (
            {"/metrics"} if public_metrics else set()))
    app.add_middleware(RequestMetrics, metrics=service.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return reject(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return reject(request.url.path, protocol.validation_error(e.errors()))

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return reject(request.url.path, ApiError(400, str(e)))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        service.metrics.cancelled.inc()
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.error("%s %s failed: %s", request.method, request.url.path, type(e).__name__)
        return reject(request.url.path, ApiError(500, f"internal error: {type(e).__name__}",
                                                 type="server_error"))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request):
        rows_nd, tokens = await service.embed(request, body, body.input, field="input")
        return JSONResponse(protocol.embeddings_body(
            protocol.finish(rows_nd, dimensions=body.dimensions), body.model,
            body.encoding_format, tokens))

    @app.post("/embed")
    async def embed(body: EmbedRequest, request: Request):
        rows_nd, _ = await service.embed(request, body, body.inputs, field="inputs")
        return JSONResponse(protocol.finish(rows_nd, normalize=body.normalize,
                                           dimensions=body.dimensions).tolist())

    @app.get("/v1/models")
    async def models():
        return protocol.models_body(list(service.contexts.contexts), service.started)

    @app.post("/v1/contexts", status_code=201)
    async def add_context(body: ContextRequest):
        return await service.add_context(body)

    @app.get("/v1/contexts")
    async def contexts():
        return {"object": "list", "data": service.contexts.listing()}

    @app.delete("/v1/contexts/{name:path}")
    async def delete_context(name: str):
        service.contexts.delete(name)
        return {"id": name, "object": "context", "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app
