"""The endpoint's small parts on their own: SSRF guard, media URLs, micro-batching, stop strings, auth, errors."""

from __future__ import annotations

import asyncio
import base64

import httpcore
import pytest

from pipelines.chat.media_sources import MediaFetcher, decode_data_url
from pipelines.chat.url_guard import ForbiddenURL, PublicOnlyBackend, host_allowed, is_public_address
from pipelines.config import RemoteMediaSpec
from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded
from serving.auth import Authenticator, configured_digests
from serving.errors import APIError, from_item_error
from serving.stops import StopScanner

# ---- SSRF guard ----


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "64:ff9b::a9fe:a9fe",
        "ff02::1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert is_public_address(address)


def test_allow_list_matching():
    allow = ["images.example.com", "*.cdn.example.org", "[::1]", "203.0.113.7"]
    assert host_allowed("IMAGES.example.com.", allow)
    assert host_allowed("a.b.cdn.example.org", allow)
    assert not host_allowed("cdn.example.org", allow)
    assert not host_allowed("evilcdn.example.org", allow)
    assert not host_allowed("images.example.com.evil.net", allow)
    assert host_allowed("::1", allow)
    assert host_allowed("203.0.113.7", allow)


class _RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.connected: list[str] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connected.append(host)
        raise httpcore.ConnectError("recorded, not connected")

    async def sleep(self, seconds):
        await asyncio.sleep(seconds)


def _resolver(*answers: list[str]):
    calls = iter(answers)

    async def resolve(host, port):
        return next(calls)

    return resolve


def test_backend_refuses_a_host_with_any_private_address():
    inner = _RecordingBackend()
    backend = PublicOnlyBackend(resolver=_resolver(["93.184.216.34", "10.0.0.5"]), inner=inner)
    with pytest.raises(ForbiddenURL, match="10.0.0.5"):
        asyncio.run(backend.connect_tcp("media.example.com", 80))
    assert inner.connected == []


def test_backend_connects_to_the_address_it_checked():
    # A rebinding resolver would answer 127.0.0.1 the second time: there is no second time.
    inner = _RecordingBackend()
    backend = PublicOnlyBackend(resolver=_resolver(["93.184.216.34"], ["127.0.0.1"]), inner=inner)
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(backend.connect_tcp("media.example.com", 80))
    assert inner.connected == ["93.184.216.34"]


# ---- media URLs ----


def test_data_urls():
    assert decode_data_url("data:image/png;base64," + base64.b64encode(b"abc").decode(), max_bytes=10) == b"abc"
    assert decode_data_url("data:,a%20b", max_bytes=10) == b"a b"
    with pytest.raises(InvalidRequest, match="base64"):
        decode_data_url("data:image/png;base64,@@@", max_bytes=10)
    with pytest.raises(LimitExceeded):
        decode_data_url("data:;base64," + base64.b64encode(b"x" * 100).decode(), max_bytes=10)


def _fetch(spec: RemoteMediaSpec, url: str) -> bytes:
    async def run():
        fetcher = MediaFetcher(spec)
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.close()

    return asyncio.run(run())


def test_http_fetch_needs_the_allow_list(media_server):
    url = f"http://127.0.0.1:{media_server.port}/image.png"
    with pytest.raises(ForbiddenURL, match="allow-list"):
        _fetch(RemoteMediaSpec(), url)
    with pytest.raises(ForbiddenURL, match="non-public"):
        _fetch(RemoteMediaSpec(http_allow_list=["127.0.0.1"]), url)


def test_http_fetch_when_private_networks_are_trusted(media_server, sample_png):
    spec = RemoteMediaSpec(http_allow_list=["localhost"], allow_private_networks=True)
    assert _fetch(spec, f"http://localhost:{media_server.port}/redirect") == sample_png
    with pytest.raises(LimitExceeded):
        _fetch(spec.model_copy(update={"max_fetch_bytes": 1024}), f"http://localhost:{media_server.port}/image.png")


def test_redirects_are_checked_hop_by_hop(media_server):
    spec = RemoteMediaSpec(http_allow_list=["localhost"], allow_private_networks=True, max_redirects=0)
    with pytest.raises(InvalidRequest, match="redirects"):
        _fetch(spec, f"http://localhost:{media_server.port}/redirect")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "s3://bucket/a.png", "a.png"])
def test_other_schemes_are_refused(url):
    with pytest.raises(ForbiddenURL):
        _fetch(RemoteMediaSpec(), url)


def test_object_storage_through_fsspec(tmp_path, sample_png):
    import fsspec

    with fsspec.open("memory://bucket/a.png", "wb") as handle:
        handle.write(sample_png)
    fetcher = MediaFetcher(RemoteMediaSpec(allow_object_storage=True))
    assert fetcher._fetch_object("memory://bucket/a.png") == sample_png
    with pytest.raises(InvalidRequest, match="does not exist"):
        fetcher._fetch_object("memory://bucket/missing.png")


# ---- stop strings over deltas ----


def test_stop_string_split_across_deltas():
    scanner = StopScanner(("STOP",))
    out = [scanner.push(d) for d in ["hello S", "T", "OP and more"]] + [scanner.flush()]
    assert "".join(out) == "hello "
    assert scanner.stopped


def test_no_stop_passes_everything_through():
    scanner = StopScanner(("zz",))
    assert "".join([scanner.push("abc"), scanner.push("z"), scanner.push("y"), scanner.flush()]) == "abczy"


# ---- auth and errors ----


def test_api_keys_from_spec_and_environment():
    digests = configured_digests(["spec-key"], {"GEMMA_UNIFIED_API_KEYS": " env-a, env-b ,"})
    auth = Authenticator(digests)
    for key in ("spec-key", "env-a", "env-b"):
        auth.check(f"Bearer {key}")
    for header in (None, "", "Bearer", "Basic env-a", "Bearer wrong"):
        with pytest.raises(APIError) as info:
            auth.check(header)
        assert info.value.status == 401
    Authenticator([]).check(None)  # no keys configured: open


def test_item_errors_keep_their_status():
    assert from_item_error(LimitExceeded("too big")).status == 413
    error = from_item_error(DecodeError("not an image"), "messages.0.content.1")
    assert error.status == 400 and error.body()["error"]["param"] == "messages.0.content.1"
    assert from_item_error(ForbiddenURL("no")).body()["error"]["code"] == "url_not_allowed"


# ---- the model deployment's batching with a stand-in engine ----


class _FakeEngine:
    """Fails any batch holding a request whose id starts with 'bad'; records batch sizes."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, requests, watches=None):
        import time

        from pipelines.engines.base import GenerationResult

        self.calls.append(len(requests))
        time.sleep(0.05)
        if any(r.id.startswith("bad") for r in requests):
            raise InvalidRequest("bad request", item=requests[0].id)
        return [GenerationResult(r.id, "ok", "stop", 3, 0, 0, 1, 0.05) for r in requests]

    def health(self) -> bool:
        return True


def test_one_bad_request_fails_alone_in_a_batch():
    import numpy as np

    from pipelines.engines.base import PreparedRequest
    from serving.model_server import ModelServer
    from serving.spec import ServeSpec

    engine = _FakeEngine()
    server = ModelServer(ServeSpec().model_dump(mode="json"), engine=engine)

    def request(name: str) -> PreparedRequest:
        return PreparedRequest(name, np.zeros(3, np.int32), np.zeros(3, np.int8))

    async def scenario():
        first = asyncio.ensure_future(server.generate(request("warm")))
        await asyncio.sleep(0.01)  # the engine is busy: the next four wait and form one batch
        rest = await asyncio.gather(*(server.generate(request(n)) for n in ("a", "bad", "b", "c")))
        return [await first, *rest]

    replies = asyncio.run(scenario())
    assert [r.error is None for r in replies] == [True, True, False, True, True]
    assert replies[2].error.status == 400 and "bad request" in replies[2].error.message
    assert replies[1].batch_size == 4 and engine.calls[:2] == [1, 4]


def test_requests_go_to_replicas_whose_model_has_loaded_while_there_are_any():
    from types import SimpleNamespace

    from serving.routing import routable

    def replica(**stats):  # the slice of Serve's RunningReplica the router reads: the replica's routing stats
        return SimpleNamespace(routing_stats=stats)

    loading, unreported = replica(loading=True, failed=False), replica()
    loaded, failed = replica(loading=False, failed=False), replica(loading=False, failed=True)
    assert routable([loading, loaded, unreported, failed]) == [loaded]
    # None has loaded (the endpoint is starting, or every load failed): all of them, which answer with the reason.
    assert routable([loading, unreported]) == [loading, unreported]
    assert routable([failed, loading]) == [failed, loading]
