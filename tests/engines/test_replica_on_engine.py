"""The replica runtime on the tiny model's transformers engine: streams share engine batches with each other and with
answers, and a request whose caller left stops generating, so the next request does not wait for it."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipelines.config import EngineSpec
from pipelines.engines import transformers as engine_module
from pipelines.engines.base import SamplingParams, StreamEnd, Watch
from pipelines.prepare import prepare_item
from pipelines.prompts import Task, TaskOptions
from pipelines.replica import Replica

SHORT = SamplingParams(max_new_tokens=8)


def _request(tokenizer, prompt: str, sampling: SamplingParams, item_id: str):
    options = TaskOptions(task=Task.prompt, prompt=prompt)
    (request,) = prepare_item(
        b"x", item_id=item_id, name="note.txt", tokenizer=tokenizer, options=options, sampling=sampling
    ).requests
    return request


def _endless(engine, budget: int) -> SamplingParams:
    # End of turn banned: left alone, the generation runs its whole budget.
    return SamplingParams(max_new_tokens=budget, logit_bias=tuple((t, -100.0) for t in engine.stop_ids))


@pytest.fixture
def steps(monkeypatch):
    """Decoding steps of every engine batch, counted where transformers asks whether a row was cancelled."""
    counted = []
    check = engine_module._RowsCancelled.__call__
    monkeypatch.setattr(
        engine_module._RowsCancelled, "__call__", lambda self, *a, **k: (counted.append(1), check(self, *a, **k))[1]
    )
    return counted


async def _collect(stream, leave_after: int | None = None) -> list:
    items = []
    async for item in stream:
        items.append(item)
        if leave_after is not None and len(items) >= leave_after:
            break
    await stream.aclose()
    return items


async def _timed(replica: Replica, request) -> float:
    started = time.perf_counter()
    await replica.submit(request)
    return time.perf_counter() - started


def test_a_cancelled_row_stops_and_the_batch_ends_when_every_row_is_done(plain_engine, tokenizer, steps):
    budget = 400
    first, second = (_request(tokenizer, "Go on and on.", _endless(plain_engine, budget), name) for name in "ab")
    # Its first ten tokens alone (greedy: a shorter budget generates the same prefix).
    alone = plain_engine.generate([_request(tokenizer, "Go on and on.", _endless(plain_engine, 10), "alone")])[0]
    steps.clear()

    async def scenario():
        watches = [Watch.streaming(), Watch.streaming()]
        generation = asyncio.ensure_future(asyncio.to_thread(plain_engine.generate, [first, second], watches))
        await watches[0].items.get()
        watches[0].cancel()  # the first row's caller leaves after one step
        received = []
        while len(received) < 10:
            received += await watches[1].items.get()
        watches[1].cancel()  # the second after ten
        await generation
        return received

    received = asyncio.run(scenario())
    # The second row's tokens are those it generates alone (greedy), and the batch ended long before its budget.
    assert received[:10] == alone.output_token_ids[:10]
    assert len(steps) < budget // 4


def test_concurrent_streams_share_one_engine_batch_and_each_ends_with_its_own_count(plain_engine, tokenizer):
    requests = [
        _request(tokenizer, prompt, SamplingParams(max_new_tokens=budget), f"s{i}")
        for i, (prompt, budget) in enumerate((("Stream a few words.", 20), ("Tell me a long story.", 20)))
    ]
    answers = [plain_engine.generate([r])[0] for r in requests]
    replica = Replica(plain_engine, EngineSpec(speculative=False, max_batch_size=8), max_wait_s=0.2)

    async def scenario():
        return await asyncio.gather(*(_collect(replica.stream(r)) for r in requests))

    for streamed, answer in zip(asyncio.run(scenario()), answers):
        *deltas, end = streamed
        assert isinstance(end, StreamEnd) and all(isinstance(d, str) for d in deltas)
        assert (end.output_tokens, end.finish_reason) == (answer.output_tokens, answer.finish_reason)
    stats = replica.stats()
    assert (stats.batches, stats.mean_batch_size) == (1, 2)


@pytest.mark.parametrize("leaves", ["a client timeout", "a stream closed early"])
def test_the_next_request_does_not_wait_for_a_request_whose_caller_left(plain_engine, tokenizer, steps, leaves):
    budget = 600
    endless = _request(tokenizer, "Go on and on.", _endless(plain_engine, budget), "endless")
    short = _request(tokenizer, "Say hi.", SHORT, "short")
    replica = Replica(plain_engine, EngineSpec(speculative=False, max_batch_size=8))

    async def leave() -> None:
        if leaves == "a client timeout":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(replica.submit(endless), timeout=0.3)
        else:
            assert len(await _collect(replica.stream(endless), leave_after=1)) == 1

    async def scenario():
        idle = sorted([await _timed(replica, short) for _ in range(3)])[1]
        afters, left = [], []
        for _ in range(3):  # medians: one slow moment on a shared machine is not the engine waiting
            steps.clear()
            await leave()
            left.append(len(steps))
            afters.append(await _timed(replica, short))
        return idle, sorted(afters)[1], max(left)

    idle, after, left_after = asyncio.run(scenario())
    assert left_after < budget // 4, "the abandoned request kept generating"
    assert after <= 2 * idle, f"the next request took {after:.3f}s, {idle:.3f}s when the engine is idle"
