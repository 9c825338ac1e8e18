"""The model deployment: an adapter over the replica runtime (pipelines/replica.py) plus token streaming.

Answers are plain data (`ModelReply`, stream events as dicts) rather than raised exceptions, so that a bad request
reaches the ingress as its own error with its status, whatever Ray does to exceptions crossing processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from pipelines.engines.base import GenerationResult, PreparedRequest, StreamEnd, check_fits
from pipelines.errors import FatalEngineError, ItemError, explain
from pipelines.replica import Replica, open_engine
from serving.spec import ServeSpec
from serving.stops import StopScanner

log = logging.getLogger(__name__)


@dataclass
class ModelError:
    status: int
    message: str
    code: str


@dataclass
class ModelReply:
    result: GenerationResult | None = None
    error: ModelError | None = None
    batch_size: int = 1
    queued_s: float = 0.0
    replica_s: float = 0.0  # time inside the replica's generate(): the rest of the round trip is transport


def model_error(exc: BaseException) -> ModelError:
    if isinstance(exc, ItemError):
        return ModelError(exc.http_status, str(exc), getattr(exc, "code", "invalid_request"))
    if isinstance(exc, FatalEngineError):  # this replica is failing its health check: Serve replaces it
        return ModelError(503, str(exc), "model_unavailable")
    return ModelError(500, f"the model failed: {type(exc).__name__}: {exc}", "model_error")


class ModelServer:
    def __init__(self, spec: dict, engine=None) -> None:
        self.spec = ServeSpec.model_validate(spec)
        threads = self.spec.resources.model.torch_threads or max(1, int(self.spec.resources.model.num_cpus))
        import torch

        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.load_error: str | None = None
        try:
            self.engine = engine if engine is not None else open_engine(self.spec.model, self.spec.engine)
        except Exception as exc:
            # A model that cannot load (missing files, missing extra) will not load on a retry either: the replica
            # stays up and says why, in its log, in /health/ready and in every answer, rather than Serve's bare
            # "failed to update the deployments" after endless restarts.
            self.engine = None
            self.load_error = f"the model {self.spec.model_id!r} could not load: {explain(exc)}"
            log.error("%s", self.load_error)
        self.load_s = time.perf_counter() - started
        # Concurrent requests become full engine batches (transformers), or go straight into vLLM's scheduler.
        self.replica = Replica(
            self.engine,
            self.spec.engine,
            max_batch_size=self.spec.batching.max_batch_size,
            max_wait_s=self.spec.batching.batch_wait_timeout_s,
        )

    # ---- generation ----

    async def generate(self, request: PreparedRequest) -> ModelReply:
        started = time.perf_counter()
        if self.load_error:
            return ModelReply(error=ModelError(503, self.load_error, "model_not_loaded"))
        try:
            scheduled = await self.replica.submit(request)
            reply = ModelReply(result=scheduled.result, batch_size=scheduled.batch_size, queued_s=scheduled.queued_s)
        except Exception as exc:
            reply = ModelReply(error=model_error(exc))
        reply.replica_s = time.perf_counter() - started
        return reply

    # ---- streaming ----

    async def stream(self, request: PreparedRequest) -> AsyncIterator[dict]:
        """{"delta": text} events, then {"finish_reason", "output_tokens"}; or one {"error": {...}}."""
        scanner = StopScanner(request.sampling.stop)
        text: list[str] = []
        if self.load_error:
            yield {"error": {"status": 503, "message": self.load_error, "code": "model_not_loaded"}}
            return
        end: StreamEnd | None = None
        try:
            check_fits(request, self.spec.engine.max_model_len)
            # Closing the engine's stream (here on a stop string, or when the client leaves and this generator is
            # closed) stops its generation, so the next request does not wait for tokens nobody reads.
            async with aclosing(self.replica.stream(request)) as deltas:
                async for delta in deltas:
                    if isinstance(delta, StreamEnd):
                        end = delta
                        break
                    emitted = scanner.push(delta)
                    if emitted:
                        text.append(emitted)
                        yield {"delta": emitted}
                    if scanner.stopped:
                        break
            tail = scanner.flush()
            if tail:
                text.append(tail)
                yield {"delta": tail}
        except Exception as exc:
            error = model_error(exc)
            yield {"error": {"status": error.status, "message": error.message, "code": error.code}}
            return
        if end is not None:  # the engine's own count: exact, and never above max_tokens
            finish = "stop" if scanner.stopped else end.finish_reason
            yield {"finish_reason": finish, "output_tokens": end.output_tokens}
            return
        output_tokens = self._count_tokens("".join(text))
        finish = "stop" if scanner.stopped or output_tokens < request.sampling.max_new_tokens else "length"
        yield {"finish_reason": finish, "output_tokens": min(output_tokens, request.sampling.max_new_tokens)}

    def _count_tokens(self, text: str) -> int:
        # The engine's stream gives text only; re-encoding it is exact for plain text and close otherwise.
        return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    # ---- lifecycle ----

    async def ready(self) -> dict:
        if self.load_error:
            return {"model": self.spec.model_id, "error": self.load_error}
        return {"model": self.spec.model_id, "load_s": round(self.load_s, 3), "queue_depth": self.replica.depth}

    def check_health(self) -> None:
        if self.engine is not None and not self.replica.healthy:
            raise RuntimeError(f"the model replica failed: {self.replica.fatal}")
        if self.engine is not None and not self.engine.health():
            raise RuntimeError("the engine is not healthy")
