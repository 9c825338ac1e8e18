"""The model deployment: an adapter over the replica runtime (pipelines/replica.py) plus token streaming.

Answers are plain data (`ModelReply`, stream events as dicts) rather than raised exceptions, so that a bad request
reaches the ingress as its own error with its status, whatever Ray does to exceptions crossing processes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
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
    """One model replica. Its weights load in a background thread, so that the replica is up at once: while they
    load, readiness says so and requests are answered 503 `model_loading` (with Retry-After at the ingress) instead
    of waiting, and Serve's health check passes."""

    def __init__(self, spec: dict, engine=None, *, loader: Callable[[], object] | None = None) -> None:
        self.spec = ServeSpec.model_validate(spec)
        threads = self.spec.resources.model.torch_threads or max(1, int(self.spec.resources.model.num_cpus))
        import torch

        torch.set_num_threads(threads)
        self.engine = None
        self.replica: Replica | None = None
        self.load_error: str | None = None
        self.load_s: float | None = None  # set when the load is over, failed or not
        self._load_started = time.perf_counter()
        if engine is not None:
            self._load(lambda: engine)
        else:
            load = loader or (lambda: open_engine(self.spec.model, self.spec.engine))
            threading.Thread(target=self._load, args=(load,), name="model-load", daemon=True).start()

    def _load(self, load: Callable[[], object]) -> None:
        engine = None
        try:
            engine = load()
        except BaseException as exc:
            # A model that cannot load (missing files, missing extra) will not load on a retry either: the replica
            # stays up and says why, in its log, in /health/ready and in every answer, rather than Serve's bare
            # "failed to update the deployments" after endless restarts.
            self.load_error = f"the model {self.spec.model_id!r} could not load: {explain(exc)}"
            log.error("%s", self.load_error)
        # Concurrent requests become full engine batches (transformers), or go straight into vLLM's scheduler.
        self.replica = Replica(
            engine,
            self.spec.engine,
            max_batch_size=self.spec.batching.max_batch_size,
            max_wait_s=self.spec.batching.batch_wait_timeout_s,
        )
        self.engine = engine
        self.load_s = time.perf_counter() - self._load_started  # last: the replica answers from here on
        if engine is not None:
            log.info("the model %r loaded in %.1f s", self.spec.model_id, self.load_s)

    @property
    def loading(self) -> bool:
        return self.load_s is None

    def _loading_message(self) -> str:
        elapsed = time.perf_counter() - self._load_started
        return f"the model {self.spec.model_id!r} is loading ({elapsed:.0f} s so far); retry later"

    # ---- generation ----

    async def generate(self, request: PreparedRequest) -> ModelReply:
        started = time.perf_counter()
        if self.loading:
            return ModelReply(error=ModelError(503, self._loading_message(), "model_loading"))
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
        if self.loading:
            yield {"error": {"status": 503, "message": self._loading_message(), "code": "model_loading"}}
            return
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
        if self.loading:
            elapsed = time.perf_counter() - self._load_started
            return {"model": self.spec.model_id, "loading": True, "elapsed_s": round(elapsed, 3)}
        if self.load_error:
            return {"model": self.spec.model_id, "error": self.load_error}
        return {"model": self.spec.model_id, "load_s": round(self.load_s, 3), "queue_depth": self.replica.depth}

    def record_routing_stats(self) -> dict:
        """What Serve's request router reads (serving/routing.py): replicas still loading get no traffic while
        others can take it."""
        return {"loading": self.loading, "failed": self.load_error is not None}

    def check_health(self) -> None:
        # Passes while the model loads (failing would make Serve replace the replica and start the load over),
        # and after a load failure (the replica stays up to report it).
        if self.engine is not None and not self.replica.healthy:
            raise RuntimeError(f"the model replica failed: {self.replica.fatal}")
        if self.engine is not None and not self.engine.health():
            raise RuntimeError("the engine is not healthy")
