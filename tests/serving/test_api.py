"""The HTTP layer and serving logic without Ray: the router over the real model deployment class (tiny model),
called in-process through a stand-in for the Serve handle."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient

from serving.auth import Authenticator
from serving.metrics import Metrics
from serving.model_client import ServeModelBackend
from serving.model_server import ModelServer
from serving.router import build_api
from serving.spec import build_spec

from serving_helpers import InProcessHandle, data_url, png

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
    server = ModelServer(spec.model_dump(mode="json"))
    metrics = Metrics()
    backend = ServeModelBackend(InProcessHandle(server), metrics, retry_after_s=1, timeout_s=60)
    api = build_api(spec, backend, tokenizer, authenticator=Authenticator([]), metrics=metrics)
    with TestClient(api) as test_client:
        yield test_client


def chat(client, content, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, **extra}
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


def test_greedy_answers_are_reproducible_and_batched_requests_agree(client):
    single = chat(client, "Say something.").json()["choices"][0]["message"]["content"]

    async def many():
        import httpx

        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}],
                    "max_tokens": 6, "temperature": 0}
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(4)))

    for response in client.portal.call(many):
        assert response.json()["choices"][0]["message"]["content"] == single


def test_streaming_with_usage(client):
    with client.stream("POST", "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


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
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 33}, 400,
         "max_tokens_too_large"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
         "unsupported"),
        ({"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, 400, None),
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
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(5):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--b--\r\n"

    response = client.post("/v1/audio/transcriptions", content=body(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413


def test_transcription_formats(client, short_wav):
    files = {"file": ("a.wav", short_wav, "audio/wav")}
    as_json = client.post("/v1/audio/transcriptions", files=files, data={"model": "tiny", "language": "English"})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["usage"]["seconds"] == pytest.approx(1.3, abs=0.01)
    as_text = client.post("/v1/audio/transcriptions", files=files, data={"model": "tiny", "response_format": "text"})
    assert as_text.headers["content-type"].startswith("text/plain")
    verbose = client.post("/v1/audio/translations", files=files,
                          data={"model": "tiny", "response_format": "verbose_json"}).json()
    assert verbose["task"] == "translate" and verbose["language"] == "english" and len(verbose["segments"]) == 1


def test_speech_refusals(client, sample_png):
    empty = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"", "audio/wav")}, data={"model": "tiny"})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    image = client.post("/v1/audio/transcriptions", files={"file": ("a.png", sample_png)}, data={"model": "tiny"})
    assert image.status_code == 400
    bad_format = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")},
                             data={"model": "tiny", "response_format": "srt"})
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


def test_a_model_that_cannot_load_says_why_in_readiness_and_answers(tiny_dir, tokenizer, tmp_path, caplog):
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, broken, ignore=shutil.ignore_patterns("*.safetensors", "assistant"))
    spec = build_spec({**SPEC, "model": {"name": str(broken)}})
    with caplog.at_level("ERROR", logger="serving.model_server"):
        server = ModelServer(spec.model_dump(mode="json"))  # the replica stays up to report the cause
    assert any("could not load" in r.getMessage() for r in caplog.records)
    metrics = Metrics()
    backend = ServeModelBackend(InProcessHandle(server), metrics, retry_after_s=1, timeout_s=60)
    api = build_api(spec, backend, tokenizer, authenticator=Authenticator([]), metrics=metrics)
    with TestClient(api) as test_client:
        ready = test_client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "could not load" in ready.json()["error"] and str(broken) in ready.json()["error"]
        answer = chat(test_client, "Hello", model=str(broken))
        assert answer.status_code == 503 and "could not load" in answer.json()["error"]["message"]
