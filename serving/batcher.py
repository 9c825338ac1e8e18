"""Micro-batching for one model replica: concurrent requests become one engine call.

A batch is whatever is waiting when the engine frees up (up to max_batch_size), so a lone request runs at once and
requests arriving during a batch form the next one; `max_wait_s` optionally holds an idle engine a little longer
for a fuller batch. (Ray Serve's `@serve.batch` forms the next batch while the current one runs, which caps it at
what arrives within its timeout; and at concurrency 1 it always waits the full timeout.)
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Batched(Generic[R]):
    value: R
    batch_size: int
    queued_s: float


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_batch_size: int,
        max_wait_s: float = 0.0,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: asyncio.Queue[_Pending[T]] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: T) -> Batched[R]:
        """The item's result (its exception is raised here), with the size of the batch it ran in."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future, time.monotonic()))
        return await future

    async def _serve(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            self._drain(queue, batch)
            if self.max_wait_s > 0 and len(batch) < self.max_batch_size:
                deadline = time.monotonic() + self.max_wait_s
                while len(batch) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), left))
                    except asyncio.TimeoutError:
                        break
                    self._drain(queue, batch)
            live = [p for p in batch if not p.future.done()]  # callers that gave up are not run
            if live:
                await self._run_batch(live)

    def _drain(self, queue: asyncio.Queue, batch: list) -> None:
        while len(batch) < self.max_batch_size and not queue.empty():
            batch.append(queue.get_nowait())

    async def _run_batch(self, batch: list[_Pending[T]]) -> None:
        started = time.monotonic()
        try:
            outcomes = await self._run([p.item for p in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"batch function returned {len(outcomes)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear about it
            outcomes = [exc] * len(batch)
        for pending, outcome in zip(batch, outcomes):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(Batched(outcome, len(batch), started - pending.enqueued))
