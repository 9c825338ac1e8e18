"""Media bytes named by a URL in a request: data: URLs always; s3:// and friends through fsspec when enabled;
http(s) only for allow-listed hosts, through the SSRF guard, with timeouts and a size cap."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx

from pipelines.chat.url_guard import (
    ForbiddenURL,
    GuardedTransport,
    PublicOnlyBackend,
    Resolver,
    host_allowed,
    system_resolver,
)
from pipelines.config import RemoteMediaSpec
from pipelines.errors import InvalidRequest, LimitExceeded

logger = logging.getLogger(__name__)

OBJECT_STORAGE_SCHEMES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def decode_base64(data: str, *, what: str, max_bytes: int) -> bytes:
    if len(data) * 3 // 4 > max_bytes:
        raise LimitExceeded(f"{what} is over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64") from None


def decode_data_url(url: str, *, max_bytes: int) -> bytes:
    """`data:[<media type>][;base64],<data>` (RFC 2397)."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidRequest("a data: URL needs a comma between its header and its data")
    if header.lower().endswith(";base64"):
        return decode_base64(payload.strip(), what="the data: URL", max_bytes=max_bytes)
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise LimitExceeded(f"the data: URL is over the limit of {max_bytes:,} bytes")
    return data


class MediaFetcher:
    def __init__(self, spec: RemoteMediaSpec, *, resolver: Resolver = system_resolver) -> None:
        self.spec = spec
        self._backend = PublicOnlyBackend(allow_private=spec.allow_private_networks, resolver=resolver)
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = httpx.Timeout(self.spec.fetch_timeout_s, connect=min(5.0, self.spec.fetch_timeout_s))
            self._client = httpx.AsyncClient(
                transport=GuardedTransport(self._backend), timeout=timeout, follow_redirects=False, trust_env=False
            )
        return self._client

    async def fetch(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, max_bytes=self.spec.max_fetch_bytes)
        if scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self._fetch_http(url), self.spec.fetch_timeout_s)
            except TimeoutError:
                raise InvalidRequest(f"fetching {url} took longer than {self.spec.fetch_timeout_s:g} s") from None
        if scheme in OBJECT_STORAGE_SCHEMES:
            if not self.spec.allow_object_storage:
                raise ForbiddenURL(f"{scheme}:// URLs are not enabled on this endpoint")
            return await asyncio.to_thread(self._fetch_object, url)
        raise ForbiddenURL(
            f"unsupported URL scheme {scheme or '(none)'!r}: use a data: URL"
            + (", an allow-listed http(s) URL" if self.spec.http_allow_list else "")
            + (" or object storage" if self.spec.allow_object_storage else "")
        )

    def _check_http(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ForbiddenURL(f"redirect to a non-http URL refused: {url}")
        if parts.username or parts.password:
            raise ForbiddenURL("URLs with credentials are refused")
        if not parts.hostname or not host_allowed(parts.hostname, self.spec.http_allow_list):
            raise ForbiddenURL(f"host {parts.hostname!r} is not on this endpoint's allow-list for media URLs")

    async def _fetch_http(self, url: str) -> bytes:
        for _ in range(self.spec.max_redirects + 1):
            self._check_http(url)
            try:
                async with self._http().stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InvalidRequest(f"fetching {url} answered HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.spec.max_fetch_bytes:
                        raise LimitExceeded(f"{url} is over the limit of {self.spec.max_fetch_bytes:,} bytes")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self.spec.max_fetch_bytes:
                            raise LimitExceeded(f"{url} is over the limit of {self.spec.max_fetch_bytes:,} bytes")
                    return bytes(body)
            except httpx.HTTPError as exc:
                raise InvalidRequest(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from None
        raise InvalidRequest(f"more than {self.spec.max_redirects} redirects fetching the media URL")

    def _fetch_object(self, url: str) -> bytes:
        import fsspec

        try:
            with fsspec.open(url, "rb", **self.spec.storage_options) as handle:
                data = handle.read(self.spec.max_fetch_bytes + 1)
        except FileNotFoundError:
            raise InvalidRequest(f"{url} does not exist") from None
        except Exception as exc:
            logger.info("cannot read %s: %s: %s", url, type(exc).__name__, exc)
            raise InvalidRequest(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
        if len(data) > self.spec.max_fetch_bytes:
            raise LimitExceeded(f"{url} is over the limit of {self.spec.max_fetch_bytes:,} bytes")
        return data

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
