"""The replica runtime on stand-in engines: merging concurrent callers, bounded queue, isolation, fatal errors."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pipelines.config import EngineSpec
from pipelines.engines.base import GenerationResult, PreparedRequest, SamplingParams
from pipelines.errors import FatalEngineError, InvalidRequest
from pipelines.replica import Replica, aggregate

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def request(name: str, length: int = 3, sampling: SamplingParams = SamplingParams()) -> PreparedRequest:
    return PreparedRequest(name, np.zeros(length, np.int32), np.zeros(length, np.int8), sampling=sampling)


class Engine:
    """Generates "ok" for each request after `delay_s`; a request named bad* fails its whole call."""

    def __init__(self, delay_s: float = 0.03, fatal: bool = False) -> None:
        self.delay_s, self.fatal = delay_s, fatal
        self.calls: list[list[str]] = []

    def generate(self, requests, watches=None):
        self.calls.append([r.id for r in requests])
        time.sleep(self.delay_s)
        if self.fatal:
            import torch

            raise torch.OutOfMemoryError(OOM)
        if any(r.id.startswith("bad") for r in requests):
            raise InvalidRequest("bad request", item=requests[0].id)
        return [
            GenerationResult(
                r.id,
                f"text of {r.id}",
                "stop",
                r.prompt_tokens,
                0,
                0,
                1,
                self.delay_s,
                spec_drafted=3 if len(requests) == 1 else None,
                spec_accepted=2 if len(requests) == 1 else None,
            )
            for r in requests
        ]


def test_a_lone_request_runs_at_once_and_concurrent_callers_are_merged_into_full_batches():
    engine = Engine()
    replica = Replica(engine, EngineSpec(max_batch_size=4))

    async def scenario():
        first = await replica.submit(request("lone"))
        assert first.batch_size == 1 and first.result.text == "text of lone"
        # Three callers (say three Ray Data batches) submit at once while the engine is busy with a fourth.
        busy = asyncio.ensure_future(replica.submit(request("busy")))
        await asyncio.sleep(0.005)
        callers = [replica.submit_all([request(f"c{c}-{i}") for i in range(3)]) for c in range(3)]
        return await busy, await asyncio.gather(*callers)

    busy, outcomes = asyncio.run(scenario())
    assert [[o.result.id for o in caller] for caller in outcomes] == [[f"c{c}-{i}" for i in range(3)] for c in range(3)]
    sizes = [len(call) for call in engine.calls]
    assert sizes[:2] == [1, 1] and sizes[2:] == [4, 4, 1]  # 9 waiting requests: two full batches and the rest
    mixed = {name.split("-")[0] for name in engine.calls[2]}
    assert len(mixed) >= 2  # a batch takes requests of several callers
    stats = replica.stats()
    assert (stats.batches, stats.requests, stats.batched_requests) == (5, 11, 11)
    assert stats.mean_batch_size == pytest.approx(11 / 5)
    assert 0.5 < stats.busy_fraction <= 1.0  # the engine was generating for most of the replica's span


def test_batches_group_similar_prompt_lengths_and_never_mix_sampling_settings():
    engine = Engine()
    replica = Replica(engine, EngineSpec(max_batch_size=3))
    other = SamplingParams(max_new_tokens=5)

    async def scenario():
        busy = asyncio.ensure_future(replica.submit(request("busy")))
        await asyncio.sleep(0.005)
        lengths = {"a": 10, "b": 200, "c": 12, "d": 190, "e": 11, "f": 210}
        waiting = [replica.submit(request(name, length)) for name, length in lengths.items()]
        waiting.append(replica.submit(request("g", 10, other)))
        await asyncio.gather(busy, *waiting)

    asyncio.run(scenario())
    assert [sorted(call) for call in engine.calls[1:]] == [["a", "c", "e"], ["b", "d", "f"], ["g"]]


def test_the_scheduler_can_hold_an_idle_engine_for_stragglers():
    engine = Engine(delay_s=0)
    replica = Replica(engine, EngineSpec(max_batch_size=8), max_wait_s=0.2)

    async def scenario():
        async def later(i):
            await asyncio.sleep(0.02 * i)
            return await replica.submit(request(str(i)))

        return await asyncio.gather(*(later(i) for i in range(4)))

    replies = asyncio.run(scenario())
    assert [len(c) for c in engine.calls] == [4] and all(r.batch_size == 4 for r in replies)


def test_the_queue_is_bounded_and_callers_wait_for_room():
    engine = Engine()
    replica = Replica(engine, EngineSpec(max_batch_size=2), max_queued=3)
    depths: list[int] = []

    async def watch():
        while True:
            depths.append(replica.depth)
            await asyncio.sleep(0.002)

    async def scenario():
        watcher = asyncio.ensure_future(watch())
        outcomes = await replica.submit_all([request(str(i)) for i in range(12)])
        watcher.cancel()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [o.result.id for o in outcomes] == [str(i) for i in range(12)]
    assert max(depths) == 3
    assert sorted(name for call in engine.calls for name in call) == sorted(str(i) for i in range(12))


def test_a_bad_request_fails_alone_and_the_rest_of_its_batch_succeeds():
    engine = Engine()
    replica = Replica(engine, EngineSpec(max_batch_size=8))

    async def scenario():
        busy = asyncio.ensure_future(replica.submit(request("busy")))
        await asyncio.sleep(0.005)
        return await busy, await replica.submit_all([request(n) for n in ("a", "bad", "b")])

    _, (a, bad, b) = asyncio.run(scenario())
    assert a.result.text == "text of a" and b.result.text == "text of b"
    assert isinstance(bad, InvalidRequest) and "bad request" in str(bad)
    assert [len(c) for c in engine.calls] == [1, 3, 1, 1, 1]  # the failed batch, then one by one


def test_a_fatal_error_fails_no_request_calls_on_fatal_and_leaves_the_replica_unhealthy():
    engine = Engine(fatal=True)
    seen: list[BaseException] = []
    replica = Replica(engine, EngineSpec(max_batch_size=4), on_fatal=seen.append)

    async def scenario():
        with pytest.raises(FatalEngineError, match="CUDA out of memory"):
            await replica.submit_all([request(str(i)) for i in range(6)])
        with pytest.raises(FatalEngineError, match="being replaced"):  # refused at once from now on
            await replica.submit(request("later"))

    asyncio.run(scenario())
    assert len(seen) == 1 and type(seen[0]).__name__ == "OutOfMemoryError"
    assert len(engine.calls) == 1  # not retried one by one: no request is to blame
    assert not replica.healthy


class AsyncEngine:
    """Like vLLM online: takes each request on its own, many at once; reports engine-wide speculation counts."""

    def __init__(self) -> None:
        self.running = self.most = 0

    async def agenerate(self, request):
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0.02)
        self.running -= 1
        return GenerationResult(request.id, "ok", "stop", 3, 0, 0, 1, 0.02)

    def speculation(self):
        return (80, 50)


def test_vllm_requests_go_straight_to_the_engine_as_they_arrive():
    engine = AsyncEngine()
    replica = Replica(engine, EngineSpec(kind="vllm", max_batch_size=2))
    outcomes = asyncio.run(replica.submit_all([request(str(i)) for i in range(10)]))
    assert [o.result.id for o in outcomes] == [str(i) for i in range(10)]
    assert engine.most == 10  # no batching cap of ours in front of vLLM's scheduler
    stats = replica.stats()
    assert stats.mean_batch_size == pytest.approx(5.5)  # 1, 2, ... 10 requests in the engine at each submission
    assert (stats.spec_drafted, stats.spec_accepted) == (80, 50)


def test_statistics_aggregate_over_replicas():
    one = {
        "replica": "a",
        "busy_s": 3.0,
        "span_s": 4.0,
        "batches": 2,
        "batched_requests": 10,
        "requests": 10,
        "spec_drafted": 0,
        "spec_accepted": 0,
    }
    two = {**one, "replica": "b", "busy_s": 1.0, "batches": 6, "batched_requests": 6, "requests": 6}
    summary = aggregate([one, two])
    assert summary["busy_fraction"] == pytest.approx(0.5) and summary["mean_batch_size"] == pytest.approx(2.0)
    assert summary["replicas"] == 2 and summary["requests"] == 16
    assert aggregate([])["busy_fraction"] is None


def test_speculative_accepts_true_and_false_as_aliases():
    assert EngineSpec().speculative == "auto" and EngineSpec().speculates
    assert EngineSpec(speculative=True).speculative == "on"
    assert EngineSpec(speculative=False).speculative == "off" and not EngineSpec(speculative=False).speculates
    with pytest.raises(ValueError):
        EngineSpec(speculative="sometimes")
