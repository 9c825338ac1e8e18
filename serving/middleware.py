"""ASGI middleware: the request body size limit, and per-request metrics (status and latency by route)."""

from __future__ import annotations

import asyncio
import json
import time

from serving.errors import APIError
from serving.metrics import Metrics


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over the limit: from Content-Length up front, else while the body streams in.

    When the limit trips mid-body the app may already be answering the broken read (a form parser says 400), so
    whatever it sends is dropped and the 413 goes out instead.
    """

    def __init__(
        self, app, max_bytes: int, metrics: Metrics | None = None, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.path_limits = path_limits or {}  # routes with a limit of their own (uploads), by path suffix

    def _error(self, limit: int) -> APIError:
        if self.metrics:
            self.metrics.rejected.labels("body_too_large").inc()
        return APIError(413, f"the request body is over the limit of {limit:,} bytes", code="request_too_large")

    def _limit(self, path: str) -> int:
        path = path.rstrip("/")
        return next((limit for suffix, limit in self.path_limits.items() if path.endswith(suffix)), self.max_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_error(send, self._error(limit))
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if exceeded and not started:
            await send_error(send, self._error(limit))


CLIENT_CLOSED = 499  # nginx's status for a request the client gave up on: not a server error


class RequestMetrics:
    """Counts every answer by route template and status (499 when the client left first), and times it to the
    last byte sent."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        finished = False

        async def recording_send(message):
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
            if not finished:  # a stream the client left before its end
                status = CLIENT_CLOSED
        except (asyncio.CancelledError, OSError):  # the client went away (Serve cancels the request)
            status = CLIENT_CLOSED
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
