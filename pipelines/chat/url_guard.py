"""Server-side request forgery guard for media URLs.

Only http(s) hosts on the allow-list are fetched at all. Every address a host resolves to must be public (not
private, loopback, link-local, multicast, reserved or unspecified, IPv4 embedded in IPv6 included), and the
connection goes to the very address that was checked: the check lives in the network backend, so a DNS answer
that changes between check and connect (rebinding) cannot redirect the fetch. Redirects are followed by the caller,
one checked hop at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable

import httpcore
import httpx

from pipelines.errors import InvalidRequest

Resolver = Callable[[str, int], Awaitable[list[str]]]


class ForbiddenURL(InvalidRequest):
    """A URL the endpoint refuses to fetch (scheme, allow-list or address)."""

    code = "url_not_allowed"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = [ip.sixtofour]
    if ip.teredo:
        found.extend(ip.teredo)
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64 well-known prefix
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [address for address in found if address is not None]


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if ip.ipv4_mapped is not None:  # the socket reaches the IPv4 address itself
            return is_public_address(ip.ipv4_mapped)
        if any(not is_public_address(inner) for inner in _embedded_ipv4(ip)):
            return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_unspecified
    )


def normalise_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def host_allowed(host: str, allow_list: Iterable[str]) -> bool:
    """Exact names or addresses, or `*.example.com` for any subdomain (not the bare domain)."""
    host = normalise_host(host)
    for entry in allow_list:
        entry = normalise_host(entry)
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from None
    addresses: list[str] = []
    for _, _, _, _, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


class PublicOnlyBackend(httpcore.AsyncNetworkBackend):
    """Resolves once, refuses the host if any address is not public, then connects to a checked address."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        resolver: Resolver = system_resolver,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = await self.resolver(normalise_host(host), port)
        if not addresses:
            raise httpcore.ConnectError(f"{host!r} resolves to no address")
        if not self.allow_private:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused:
                raise ForbiddenURL(f"host {host!r} resolves to a non-public address ({', '.join(refused)}); refused")
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error  # type: ignore[misc]

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise ForbiddenURL("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool on the guarded backend; no proxies, no environment settings."""

    def __init__(self, backend: PublicOnlyBackend, max_connections: int = 32) -> None:
        super().__init__(trust_env=False)
        # A proxy would make the connection on our behalf, unchecked: the pool connects directly, always.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            network_backend=backend,
        )
