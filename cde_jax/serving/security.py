"""Two ASGI middlewares in front of the routes: API keys (`RequireKey`) and the request
body's size limit (`PayloadLimit`). Plain ASGI, as `metrics.RequestMetrics` is: Starlette's
`BaseHTTPMiddleware` would hide a client's disconnect from the routes.

Keys are compared with `hmac.compare_digest`, against every key whatever matched, so that
the time an answer takes tells nothing about a key; no key reaches a log or an error
message."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.responses import Response

from .protocol import ApiError

Reject = Callable[[str, ApiError], Response]  # (path, error) -> the error's answer


class RequireKey:
    """`Authorization: Bearer KEY` on every path but `open_paths`, else 401."""

    def __init__(self, app, keys: list[str], open_paths: set[str], reject: Reject):
        self.app, self.open_paths, self.reject = app, open_paths, reject
        self._keys = [key.encode() for key in keys]

    def allows(self, authorization: bytes | None) -> bool:
        scheme, _, token = (authorization or b"").partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(token, key)
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization")
        if self.allows(authorization):
            return await self.app(scope, receive, send)
        message = ("no API key: send the header Authorization: Bearer KEY"
                   if authorization is None else "the API key is not valid")
        error = ApiError(401, message, code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        await self.reject(scope["path"], error)(scope, receive, send)


class PayloadLimit:
    """Request bodies of `limit` bytes at most, else 413 before more is read: a declared
    Content-Length over it is refused unread, a streamed body once it passes it. The body
    is read here and replayed to the route; a client that disconnects while sending it gets
    nothing (its request is counted with status 499)."""

    def __init__(self, app, limit: int, reject: Reject):
        self.app, self.limit, self.reject = app, limit, reject

    def too_large(self, path: str, size: str) -> Response:
        return self.reject(path, ApiError(
            413, f"the request body has {size} bytes, more than this server takes "
                 f"(--payload-limit {self.limit}): split the request",
            code="payload_too_large"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.too_large(scope["path"], declared.decode())(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return await Response(status_code=499)(scope, receive, send)  # not sent
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.too_large(scope["path"], f"at least {size}")(
                    scope, receive, send)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)
