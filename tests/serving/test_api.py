"""The HTTP layer and serving logic without Ray: the router over the real model deployment class (tiny model),
called in-process through a stand-in for the Serve handle."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient
from openai_schema import async_response_hook, check, response_hook
from serving_helpers import InProcessHandle, data_url, loaded, png

from serving.auth import Authenticator
from serving.metrics import Metrics
from serving.model_client import ServeModelBackend
from serving.model_server import ModelServer
from serving.router import build_api
from serving.spec import build_spec

SPEC = {
    "engine": {"speculative": False, "max_batch_size": 4},
    "media": {"max_pixels": 1_000_000},
    "limits": {"max_output_tokens": 32, "max_body_bytes": 4 * 1024 * 1024, "max_images_per_request": 2},
    "batching": {"max_batch_size": 4},
    "resources": {"model": {"num_cpus": 1}},
}


@pytest.fixture(scope="module")
def spec(tiny_dir):
    return build_spec(SPEC)


@pytest.fixture(scope="module")
def client(spec, tokenizer):
    server = loaded(ModelServer(spec.model_dump(mode="json")))
    metrics = Metrics()
    backend = ServeModelBackend(InProcessHandle(server), metrics, retry_after_s=1, timeout_s=60)
    api = build_api(spec, backend, tokenizer, authenticator=Authenticator([]), metrics=metrics)
    with TestClient(api) as test_client:
        test_client.event_hooks = {"response": [response_hook]}  # every answer against OpenAI's schema
        yield test_client


def chat(client, content, **extra):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def test_text_image_and_audio_parts_in_one_message(client, sample_png, short_wav):
    content = [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": data_url(sample_png)}},
        {"type": "image_url", "image_url": {"url": data_url(png(96, 96, seed=5)), "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(short_wav).decode(), "format": "wav"}},
    ]
    plain = chat(client, "Compare these.").json()
    answer = chat(client, content)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    # An image at the 280-token budget, one at the 70-token budget ("low" detail) and 33 audio frames (1.3 s).
    assert usage["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 70 + 33
    assert usage["completion_tokens"] <= 6


def test_greedy_answers_are_reproducible_and_concurrent_requests_all_answer(client):
    single = chat(client, "Say something.").json()["choices"][0]["message"]["content"]
    assert chat(client, "Say something.").json()["choices"][0]["message"]["content"] == single

    async def many():
        import httpx

        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", event_hooks={"response": [async_response_hook]}
        ) as http:
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "Say something."}],
                "max_tokens": 6,
                "temperature": 0,
            }
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(4)))

    # Concurrent requests share engine batches whose size depends on timing; on CPU a random-weight model's greedy
    # ties can flip between batch sizes, so only the answers' presence is checked here (the engine's own batch
    # invariance is tested in tests/engines on fixed batches).
    for response in client.portal.call(many):
        assert response.status_code == 200
        assert isinstance(response.json()["choices"][0]["message"]["content"], str)


def test_streaming_with_usage(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def _streamed(client, content: str, max_tokens: int, **extra) -> list[dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize(
    ("content", "max_tokens", "extra"),
    [
        ("Hello", 16, {}),
        ("Tell me a story.", 32, {}),
        ("Hi", 3, {}),
        ("Tell me a story.", 24, {"presence_penalty": 1.5, "frequency_penalty": 0.5, "logit_bias": {"5": -100}}),
    ],
)
def test_streamed_usage_and_finish_match_the_same_request_unstreamed(client, content, max_tokens, extra):
    whole = chat(client, content, max_tokens=max_tokens, **extra).json()
    chunks = _streamed(client, content, max_tokens, **extra)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"] <= max_tokens
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert finishes == [whole["choices"][0]["finish_reason"]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed.strip() == whole["choices"][0]["message"]["content"]  # penalties apply to both alike
    if extra:  # and they matter here: without them the answer differs
        plain = chat(client, content, max_tokens=max_tokens).json()["choices"][0]["message"]["content"]
        assert plain != streamed.strip()


def test_stop_strings_cut_the_answer(client):
    full = chat(client, "Say something.", max_tokens=12).json()["choices"][0]["message"]["content"]
    if len(full) < 4:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = full[2:4]
    cut = chat(client, "Say something.", max_tokens=12, stop=[stop]).json()["choices"][0]
    assert stop not in cut["message"]["content"] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 33},
            400,
            "max_tokens_too_large",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "unsupported",
        ),
        ({"model": "tiny", "messages": [{"role": "system", "content": "x"}]}, 400, None),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "invalid_value"),
        ({"model": "tiny", "messages": []}, 400, "invalid_value"),
    ],
)
def test_refusals(client, body, status, code):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)


def test_too_many_images_and_too_many_pixels(client, sample_png):
    image = {"type": "image_url", "image_url": {"url": data_url(sample_png)}}
    assert chat(client, [image] * 3).json()["error"]["code"] == "too_many_images"
    big = chat(client, [{"type": "image_url", "image_url": {"url": data_url(png(1200, 1000, noise=False))}}])
    assert big.status_code == 413 and big.json()["error"]["param"] == "messages.0.content.0"


def test_chat_audio_over_30_s_is_refused(client, long_wav):
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(long_wav).decode(), "format": "wav"}}
    response = chat(client, [part])
    assert response.status_code == 413, response.text


def test_context_length(client, spec):
    response = chat(client, "word " * (spec.engine.max_model_len + 10))
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_chunked_body_over_the_limit_gets_413(client):
    def body():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(5):
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_multipart_over_the_limit_gets_413_not_a_parse_error(client):
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(5):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--b--\r\n"

    response = client.post(
        "/v1/audio/transcriptions", content=body(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413


def test_transcription_formats(client, short_wav):
    files = {"file": ("a.wav", short_wav, "audio/wav")}
    as_json = client.post("/v1/audio/transcriptions", files=files, data={"model": "tiny", "language": "English"})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["usage"]["seconds"] == pytest.approx(1.3, abs=0.01)
    as_text = client.post("/v1/audio/transcriptions", files=files, data={"model": "tiny", "response_format": "text"})
    assert as_text.headers["content-type"].startswith("text/plain")
    verbose = client.post(
        "/v1/audio/translations", files=files, data={"model": "tiny", "response_format": "verbose_json"}
    ).json()
    assert verbose["task"] == "translate" and verbose["language"] == "english" and len(verbose["segments"]) == 1


def test_speech_refusals(client, sample_png):
    empty = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"", "audio/wav")}, data={"model": "tiny"})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    image = client.post("/v1/audio/transcriptions", files={"file": ("a.png", sample_png)}, data={"model": "tiny"})
    assert image.status_code == 400
    bad_format = client.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data={"model": "tiny", "response_format": "srt"}
    )
    assert bad_format.status_code == 400 and bad_format.json()["error"]["param"] == "response_format"
    no_file = client.post("/v1/audio/transcriptions", data={"model": "tiny"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"


def test_unknown_route_is_an_openai_error(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_readiness_fails_while_the_model_does_not_answer(spec, tokenizer):
    class Loading:
        async def ready(self, timeout_s):
            await asyncio.sleep(timeout_s)
            return None

    api = build_api(spec, Loading(), tokenizer, authenticator=Authenticator([]), metrics=Metrics())
    with TestClient(api) as test_client:
        assert test_client.get("/health").status_code == 200
        response = test_client.get("/health/ready")
        assert response.status_code == 503 and response.headers["retry-after"] == "1"


def test_answers_carry_the_fields_openai_requires(client):
    answer = chat(client, "Hello").json()
    choice = answer["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    check("CreateChatCompletionResponse", answer)
    # The schema copy is strict enough to catch the fields this endpoint used to leave out.
    del choice["logprobs"]
    with pytest.raises(AssertionError, match="logprobs"):
        check("CreateChatCompletionResponse", answer)


def test_every_stream_chunk_has_a_finish_reason_null_until_the_last(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
        },
    ) as response:
        chunks = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert all(r is None for r in reasons[:-1]) and reasons[-1] in ("stop", "length")
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": None},
        {"n": None},
        {"seed": -1},
        {"seed": -(2**63)},
        {"top_p": 0},
        {"n": 1, "stream": False, "top_p": 0.0, "seed": 2**63 - 1},
    ],
)
def test_openai_valid_requests_are_accepted(client, extra):
    response = chat(client, "Say something.", **extra)
    assert response.status_code == 200, response.text


def test_top_p_0_is_greedy(client):
    greedy = chat(client, "Say something.", max_tokens=8)
    sampled = chat(client, "Say something.", max_tokens=8, temperature=1.0, top_p=0, seed=7)
    assert sampled.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


def _service(spec, tokenizer):
    from pipelines.chat.protocol import ChatCompletionRequest
    from serving.router import chat_preparer

    service = chat_preparer(spec, tokenizer)

    def prepare(messages, **extra):
        body = ChatCompletionRequest.model_validate({"model": "tiny", "messages": messages, **extra})
        return asyncio.run(service.prepare(body))

    return prepare


def test_a_conversation_ending_with_the_assistant_is_continued(client, spec, tokenizer):
    prepare = _service(spec, tokenizer)
    messages = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "The quick"}]
    prompt = tokenizer.decode(prepare(messages).prompt_token_ids.tolist())
    assert prompt.endswith("<|turn>model\nThe quick")  # the model's turn is left open, no new turn begins
    response = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    empty = prepare([messages[0], {"role": "assistant", "content": None}]).prompt_token_ids.tolist()
    assert tokenizer.decode(empty).endswith("<|turn>model\n")


def test_default_max_tokens_is_what_the_context_leaves(client, spec, tokenizer):
    prepare = _service(spec, tokenizer)
    length = {k: prepare([{"role": "user", "content": "word " * k}]).prompt_tokens for k in (0, 100)}
    per_word = (length[100] - length[0]) / 100
    words = int((spec.engine.max_model_len - length[0] - 10) / per_word)
    request = prepare([{"role": "user", "content": "word " * words}])
    room = spec.engine.max_model_len - request.prompt_tokens
    assert 0 < room < spec.limits.max_output_tokens and request.sampling.max_new_tokens == room
    # A request that sets nothing gets the endpoint's cap when the context leaves more.
    assert prepare([{"role": "user", "content": "Hi"}]).sampling.max_new_tokens == spec.limits.max_output_tokens
    response = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "word " * words}], "temperature": 0},
    )
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= room


# ---- HTTP details: 405, OpenAPI document, error codes, client cancellations ----


def test_wrong_method_is_405_with_allow(client):
    response = client.get("/v1/chat/completions")
    assert response.status_code == 405 and "POST" in response.headers["allow"]
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_openapi_describes_the_chat_body_and_no_422(client):
    document = client.get("/openapi.json").json()
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert {"model", "messages", "frequency_penalty"} <= set(
        document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    )
    responses = [r for operations in document["paths"].values() for op in operations.values() for r in op["responses"]]
    assert "422" not in responses and "HTTPValidationError" not in document["components"]["schemas"]


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "user", "content": [{"type": "video", "video": "x"}]}, "messages.0.content.0"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]},
            "messages.0.content.0.image_url.url",
        ),
        ({"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}, "messages.0.content"),
    ],
)
def test_400s_name_the_field_without_pydantic_internals(client, message, param):
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [message]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] and error["param"] == param
    assert not any(word in error["message"] for word in ("[", "tagged-union", "Value error", "function-"))


def test_client_cancellations_count_as_499():
    from serving.middleware import RequestMetrics

    metrics = Metrics()

    async def hangs(scope, receive, send):
        await asyncio.sleep(60)

    async def leaves_a_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})

    async def run():
        async def send(message):
            pass

        async def receive():
            return {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        task = asyncio.ensure_future(RequestMetrics(hangs, metrics)(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()  # what Serve does when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task
        await RequestMetrics(leaves_a_stream, metrics)(scope, receive, send)

    asyncio.run(run())
    text = metrics.render().decode()
    assert 'status="499"' in text and 'status="500"' not in text
    assert [line for line in text.splitlines() if 'status="499"' in line and "requests_total" in line][0].endswith(
        " 2.0"
    )


# ---- sampling options that change the answer ----


def test_logit_bias_bans_and_forces_tokens(client, tokenizer):
    greedy = chat(client, "Say something.", max_tokens=6).json()["choices"][0]["message"]["content"]
    (forced_id,) = tokenizer(" cat", add_special_tokens=False)["input_ids"][-1:]
    forced = chat(client, "Say something.", max_tokens=4, logit_bias={str(forced_id): 100}).json()
    assert forced["choices"][0]["message"]["content"] == tokenizer.decode([forced_id] * 4).strip()
    assert forced["usage"]["completion_tokens"] == 4
    first = tokenizer(greedy, add_special_tokens=False)["input_ids"][0]
    banned = chat(client, "Say something.", max_tokens=6, logit_bias={str(first): -100}).json()
    assert tokenizer(banned["choices"][0]["message"]["content"], add_special_tokens=False)["input_ids"][:1] != [first]


def test_count_penalties_subtract_openais_amounts():
    import torch

    from pipelines.engines.penalties import CountPenalties

    ids = torch.tensor([[7, 7, 1, 2, 2, 3]])  # prompt [7, 7], generated [1, 2, 2, 3]
    scores = CountPenalties(2, frequency=0.5, presence=1.0)(ids, torch.zeros(1, 8))
    expected = torch.zeros(1, 8)
    expected[0, 1] = expected[0, 3] = -1.5
    expected[0, 2] = -2.0
    assert torch.equal(scores, expected)  # the prompt's 7 is not penalised, as in OpenAI's and vLLM's rule


def test_frequency_penalty_changes_a_repetitive_greedy_answer(client, tokenizer):
    plain = chat(client, "Say something.", max_tokens=16).json()["choices"][0]["message"]["content"]
    ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
    if len(set(ids)) == len(ids):
        pytest.skip("the tiny model's greedy answer repeats no token")
    penalised = chat(client, "Say something.", max_tokens=16, frequency_penalty=2.0, presence_penalty=2.0).json()
    assert penalised["choices"][0]["message"]["content"] != plain


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"cat": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ],
)
def test_options_it_cannot_honour_are_refused_by_name(client, extra, param):
    response = chat(client, "Hi", **extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    "extra",
    [
        {"modalities": ["text"]},
        {"function_call": "none"},
        {"tools": []},
        {"metadata": {"a": "b"}},
        {"parallel_tool_calls": True},
        {"service_tier": "auto"},
        {"reasoning_effort": "none"},
        {"store": False},
        {"ignore_eos": False},
        {"frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"5": -3}},
    ],
)
def test_neutral_values_are_accepted(client, extra):
    response = chat(client, "Hi", **extra)
    assert response.status_code == 200, response.text


def test_transcription_options_it_cannot_honour_are_refused(client, short_wav):
    files = {"file": ("a.wav", short_wav, "audio/wav")}
    for data, param in (
        ({"stream": "true"}, "stream"),
        ({"timestamp_granularities[]": "word"}, "timestamp_granularities"),
    ):
        response = client.post("/v1/audio/transcriptions", files=files, data={"model": "tiny", **data})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    fine = client.post(
        "/v1/audio/transcriptions",
        files=files,
        data={
            "model": "tiny",
            "stream": "false",
            "timestamp_granularities[]": "segment",
            "response_format": "verbose_json",
        },
    )
    assert fine.status_code == 200, fine.text


def test_a_model_that_cannot_load_says_why_in_readiness_and_answers(tiny_dir, tokenizer, tmp_path, caplog):
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, broken, ignore=shutil.ignore_patterns("*.safetensors", "assistant"))
    spec = build_spec({**SPEC, "model": {"name": str(broken)}})
    with caplog.at_level("ERROR", logger="serving.model_server"):
        server = loaded(ModelServer(spec.model_dump(mode="json")))  # the replica stays up to report the cause
    assert any("could not load" in r.getMessage() for r in caplog.records)
    server.check_health()  # passes: Serve keeps the replica, which says why
    assert server.record_routing_stats() == {"loading": False, "failed": True}
    metrics = Metrics()
    backend = ServeModelBackend(InProcessHandle(server), metrics, retry_after_s=1, timeout_s=60)
    api = build_api(spec, backend, tokenizer, authenticator=Authenticator([]), metrics=metrics)
    with TestClient(api) as test_client:
        ready = test_client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed" and "retry-after" not in ready.headers
        error = ready.json()["error"]
        assert error["code"] == "model_not_loaded" and "could not load" in error["message"]
        assert str(broken) in error["message"]
        answer = chat(test_client, "Hello", model=str(broken))
        assert answer.status_code == 503 and "could not load" in answer.json()["error"]["message"]
        assert answer.json()["error"]["code"] == "model_not_loaded" and "retry-after" not in answer.headers


def test_while_the_model_loads_readiness_and_requests_answer_503_at_once(spec, tokenizer):
    """The replica is up before its weights load (in a background thread): readiness and requests answer 503
    `model_loading` with Retry-After at once, Serve's health check passes; once loaded, everything serves."""
    import threading
    import time

    from pipelines.replica import open_engine

    release = threading.Event()

    def slow_load():  # the real load, held back until the test has seen the loading answers
        assert release.wait(120)
        return open_engine(spec.model, spec.engine)

    server = ModelServer(spec.model_dump(mode="json"), loader=slow_load)
    metrics = Metrics()
    backend = ServeModelBackend(InProcessHandle(server), metrics, retry_after_s=1, timeout_s=60)
    api = build_api(spec, backend, tokenizer, authenticator=Authenticator([]), metrics=metrics)
    streamed = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with TestClient(api) as test_client:
        test_client.event_hooks = {"response": [response_hook]}
        assert server.loading
        started = time.perf_counter()
        ready = test_client.get("/health/ready")
        assert time.perf_counter() - started < 0.5
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        body = ready.json()
        assert body["status"] == "loading" and body["model"] == "tiny" and body["elapsed_s"] >= 0
        assert body["error"]["code"] == "model_loading" and "loading" in body["error"]["message"]
        check("ErrorResponse", {"error": body["error"]})
        server.check_health()  # passes while loading: Serve must not replace the replica
        assert server.record_routing_stats() == {"loading": True, "failed": False}  # serving/routing.py

        started = time.perf_counter()
        answer = chat(test_client, "Hello")
        assert time.perf_counter() - started < 0.5
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "model_loading"
        stream = test_client.post("/v1/chat/completions", json=streamed)
        assert stream.status_code == 503 and stream.headers["retry-after"] == "1"
        assert stream.json()["error"]["code"] == "model_loading"
        assert "gemma_unified_model_ready 0.0" in test_client.get("/metrics").text

        release.set()
        loaded(server)
        ready = test_client.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["load_s"] > 0
        server.check_health()
        assert server.record_routing_stats() == {"loading": False, "failed": False}
        first = chat(test_client, "Hello")  # the first request after the load
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["completion_tokens"] >= 1
        with test_client.stream("POST", "/v1/chat/completions", json=streamed) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2
        assert "gemma_unified_model_ready 1.0" in test_client.get("/metrics").text
