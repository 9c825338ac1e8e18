"""How the ingress talks to the model deployment: through a Serve handle, with overload and errors mapped.

`ModelBackend` is what the routes need; `ServeModelBackend` implements it over a DeploymentHandle. A full queue
(Serve's `max_queued_requests` on the model deployment, counted per ingress replica) becomes 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from pipelines.engines.base import PreparedRequest
from serving.errors import SERVER, APIError, overloaded
from serving.metrics import Metrics
from serving.model_server import ModelReply

logger = logging.getLogger(__name__)


class ModelBackend(Protocol):
    async def generate(self, request: PreparedRequest) -> ModelReply: ...

    def stream(self, request: PreparedRequest) -> AsyncIterator[dict]: ...

    async def ready(self, timeout_s: float) -> dict | None: ...


# A replica whose weights are still loading answers at once with this code; waiting helps, so it comes with
# Retry-After. ("model_not_loaded": the load failed, and waiting will not help.)
MODEL_LOADING = "model_loading"


def _reply_error(status: int, message: str, code: str, retry_after_s: int) -> APIError:
    headers = {"Retry-After": str(retry_after_s)} if code == MODEL_LOADING else None
    return APIError(
        status, message, type=SERVER if status >= 500 else "invalid_request_error", code=code, headers=headers
    )


class ServeModelBackend:
    def __init__(self, handle, metrics: Metrics, *, retry_after_s: int, timeout_s: float) -> None:
        self.handle = handle
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s

    def _overload(self, exc: BaseException) -> APIError | None:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, BackPressureError):
            self.metrics.rejected.labels("overload").inc()
            return overloaded(self.retry_after_s)
        if isinstance(exc, DeploymentUnavailableError):
            return overloaded(self.retry_after_s, "the model deployment is unavailable; retry later")
        return None

    async def generate(self, request: PreparedRequest) -> ModelReply:
        """The model's answer (with its batch and timing details); errors are raised as APIError."""
        self.metrics.queue_depth.inc()
        response = None
        try:
            response = self.handle.generate.remote(request)
            reply: ModelReply = await asyncio.wait_for(response, self.timeout_s)
        except TimeoutError:
            logger.warning("request %s: no answer from the model within %g s; cancelled", request.id, self.timeout_s)
            response.cancel()
            raise APIError(
                504, f"the model did not answer within {self.timeout_s:g} s", type=SERVER, code="timeout"
            ) from None
        except Exception as exc:
            mapped = self._overload(exc)
            if mapped:
                raise mapped from None
            raise
        finally:
            self.metrics.queue_depth.dec()
        if reply.error is not None:
            raise _reply_error(reply.error.status, reply.error.message, reply.error.code, self.retry_after_s)
        self.metrics.observe_batch(reply.batch_size, reply.queued_s)
        return reply

    async def stream(self, request: PreparedRequest) -> AsyncIterator[dict]:
        self.metrics.queue_depth.inc()
        try:
            events = self.handle.options(stream=True).stream.remote(request)
            try:
                async for event in events:
                    error = event.get("error")
                    if error and error["code"] == MODEL_LOADING:  # the only event: answered with its status
                        raise _reply_error(error["status"], error["message"], error["code"], self.retry_after_s)
                    yield event
            except Exception as exc:
                mapped = self._overload(exc)
                if mapped:
                    raise mapped from None
                raise
        finally:
            self.metrics.queue_depth.dec()

    async def ready(self, timeout_s: float) -> dict | None:
        """The model deployment's `ready()` (a loading replica answers at once), or None when no replica answers
        within `timeout_s`: none is up yet, or every one is busy."""
        response = self.handle.ready.remote()
        try:
            return await asyncio.wait_for(response, timeout_s)
        except Exception:
            response.cancel()
            return None
