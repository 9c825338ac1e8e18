"""The replica runtime: one model engine per replica, kept fed by many concurrent callers.

Batch model actors (`pipelines.stages.Generate`, several Ray Data batches in flight) and the endpoint's model
deployment (`serving.model_server.ModelServer`, many HTTP requests in flight) both wrap their engine in a `Replica`
and `await replica.submit(request)` from their event loop:

- transformers: a scheduler hands the engine whatever waits when it frees up, as one batch: the oldest request plus
  those of the same sampling settings nearest to it in prompt length (less padding), up to `max_batch_size`. A lone
  request runs at once; `max_wait_s` optionally holds an idle engine a little longer for a fuller batch. At most
  `max_queued` requests wait; further callers wait for room.
- vLLM: every request goes straight to the engine as it arrives; vLLM's own scheduler batches at the token level.
- `stream(request)`: a stream takes the same queue, so concurrent streams (and answers) share engine batches; its
  row's token ids reach it at every step (`Watch`).
- A caller that gives up (its task cancelled: a client timeout or disconnect, a closed stream) leaves the queue, or
  cancels its row, which the engine ends at the next decoding step (vLLM: the request is aborted).
- A failed batch is generated again one request at a time, so one bad request fails alone (its exception is its
  caller's answer).
- A fatal error (out of memory, a dead engine: `pipelines.errors.is_fatal`) is no request's fault: `on_fatal` runs
  (a batch actor exits there, to be replaced by Ray), the replica turns unhealthy, and every caller gets a
  `FatalEngineError`.
- `stats()`: how busy the engine was, the mean batch it ran, and speculative decoding counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass

from pipelines.config import EngineSpec, ModelSpec
from pipelines.engines.base import GenerationResult, PreparedRequest, StreamEnd, Watch
from pipelines.errors import FatalEngineError, is_fatal

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUED = 1024
# Batch jobs: each model batch's stats row carries its replica's statistics (JSON) to the driver in this column.
REPLICA_STATS = "replica_stats"


def open_engine(model: ModelSpec, engine: EngineSpec):
    """The engine `engine.kind` names, loaded once per replica; vLLM is imported only when chosen.

    vLLM opens in its online mode (an AsyncLLM) so that concurrent callers can each hand it a request.
    """
    from pipelines.model_sources import resolve

    resolved = resolve(model)
    if engine.kind == "vllm":
        from pipelines.engines.vllm import VLLMEngine

        return VLLMEngine(resolved, engine, online=True)
    from pipelines.engines.transformers import TransformersEngine

    return TransformersEngine(resolved, engine)


@dataclass
class Scheduled:
    """A request's result, with the size of the engine batch it ran in and how long it waited for one."""

    result: GenerationResult
    batch_size: int
    queued_s: float


@dataclass
class ReplicaStats:
    """Cumulative counters of one replica. `busy_s`: time the engine was generating; `span_s`: from the first
    request submitted to the last result returned. For vLLM a "batch" is the requests in the engine when one is
    submitted (that one included)."""

    replica: str
    busy_s: float = 0.0
    span_s: float = 0.0
    batches: int = 0
    batched_requests: int = 0
    requests: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0

    @property
    def busy_fraction(self) -> float | None:
        return self.busy_s / self.span_s if self.span_s > 0 else None

    @property
    def mean_batch_size(self) -> float | None:
        return self.batched_requests / self.batches if self.batches else None

    def as_dict(self) -> dict:
        return asdict(self)


def _end_stream(task: asyncio.Task, watch: Watch) -> None:
    """A streamed request's last item: its result (the stream may already have ended on its own) or its error."""
    if task.cancelled():
        return
    error = task.exception()
    watch.put(error if error is not None else task.result().result)


def aggregate(snapshots: list[dict]) -> dict:
    """One `engine` summary over replicas (the latest snapshot of each): busy time over the replicas' spans."""
    busy = sum(s["busy_s"] for s in snapshots)
    span = sum(s["span_s"] for s in snapshots)
    batches = sum(s["batches"] for s in snapshots)
    batched = sum(s["batched_requests"] for s in snapshots)
    return {
        "replicas": len(snapshots),
        "busy_fraction": busy / span if span > 0 else None,
        "mean_batch_size": batched / batches if batches else None,
        "busy_s": busy,
        "span_s": span,
        "batches": batches,
        "requests": sum(s["requests"] for s in snapshots),
        "spec_drafted": sum(s["spec_drafted"] for s in snapshots),
        "spec_accepted": sum(s["spec_accepted"] for s in snapshots),
    }


@dataclass
class _Pending:
    request: PreparedRequest
    watch: Watch
    future: asyncio.Future
    enqueued: float
    taken: bool = False


class Replica:
    def __init__(
        self,
        engine,
        spec: EngineSpec,
        *,
        max_batch_size: int | None = None,
        max_wait_s: float = 0.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.straight = spec.kind == "vllm"
        self.max_batch_size = max_batch_size or spec.max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.on_fatal = on_fatal
        self.fatal: str | None = None
        self._waiting: list[_Pending] = []
        self._arrived: asyncio.Event | None = None
        self._room: asyncio.Semaphore | None = None
        self._worker: asyncio.Task | None = None
        self._stats = ReplicaStats(replica=f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._stats_lock = threading.Lock()
        self._active = 0
        self._busy_since = 0.0
        self._first: float | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the engine."""
        return len(self._waiting)

    @property
    def healthy(self) -> bool:
        return self.fatal is None

    # ---- submitting ----

    async def submit(self, request: PreparedRequest, watch: Watch | None = None) -> Scheduled:
        """The request's result; its own error (an ItemError, say) is raised here, a fatal one as FatalEngineError.

        A caller that gives up (its task cancelled: a client timeout, a cancelled batch member) leaves the queue if
        it was waiting, or cancels its request in the engine batch, which ends it at the next decoding step.
        """
        watch = watch or Watch()
        if self.fatal:
            raise FatalEngineError(f"the model replica failed and is being replaced: {self.fatal}")
        if self._first is None:
            self._first = time.monotonic()
        if self.straight:
            return await self._straight(request)
        self._start()
        assert self._room is not None and self._arrived is not None
        await self._room.acquire()  # a bounded queue: wait for room
        pending = _Pending(request, watch, asyncio.get_running_loop().create_future(), time.monotonic())
        self._waiting.append(pending)
        self._arrived.set()
        try:
            return await pending.future
        finally:
            if not pending.taken:  # the caller gave up while waiting
                self._waiting.remove(pending)
                self._room.release()
            elif pending.future.cancelled() or not pending.future.done():  # ... or while its request runs
                watch.cancel()

    async def submit_all(self, requests: list[PreparedRequest]) -> list[Scheduled | BaseException]:
        """Every request submitted at once; each outcome is its result or its error. A fatal error raises."""
        outcomes = await asyncio.gather(*(self.submit(r) for r in requests), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, FatalEngineError):
                raise outcome
        return outcomes

    async def stream(self, request: PreparedRequest) -> AsyncIterator[str | StreamEnd]:
        """Text deltas, then a StreamEnd. Through the scheduler, so that concurrent streams (and answers) share
        engine batches; vLLM streams straight from its engine. Closing the stream cancels its request."""
        if self.fatal:
            raise FatalEngineError(f"the model replica failed and is being replaced: {self.fatal}")
        if self.straight or not hasattr(self.engine, "follow"):
            async with aclosing(self._stream_straight(request)) as items:
                async for item in items:
                    yield item
            return
        watch = Watch.streaming()
        scheduled = asyncio.ensure_future(self.submit(request, watch))
        scheduled.add_done_callback(lambda task: _end_stream(task, watch))
        try:
            async with aclosing(self.engine.follow(request, watch)) as items:
                async for item in items:
                    yield item
        finally:
            watch.cancel()
            scheduled.cancel()  # still queued: leaves the queue; running: ends at the next step

    async def _stream_straight(self, request: PreparedRequest) -> AsyncIterator[str | StreamEnd]:
        if self._first is None:
            self._first = time.monotonic()
        self._began(1)
        try:
            async with aclosing(self.engine.stream(request)) as items:
                async for item in items:
                    yield item
        except Exception as exc:
            self._check_fatal(exc)
            raise
        finally:
            self._ended(1)
            self._finished([])

    def _start(self) -> None:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._room = asyncio.Semaphore(self.max_queued)
            self._worker = asyncio.get_running_loop().create_task(self._serve())

    # ---- transformers: the scheduler ----

    async def _serve(self) -> None:
        assert self._arrived is not None and self._room is not None
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            if self.max_wait_s > 0 and len(self._waiting) < self.max_batch_size:
                deadline = time.monotonic() + self.max_wait_s
                while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except TimeoutError:
                        break
            batch = [p for p in self._take() if not p.future.done()]  # callers that gave up are not run
            if batch:
                await self._run_batch(batch)

    def _take(self) -> list[_Pending]:
        """The oldest waiting request and those of its sampling settings nearest to it in prompt length."""
        oldest = self._waiting[0]
        length = oldest.request.prompt_tokens
        same = [p for p in self._waiting if p.request.sampling == oldest.request.sampling]
        same.sort(key=lambda p: (abs(p.request.prompt_tokens - length), p.enqueued))
        chosen = same[: self.max_batch_size]
        taken = {id(p) for p in chosen}
        self._waiting = [p for p in self._waiting if id(p) not in taken]
        for pending in chosen:
            pending.taken = True
            self._room.release()
        return chosen

    async def _run_batch(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        self._began(len(batch))
        try:
            outcomes = await asyncio.to_thread(
                self.generate_isolated, [p.request for p in batch], [p.watch for p in batch]
            )
        except FatalEngineError as exc:
            outcomes = [exc] * len(batch)
            self._fail_waiting(exc)
        except Exception as exc:
            outcomes = [exc] * len(batch)
        finally:
            self._ended(len(batch))
        for pending, outcome in zip(batch, outcomes):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(Scheduled(outcome, len(batch), started - pending.enqueued))
        self._finished([o for o in outcomes if isinstance(o, GenerationResult)])

    def _fail_waiting(self, exc: BaseException) -> None:
        waiting, self._waiting = self._waiting, []
        for pending in waiting:
            pending.taken = True
            self._room.release()
            if not pending.future.done():
                pending.future.set_exception(exc)

    # ---- isolating a bad request, and the fatal-error policy ----

    def generate_isolated(
        self, requests: list[PreparedRequest], watches: list[Watch] | None = None
    ) -> list[GenerationResult | Exception]:
        """One engine call for the batch; if it fails, one call per request so a bad request fails alone (a stream
        that already received tokens fails with the batch rather than start over).

        A fatal error raises FatalEngineError (after `on_fatal`) instead of failing any request.
        """
        watches = watches or [None] * len(requests)
        try:
            return list(self.engine.generate(requests, watches))
        except Exception as exc:
            self._check_fatal(exc)
            if len(requests) == 1:
                return [exc]
            logger.warning(
                "a batch of %d failed (%s: %s); generating one by one to find the bad request",
                len(requests),
                type(exc).__name__,
                exc,
            )
            failed = exc
        outcomes: list[GenerationResult | Exception] = []
        for request, watch in zip(requests, watches):
            if watch is not None and (watch.delivered or watch.cancelled.is_set()):
                outcomes.append(failed)
                continue
            try:
                outcomes.append(self.engine.generate([request], [watch])[0])
            except Exception as exc:
                self._check_fatal(exc)
                outcomes.append(exc)
        return outcomes

    def _check_fatal(self, exc: BaseException) -> None:
        if not is_fatal(exc):
            return
        self.fatal = f"{type(exc).__name__}: {exc}"
        logger.error("fatal engine error, this model replica cannot go on: %s", self.fatal)
        if self.on_fatal is not None:
            self.on_fatal(exc)
        raise FatalEngineError(f"the model replica failed: {self.fatal}") from exc

    # ---- vLLM: straight to the engine ----

    async def _straight(self, request: PreparedRequest) -> Scheduled:
        in_engine = self._began(1)
        try:
            if hasattr(self.engine, "agenerate"):
                result = await self.engine.agenerate(request)
            else:
                (result,) = await asyncio.to_thread(self.engine.generate, [request])
        except Exception as exc:
            self._check_fatal(exc)
            raise
        finally:
            self._ended(1)
        self._finished([result])
        return Scheduled(result, in_engine, 0.0)

    # ---- statistics ----

    def _began(self, size: int) -> int:
        """Count an engine call of `size` requests; returns the requests now in the engine."""
        with self._stats_lock:
            if self._active == 0:
                self._busy_since = time.monotonic()
            self._active += size
            self._stats.batches += 1
            self._stats.batched_requests += self._active if self.straight else size
            return self._active

    def _ended(self, size: int) -> None:
        with self._stats_lock:
            self._active -= size
            if self._active == 0:
                self._stats.busy_s += time.monotonic() - self._busy_since

    def _finished(self, results: list[GenerationResult]) -> None:
        with self._stats_lock:
            self._stats.requests += len(results)
            self._stats.spec_drafted += sum(r.spec_drafted or 0 for r in results)
            self._stats.spec_accepted += sum(r.spec_accepted or 0 for r in results)
            if self._first is not None:
                self._stats.span_s = time.monotonic() - self._first

    def stats(self) -> ReplicaStats:
        """A copy of the counters; vLLM's speculation counts come from its engine-wide metrics."""
        with self._stats_lock:
            snapshot = ReplicaStats(**asdict(self._stats))
        totals = self.engine.speculation() if hasattr(self.engine, "speculation") else None
        if totals is not None:
            snapshot.spec_drafted, snapshot.spec_accepted = totals
        return snapshot
