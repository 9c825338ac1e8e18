"""The vLLM engine around a stand-in for vLLM (which needs a GPU): outputs to results, retries, refusals."""

from __future__ import annotations

import asyncio
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from pipelines.config import EngineSpec
from pipelines.engines.base import SamplingParams
from pipelines.engines.vllm_inputs import VLLM_EXTRA, stop_token_ids
from pipelines.errors import GenerationFailed, InvalidRequest, ModelSourceError
from pipelines.prepare import prepare_item
from pipelines.prompts import Task, TaskOptions


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_engine_without_vllm_names_the_extra(monkeypatch, tiny_model):
    from pipelines.engines.vllm import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ModelSourceError) as caught:
        VLLMEngine(tiny_model, EngineSpec(kind="vllm"))
    assert str(caught.value) == VLLM_EXTRA
    assert "gemma-unified[vllm]" in VLLM_EXTRA


def _output(ids, finish, stop_reason=None, finished=True):
    completion = SimpleNamespace(token_ids=list(ids), finish_reason=finish, stop_reason=stop_reason)
    return SimpleNamespace(prompt_token_ids=None, outputs=[completion], finished=finished)


class _FakeLLM:
    """Stands in for vllm.LLM: echoes a fixed completion and counts speculative tokens like vLLM's metrics.
    While `errors_left` > 0 each prompt ends with vLLM's retryable finish_reason "error" instead."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.drafted = self.accepted = 0
        self.completion: tuple[list[int], str, object] = ([], "stop", None)
        self.errors_left = 0
        self.calls: list[int] = []  # prompts per generate() call

    def generate(self, prompts, params, use_tqdm=True):
        ids, finish, stop_reason = self.completion
        self.drafted, self.accepted = self.drafted + 8 * len(prompts), self.accepted + 5 * len(prompts)
        self.seen = list(zip(prompts, params))
        self.calls.append(len(prompts))
        outputs = []
        for _ in prompts:
            failed, self.errors_left = self.errors_left > 0, max(0, self.errors_left - 1)
            outputs.append(_output([ids[0]] if failed else ids, "error" if failed else finish, stop_reason))
        return outputs

    def get_metrics(self):
        return [
            SimpleNamespace(name="vllm:spec_decode_num_draft_tokens", value=self.drafted),
            SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=self.accepted),
            SimpleNamespace(name="vllm:spec_decode_num_drafts", value=1),
        ]


class _FakeAsyncLLM:
    """Stands in for vllm's AsyncLLM: streams the completion one token per output (delta mode) or cumulatively;
    the first `errors_left` requests end with finish_reason "error" after their first token."""

    instance: _FakeAsyncLLM | None = None

    def __init__(self) -> None:
        self.completion: list[int] = []
        self.errors_left = 0
        self.requests: list[str] = []
        self.aborted: list[str] = []
        self.step_s = 0.0
        _FakeAsyncLLM.instance = self

    @classmethod
    def from_engine_args(cls, args):
        return cls()

    async def generate(self, prompt, params, request_id):
        self.requests.append(request_id)
        failed, self.errors_left = self.errors_left > 0, max(0, self.errors_left - 1)
        delta = params.get("output_kind") is not None
        ids = self.completion[:1] if failed else self.completion
        try:
            for index in range(len(ids)):
                await asyncio.sleep(self.step_s)
                last = index == len(ids) - 1
                token_ids = ids[index : index + 1] if delta else ids[: index + 1]
                finish = ("error" if failed else "stop") if last else None
                yield _output(token_ids, finish, finished=last)
        except (asyncio.CancelledError, GeneratorExit):  # where vLLM's AsyncLLM aborts the request
            self.aborted.append(request_id)
            raise

    def shutdown(self) -> None:
        pass


def _fake_vllm(monkeypatch) -> None:
    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM
    fake.SamplingParams = lambda **kwargs: kwargs
    modules = {"vllm": fake}
    for name in (
        "vllm.engine",
        "vllm.engine.arg_utils",
        "vllm.v1",
        "vllm.v1.engine",
        "vllm.v1.engine.async_llm",
        "vllm.sampling_params",
    ):
        modules[name] = types.ModuleType(name)
    modules["vllm.engine.arg_utils"].AsyncEngineArgs = lambda **kwargs: kwargs
    modules["vllm.v1.engine.async_llm"].AsyncLLM = _FakeAsyncLLM
    modules["vllm.sampling_params"].RequestOutputKind = SimpleNamespace(DELTA="delta")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture()
def fake_engine(monkeypatch, tiny_model):
    from pipelines.engines.vllm import VLLMEngine

    _fake_vllm(monkeypatch)
    return VLLMEngine(tiny_model, EngineSpec(kind="vllm", max_model_len=4096))


@pytest.fixture()
def fake_online_engine(monkeypatch, tiny_model):
    from pipelines.engines.vllm import VLLMEngine

    _fake_vllm(monkeypatch)
    engine = VLLMEngine(tiny_model, EngineSpec(kind="vllm", max_model_len=4096), online=True)
    yield engine
    engine.close()


def _text_request(tokenizer, item_id: str = "t"):
    (request,) = prepare_item(
        b"A note.",
        item_id=item_id,
        name="t.txt",
        tokenizer=tokenizer,
        options=TaskOptions(task=Task.prompt, prompt="Hi"),
    ).requests
    return request


def test_engine_maps_vllm_outputs_to_results(fake_engine, tiny_model, png_bytes):
    tokenizer = fake_engine.tokenizer
    assert fake_engine._llm.kwargs["speculative_config"] == {
        "method": "mtp",
        "model": str(tiny_model.assistant_path),
        "num_speculative_tokens": 3,
    }
    (request,) = prepare_item(
        png_bytes, item_id="img", name="i.png", tokenizer=tokenizer, options=TaskOptions(task=Task.caption)
    ).requests
    answer = _ids(tokenizer, "<|channel>thought\nhmm<channel|>A cat sits on a red mat.")
    end_of_turn = tokenizer.convert_tokens_to_ids("<turn|>")
    fake_engine._llm.completion = (answer + [end_of_turn], "stop", None)
    (result,) = fake_engine.generate([request])
    ((prompt, params),) = fake_engine._llm.seen
    assert prompt["prompt_token_ids"].count(tokenizer.image_token_id) == 1
    assert params["stop_token_ids"] == stop_token_ids(tokenizer) and params["temperature"] == 0.0
    assert result.text == "A cat sits on a red mat." and result.finish_reason == "stop"
    assert result.output_token_ids == answer and result.output_tokens == len(answer) + 1
    assert (result.prompt_tokens, result.image_tokens, result.audio_tokens) == (
        request.prompt_tokens,
        request.image_tokens,
        0,
    )
    assert (result.spec_drafted, result.spec_accepted) == (8, 5)  # a batch of one owns the counter difference
    assert fake_engine.speculation() == (8, 5)

    fake_engine._llm.completion = (answer, "length", None)
    results = fake_engine.generate([request, request])
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert results[0].output_token_ids == answer and results[0].spec_drafted is None
    assert fake_engine.speculation() == (24, 15)


def test_engine_refuses_requests_over_max_model_len(fake_engine, tokenizer):
    (request,) = prepare_item(
        b"A note.",
        item_id="long",
        name="t.txt",
        tokenizer=tokenizer,
        options=TaskOptions(task=Task.prompt, prompt="Hi"),
        sampling=SamplingParams(max_new_tokens=4090),
    ).requests
    with pytest.raises(InvalidRequest, match="max_model_len") as caught:
        fake_engine.generate([request])
    assert caught.value.item == "long"


def test_offline_engine_streams_the_whole_text_once(fake_engine, tokenizer):
    import asyncio

    (request,) = prepare_item(
        b"A note.", item_id="s", name="t.txt", tokenizer=tokenizer, options=TaskOptions(task=Task.prompt, prompt="Hi")
    ).requests
    fake_engine._llm.completion = (_ids(tokenizer, "The quick brown fox"), "length", None)

    async def collect():
        return [chunk async for chunk in fake_engine.stream(request)]

    from pipelines.engines.base import StreamEnd

    completion_ids = _ids(tokenizer, "The quick brown fox")
    assert asyncio.run(collect()) == ["The quick brown fox", StreamEnd("length", len(completion_ids))]
    assert fake_engine.health()
    fake_engine.close()
    assert not fake_engine.health()


def _vllm_and_cuda() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _vllm_and_cuda(), reason="needs vllm and a CUDA GPU")
def test_vllm_engine_runs_the_tiny_model(tmp_path):
    """Smoke test on the random tiny checkpoint: the output is noise, the plumbing is what is checked."""
    from pipelines.engines.tiny_checkpoint import build_tiny_model
    from pipelines.engines.vllm import VLLMEngine
    from pipelines.model_sources import ResolvedModel

    directory = build_tiny_model(tmp_path / "tiny")
    model = ResolvedModel(name="tiny", path=directory, assistant_path=None)
    engine = VLLMEngine(
        model, EngineSpec(kind="vllm", speculative=False, max_model_len=1024, gpu_memory_utilization=0.3)
    )
    try:
        (request,) = prepare_item(
            b"A note.",
            item_id="t",
            name="t.txt",
            tokenizer=engine.tokenizer,
            options=TaskOptions(task=Task.prompt, prompt="Hi"),
            sampling=SamplingParams(max_new_tokens=8),
        ).requests
        (result,) = engine.generate([request])
        assert result.id == "t" and result.finish_reason in ("stop", "length")
        assert 0 < result.output_tokens <= 8 and result.prompt_tokens == request.prompt_tokens
        assert engine.health()
    finally:
        engine.close()


# ---- vLLM's retryable "error" finish ----


def test_an_error_finish_is_run_once_more_then_returned_as_text(fake_engine, tokenizer):
    answer = _ids(tokenizer, "A red bicycle leans on a wall.")
    fake_engine._llm.completion = (answer, "stop", None)
    fake_engine._llm.errors_left = 1  # the first of the three prompts fails once
    results = fake_engine.generate([_text_request(tokenizer, f"r{i}") for i in range(3)])
    assert fake_engine._llm.calls == [3, 1]  # the batch, then the failed request alone
    assert [r.text for r in results] == ["A red bicycle leans on a wall."] * 3
    assert all(r.finish_reason == "stop" for r in results)


def test_an_error_finish_twice_is_a_generation_failure_not_text(fake_engine, tokenizer):
    fake_engine._llm.completion = (_ids(tokenizer, "partial words"), "stop", None)
    fake_engine._llm.errors_left = 2
    with pytest.raises(GenerationFailed, match="finish_reason 'error'") as caught:
        fake_engine.generate([_text_request(tokenizer, "bad")])
    assert (caught.value.item, caught.value.stage) == ("bad", "generate")
    assert fake_engine._llm.calls == [1, 1]


def test_a_generation_failure_is_a_server_error_online():
    from serving.model_server import model_error

    error = model_error(GenerationFailed("vLLM failed this request twice", item="chat-1", stage="generate"))
    assert (error.status, error.code) == (502, "model_error")
    assert "vLLM failed this request twice" in error.message


def test_online_engine_retries_an_error_finish_once(fake_online_engine, tokenizer):
    fake = _FakeAsyncLLM.instance
    fake.completion = _ids(tokenizer, "Waves break on the shore.")
    fake.errors_left = 1
    (result,) = fake_online_engine.generate([_text_request(tokenizer)])
    assert result.text == "Waves break on the shore." and len(fake.requests) == 2
    fake.errors_left = 2
    with pytest.raises(GenerationFailed):
        fake_online_engine.generate([_text_request(tokenizer)])
    assert len(fake.requests) == 4


def test_online_stream_retries_an_error_finish_before_any_text(fake_online_engine, tokenizer):
    fake = _FakeAsyncLLM.instance
    fake.completion = _ids(tokenizer, "Snow covers the quiet village.")

    async def collect():
        return [delta async for delta in fake_online_engine.stream(_text_request(tokenizer))]

    from pipelines.engines.base import StreamEnd

    fake.errors_left = 1
    *deltas, end = asyncio.run(collect())
    assert "".join(deltas) == "Snow covers the quiet village."
    assert end == StreamEnd("stop", len(fake.completion))  # the engine's own count
    assert len(fake.requests) == 2
    fake.errors_left = 2
    with pytest.raises(GenerationFailed):
        asyncio.run(collect())
    assert len(fake.requests) == 4


def test_a_caller_that_gives_up_aborts_its_request_in_vllm(fake_online_engine, tokenizer):
    """A client timeout or a cancelled batch member: the caller's task is cancelled, and vLLM aborts that request."""
    import time

    fake = _FakeAsyncLLM.instance
    fake.completion = _ids(tokenizer, "A long answer that takes its time. " * 10)
    fake.step_s = 0.02

    async def give_up():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fake_online_engine.agenerate(_text_request(tokenizer)), timeout=0.2)

    asyncio.run(give_up())
    deadline = time.monotonic() + 5  # the engine's loop runs in its own thread
    while not fake.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.aborted == fake.requests and len(fake.requests) == 1


def test_tiny_checkpoint_carries_vllms_image_budget_field(tiny_model):
    import json

    from pipelines.media.image import DEFAULT_SOFT_TOKENS

    config = json.loads((tiny_model.path / "config.json").read_text())
    assert config["vision_config"]["num_soft_tokens"] == DEFAULT_SOFT_TOKENS == 280


def test_the_replica_runtime_hands_vllm_each_request_as_it_arrives(monkeypatch, tiny_model, tokenizer):
    """Batch jobs and the endpoint open vLLM online; the runtime sends every request straight into it, concurrently."""
    from pipelines.config import ModelSpec
    from pipelines.replica import Replica, open_engine

    _fake_vllm(monkeypatch)
    monkeypatch.setattr("pipelines.model_sources.resolve", lambda spec: tiny_model)
    engine = open_engine(ModelSpec(name="tiny"), EngineSpec(kind="vllm", max_model_len=4096, max_batch_size=2))
    try:
        assert engine.online
        fake = _FakeAsyncLLM.instance
        fake.completion = _ids(tokenizer, "Fine.")
        replica = Replica(engine, engine.spec)
        requests = [_text_request(tokenizer, f"r{i}") for i in range(5)]
        outcomes = asyncio.run(replica.submit_all(requests))
        assert [o.result.text for o in outcomes] == ["Fine."] * 5
        assert sorted(r.split("-")[0] for r in fake.requests) == [f"r{i}" for i in range(5)]  # one engine request each
        stats = replica.stats()
        assert stats.requests == 5 and stats.batches == 5
    finally:
        engine.close()
