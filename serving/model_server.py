"""The model deployment: one engine per replica, micro-batched generation and token streaming.

Answers are plain data (`ModelReply`, stream events as dicts) rather than raised exceptions, so that a bad request
reaches the ingress as its own error with its status, whatever Ray does to exceptions crossing processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from pipelines.engines.base import GenerationResult, PreparedRequest, check_fits
from pipelines.errors import ItemError, explain
from serving.batcher import MicroBatcher
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
    return ModelError(500, f"the model failed: {type(exc).__name__}: {exc}", "model_error")


def open_engine(spec: ServeSpec):
    """The engine EngineSpec.kind names; vLLM is imported only when chosen."""
    from pipelines.model_sources import resolve

    model = resolve(spec.model)
    if spec.engine.kind == "vllm":
        from pipelines.engines.vllm import VLLMEngine

        return VLLMEngine(model, spec.engine, online=True)
    from pipelines.engines.transformers import TransformersEngine

    return TransformersEngine(model, spec.engine)


class ModelServer:
    def __init__(self, spec: dict, engine=None) -> None:
        self.spec = ServeSpec.model_validate(spec)
        threads = self.spec.resources.model.torch_threads or max(1, int(self.spec.resources.model.num_cpus))
        import torch

        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.load_error: str | None = None
        try:
            self.engine = engine if engine is not None else open_engine(self.spec)
        except Exception as exc:  # noqa: BLE001 - kept as this replica's state, see below
            # A model that cannot load (missing files, missing extra) will not load on a retry either: the replica
            # stays up and says why, in its log, in /health/ready and in every answer, rather than Serve's bare
            # "failed to update the deployments" after endless restarts.
            self.engine = None
            self.load_error = f"the model {self.spec.model_id!r} could not load: {explain(exc)}"
            log.error("%s", self.load_error)
        self.load_s = time.perf_counter() - started
        # vLLM schedules concurrent requests itself; the transformers engine needs them handed over together.
        self.own_batching = self.spec.engine.kind == "vllm"
        self.batcher: MicroBatcher[PreparedRequest, GenerationResult] = MicroBatcher(
            self._run_batch,
            max_batch_size=self.spec.batching.max_batch_size,
            max_wait_s=self.spec.batching.batch_wait_timeout_s,
        )

    # ---- generation ----

    async def generate(self, request: PreparedRequest) -> ModelReply:
        started = time.perf_counter()
        if self.load_error:
            return ModelReply(error=ModelError(503, self.load_error, "model_not_loaded"))
        try:
            if self.own_batching:
                (result,) = await asyncio.to_thread(self.engine.generate, [request])
                reply = ModelReply(result=result)
            else:
                batched = await self.batcher.submit(request)
                reply = ModelReply(result=batched.value, batch_size=batched.batch_size, queued_s=batched.queued_s)
        except Exception as exc:  # noqa: BLE001 - becomes the request's error answer
            reply = ModelReply(error=model_error(exc))
        reply.replica_s = time.perf_counter() - started
        return reply

    async def _run_batch(self, requests: list[PreparedRequest]) -> list:
        return await asyncio.to_thread(self._generate_isolated, requests)

    def _generate_isolated(self, requests: list[PreparedRequest]) -> list:
        """One engine call for the batch; if it fails, one call per request so a bad request fails alone."""
        try:
            return self.engine.generate(requests)
        except Exception:  # noqa: BLE001
            if len(requests) == 1:
                raise
        outcomes: list = []
        for request in requests:
            try:
                outcomes.append(self.engine.generate([request])[0])
            except Exception as exc:  # noqa: BLE001
                outcomes.append(exc)
        return outcomes

    # ---- streaming ----

    async def stream(self, request: PreparedRequest) -> AsyncIterator[dict]:
        """{"delta": text} events, then {"finish_reason", "output_tokens"}; or one {"error": {...}}."""
        scanner = StopScanner(request.sampling.stop)
        text: list[str] = []
        if self.load_error:
            yield {"error": {"status": 503, "message": self.load_error, "code": "model_not_loaded"}}
            return
        try:
            check_fits(request, self.spec.engine.max_model_len)
            async for delta in self.engine.stream(request):
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
        except Exception as exc:  # noqa: BLE001
            error = model_error(exc)
            yield {"error": {"status": error.status, "message": error.message, "code": error.code}}
            return
        output_tokens = self._count_tokens("".join(text))
        finish = "stop" if scanner.stopped or output_tokens < request.sampling.max_new_tokens else "length"
        yield {"finish_reason": finish, "output_tokens": output_tokens}

    def _count_tokens(self, text: str) -> int:
        # The engine's stream gives text only; re-encoding it is exact for plain text and close otherwise.
        return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    # ---- lifecycle ----

    async def ready(self) -> dict:
        if self.load_error:
            return {"model": self.spec.model_id, "error": self.load_error}
        return {"model": self.spec.model_id, "load_s": round(self.load_s, 3), "queue_depth": self.batcher.depth}

    def check_health(self) -> None:
        if self.engine is not None and not self.engine.health():
            raise RuntimeError("the engine is not healthy")
