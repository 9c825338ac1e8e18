"""The endpoint end to end: the Serve app on a local Ray instance, called over loopback HTTP with the official
`openai` client (happy paths) and raw httpx (error cases), plus overload, a load test and autoscaling."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
import time

import httpx
import pytest
from openai_schema import async_response_hook, response_hook
from serving_helpers import data_url, png

pytestmark = pytest.mark.slow

LOAD_CLIENTS = 32
LOAD_S = 60.0
API_KEY = "test-key-123"

MAIN = {
    "app_name": "main",
    "engine": {"speculative": False, "max_batch_size": 8},
    "media": {"max_pixels": 1_000_000, "max_audio_s": 120},
    "batching": {"max_batch_size": 8},
    "limits": {
        "max_output_tokens": 32,
        "max_body_bytes": 4 * 1024 * 1024,
        "max_queued_requests": 32,
        "retry_after_s": 1,
    },
    "resources": {"ingress": {"num_cpus": 0.25}, "model": {"num_cpus": 0.25, "torch_threads": 1}},
    "autoscaling": {
        "ingress": {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 256},
        "model": {
            "min_replicas": 1,
            "max_replicas": 3,
            "initial_replicas": 1,
            "target_ongoing_requests": 4,
            "max_ongoing_requests": 16,
            "upscale_delay_s": 1,
            "downscale_delay_s": 4,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
    },
    "remote_media": {"http_allow_list": ["169.254.169.254", "127.0.0.1", "::1", "localhost"]},
}
SECURED = {
    "app_name": "secured",
    "route_prefix": "/secured",
    "model": {"name": "tiny", "assistant": "tiny"},  # the tiny drafter, opted in: the speculative path serves too
    "engine": {"speculative": True},
    "resources": {"ingress": {"num_cpus": 0.25}, "model": {"num_cpus": 0.25, "torch_threads": 1}},
    "autoscaling": {"ingress": {"max_replicas": 1}, "model": {"max_replicas": 1}},
    "limits": {"max_output_tokens": 16},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(base: str, timeout_s: float = 180.0) -> None:
    """Serve has the app running before the model replicas' weights load: wait for /health/ready."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
        while (status := http.get("/health/ready").status_code) != 200:
            assert status in (404, 503) and time.monotonic() < deadline, f"/health/ready answered {status}"
            time.sleep(0.2)


class Endpoint:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        # Every answer, stream chunks included, is checked against OpenAI's published schema.
        self.http = httpx.Client(
            base_url=self.base, timeout=120, trust_env=False, event_hooks={"response": [response_hook]}
        )

    def openai(self, prefix: str = "", api_key: str = "unused"):
        from openai import OpenAI

        http = httpx.Client(timeout=120, trust_env=False, event_hooks={"response": [response_hook]})
        return OpenAI(base_url=f"{self.base}{prefix}/v1", api_key=api_key, max_retries=0, timeout=120, http_client=http)

    def chat(self, content, headers=None, prefix="", **extra) -> httpx.Response:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "temperature": 0,
            **extra,
        }
        return self.http.post(f"{prefix}/v1/chat/completions", json=body, headers=headers)


@pytest.fixture(scope="module")
def endpoint(ray_cluster):  # the session's one Ray instance (tests/conftest.py)
    from ray import serve

    from serving.app import build_app
    from serving.spec import build_spec

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = build_spec(MAIN)
    serve.run(build_app(main), name=main.app_name, route_prefix=main.route_prefix)
    # The secured app takes its keys from the environment, as `gemma-unified serve` would.
    os.environ["GEMMA_UNIFIED_API_KEYS"] = f"other-key,{API_KEY}"
    try:
        secured = build_spec(SECURED)
        serve.run(build_app(secured), name=secured.app_name, route_prefix=secured.route_prefix)
    finally:
        del os.environ["GEMMA_UNIFIED_API_KEYS"]
    endpoint = Endpoint(port)
    wait_until_ready(endpoint.base)
    wait_until_ready(endpoint.base + secured.route_prefix)
    yield endpoint
    serve.shutdown()


def model_replicas(app: str = "main") -> int:
    from ray import serve

    return serve.status().applications[app].deployments["Model"].replica_states.get("RUNNING", 0)


# ---- happy paths with the openai client ----


def test_health_readiness_and_models(endpoint):
    assert endpoint.http.get("/health").json() == {"status": "ok"}
    ready = endpoint.http.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert [m.id for m in endpoint.openai().models.list()] == ["tiny"]


def test_chat_text(endpoint):
    answer = endpoint.openai().chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        seed=1,
        top_p=0.9,
    )
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert 1 <= answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_image_and_audio_parts(endpoint, sample_png, short_wav):
    client = endpoint.openai()
    text_only = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Describe."}], max_tokens=4, temperature=0
    )
    image = client.chat.completions.create(
        model="tiny",
        max_tokens=4,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe."},
                    {"type": "image_url", "image_url": {"url": data_url(sample_png)}},
                ],
            }
        ],
    )
    audio = client.chat.completions.create(
        model="tiny",
        max_tokens=4,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe."},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(short_wav).decode(), "format": "wav"},
                    },
                ],
            }
        ],
    )
    both = client.chat.completions.create(
        model="tiny",
        max_tokens=4,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(sample_png)}},
                    {"type": "text", "text": "and"},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(short_wav).decode(), "format": "wav"},
                    },
                ],
            }
        ],
    )
    base = text_only.usage.prompt_tokens
    image_tokens = image.usage.prompt_tokens - base
    audio_tokens = audio.usage.prompt_tokens - base
    assert image_tokens > 100  # a 200x300 image at the 280-token budget, plus its markers
    assert audio_tokens == 33 + 2  # 1.3 s = 33 frames of 40 ms, plus begin/end markers
    assert both.usage.prompt_tokens >= base + image_tokens + audio_tokens - 4


def test_streaming(endpoint):
    stream = endpoint.openai().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finals in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_transcription(endpoint, short_wav):
    result = endpoint.openai().audio.transcriptions.create(
        model="tiny", file=("clip.wav", short_wav, "audio/wav"), language="English", temperature=0
    )
    assert isinstance(result.text, str)


def test_translation_of_35_s_has_two_segments(endpoint, long_wav):
    result = endpoint.openai().audio.translations.create(
        model="tiny", file=("long.wav", long_wav, "audio/wav"), response_format="verbose_json"
    )
    assert result.duration == pytest.approx(35.0, abs=0.05)
    segments = result.segments
    assert len(segments) == 2
    assert segments[0].start == 0.0 and segments[0].end == pytest.approx(30.0, abs=0.05)
    assert segments[1].start == segments[0].end and segments[1].end == pytest.approx(35.0, abs=0.05)


def test_transcription_text_format(endpoint, short_wav):
    response = endpoint.http.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", short_wav, "audio/wav")},
        data={"model": "tiny", "response_format": "text"},
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")


# ---- error cases over raw HTTP ----


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_malformed_json(endpoint):
    response = endpoint.http.post(
        "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"}
    )
    assert _error(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny", "messages": "hello"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "8"}, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature"),
        ({"model": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_wrong_types(endpoint, body, param):
    assert _error(endpoint.http.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_oversize_body(endpoint):
    response = endpoint.chat("x" * (5 * 1024 * 1024))
    assert _error(response, 413)["code"] == "request_too_large"


def test_undecodable_image(endpoint):
    part = {"type": "image_url", "image_url": {"url": data_url(b"this is not a png")}}
    error = _error(endpoint.chat([{"type": "text", "text": "x"}, part]), 400)
    assert error["code"] == "invalid_media" and error["param"] == "messages.0.content.1"


def test_image_over_the_pixel_limit(endpoint):
    part = {"type": "image_url", "image_url": {"url": data_url(png(1200, 1000, noise=False))}}
    assert _error(endpoint.chat([part]), 413)["code"] == "limit_exceeded"


def test_empty_audio(endpoint):
    part = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    assert _error(endpoint.chat([part]), 400)["code"] == "invalid_media"
    response = endpoint.http.post(
        "/v1/audio/transcriptions", files={"file": ("a.wav", b"", "audio/wav")}, data={"model": "tiny"}
    )
    assert _error(response, 400)["param"] == "file"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://127.0.0.1:{port}/image.png",
        "http://[::1]:{port}/image.png",
        "http://localhost:{port}/image.png",  # a name that resolves to loopback
        "http://media.example.com/image.png",  # not on the allow-list
        "file:///etc/passwd",
    ],
)
def test_ssrf_attempts_are_refused(endpoint, media_server, url):
    before = len(media_server.requests)
    part = {"type": "image_url", "image_url": {"url": url.format(port=media_server.port)}}
    assert _error(endpoint.chat([part]), 400)["code"] == "url_not_allowed"
    assert len(media_server.requests) == before  # nothing reached the loopback server


def test_api_keys(endpoint):
    secured = "/secured/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert _error(endpoint.http.post(secured, json=body), 401)["code"] == "missing_api_key"
    wrong = endpoint.http.post(secured, json=body, headers={"Authorization": "Bearer nope"})
    assert _error(wrong, 401)["code"] == "invalid_api_key"
    assert _error(endpoint.http.get("/secured/v1/models"), 401)["type"] == "authentication_error"
    answer = endpoint.openai("/secured", api_key=API_KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    assert answer.usage.completion_tokens >= 1
    assert endpoint.http.get("/secured/health").status_code == 200  # liveness stays open
    # This app runs speculative decoding: its ingress reports drafted and accepted tokens.
    metrics = endpoint.http.get("/secured/metrics").text
    drafted = [line for line in metrics.splitlines() if line.startswith("gemma_unified_speculative_draft_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) > 0
    assert "gemma_unified_speculative_acceptance_ratio" in metrics


def test_metrics(endpoint):
    metrics = endpoint.http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for needle in (
        'gemma_unified_requests_total{route="/v1/chat/completions",status="200"}',
        'gemma_unified_requests_total{route="/v1/chat/completions",status="400"}',
        'gemma_unified_request_latency_seconds_bucket{le="0.5",route="/v1/chat/completions"}',
        'gemma_unified_tokens_total{kind="output"}',
        'gemma_unified_tokens_total{kind="image"}',
        'gemma_unified_tokens_total{kind="audio"}',
        "gemma_unified_model_queue_depth ",
        "gemma_unified_batch_size_bucket",
        "gemma_unified_time_to_first_token_seconds_count",
        "gemma_unified_speculative_draft_tokens_total",
        'gemma_unified_rejected_requests_total{reason="body_too_large"}',
    ):
        assert needle in text, needle


# ---- overload, load and autoscaling ----


def _wait_for_replicas(predicate, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        count = model_replicas()
        if predicate(count) or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


LONG = {
    "app_name": "long",
    "route_prefix": "/long",
    "engine": {"speculative": False},
    "limits": {"max_output_tokens": 4000},
    "resources": {"ingress": {"num_cpus": 0.25}, "model": {"num_cpus": 0.25, "torch_threads": 1}},
    "autoscaling": {"ingress": {"max_replicas": 1}, "model": {"max_replicas": 1}},
}


def test_a_client_that_leaves_stops_its_generation(endpoint, tokenizer, tiny_dir):
    """A client timeout and a closed stream each stop their generation, so the next request does not wait for it."""
    import json

    from ray import serve

    from serving.app import build_app
    from serving.spec import build_spec

    config = json.loads((tiny_dir / "generation_config.json").read_text())
    # End of turn banned: left alone, this answer runs 4,000 tokens (many seconds on the tiny model).
    banned = {*config["eos_token_id"], tokenizer.convert_tokens_to_ids("<turn|>")}
    endless = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Go on and on."}],
        "max_tokens": 4000,
        "temperature": 0,
        "logit_bias": {str(token): -100 for token in banned},
    }

    def short() -> float:
        started = time.perf_counter()
        assert endpoint.chat("Say hi.", prefix="/long", max_tokens=8).status_code == 200
        return time.perf_counter() - started

    def time_out() -> None:
        with pytest.raises(httpx.ReadTimeout):
            endpoint.http.post("/long/v1/chat/completions", json=endless, timeout=0.5)

    def close_stream() -> None:
        with endpoint.http.stream("POST", "/long/v1/chat/completions", json={**endless, "stream": True}) as response:
            assert next(response.iter_lines())

    spec = build_spec(LONG)
    serve.run(build_app(spec), name=spec.app_name, route_prefix=spec.route_prefix)
    wait_until_ready(endpoint.base + spec.route_prefix)
    try:
        for leave in (time_out, close_stream):
            # Idle and after in turn, so both see the same background load; medians of five.
            idle, after = [], []
            for _ in range(5):
                idle.append(short())
                leave()
                after.append(short())
            assert sorted(after)[2] <= 2 * sorted(idle)[2], (leave.__name__, after, idle)
    finally:
        serve.delete(spec.app_name)


def test_overload_answers_503_with_retry_after(endpoint):
    assert _wait_for_replicas(lambda n: n == 1, 60) == 1
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell a story."}],
        "max_tokens": 32,
        "temperature": 0,
    }

    async def burst():
        async with httpx.AsyncClient(
            base_url=endpoint.base,
            timeout=180,
            trust_env=False,
            limits=httpx.Limits(max_connections=100),
            event_hooks={"response": [async_response_hook]},
        ) as http:
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(80)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 503]
    assert set(statuses) <= {200, 503}, statuses
    assert rejected and statuses.count(200) >= 16
    assert all(r.headers["retry-after"] == "1" for r in rejected)
    assert rejected[0].json()["error"]["code"] == "overloaded"


def test_load_scales_the_model_up_and_back_down(endpoint):
    from serving.loadtest import format_table, run_load

    assert _wait_for_replicas(lambda n: n == 1, 90) == 1, "the model deployment did not settle at 1 replica"
    seen: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(model_replicas())
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    try:
        report = asyncio.run(
            run_load(
                f"{endpoint.base}/v1/chat/completions",
                body,
                concurrency=LOAD_CLIENTS,
                duration_s=LOAD_S,
                requests=20_000,
            )
        )
    finally:
        stop.set()
        watcher.join()
    print("\n" + format_table([(f"chat, {LOAD_CLIENTS} clients, {LOAD_S:g} s", report)]))
    print(f"model replicas during load: max {max(seen)}, samples {seen[::10]}")
    assert report.ok > 0 and report.transport_errors == 0
    assert report.server_errors == {}, report.statuses
    assert max(seen) > 1, "the model deployment did not scale up under load"
    settled = _wait_for_replicas(lambda n: n == 1, 90)
    assert settled == 1, f"the model deployment did not scale back down (still {settled} replicas)"
