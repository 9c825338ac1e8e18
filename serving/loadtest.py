"""A bounded asyncio load generator for the endpoint (loopback or any URL you own): N clients for T seconds.

Each client sends one request at a time (a streamed one is read to its end); a 503 is counted and, honouring Retry-After, retried later. The report
has latency percentiles of the successful requests, throughput and a count per status code.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadReport:
    concurrency: int
    duration_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    transport_errors: int = 0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    @property
    def server_errors(self) -> dict[int, int]:
        """5xx answers other than the deliberate 503 of a full queue."""
        return {s: n for s, n in self.statuses.items() if s >= 500 and s != 503}


async def run_load(
    url: str,
    body: dict,
    *,
    concurrency: int,
    duration_s: float | None = None,
    requests: int | None = None,
    headers: dict | None = None,
    timeout_s: float = 120.0,
    max_retry_wait_s: float = 2.0,
    observe: Callable[[httpx.Response, float], None] | None = None,
) -> LoadReport:
    """Stop after duration_s, or after `requests` answers, whichever comes first (at least one must be given)."""
    if duration_s is None and requests is None:
        raise ValueError("give duration_s or requests")
    report = LoadReport(concurrency)
    deadline = time.monotonic() + duration_s if duration_s else float("inf")
    budget = requests if requests is not None else float("inf")
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < deadline and sent < budget:
            sent += 1
            started = time.perf_counter()
            try:
                if body.get("stream"):  # read to the stream's end: the latency is the whole answer's
                    async with http.stream("POST", url, json=body, headers=headers) as response:
                        await response.aread()
                else:
                    response = await http.post(url, json=body, headers=headers)
            except httpx.HTTPError:
                report.transport_errors += 1
                continue
            elapsed = time.perf_counter() - started
            report.statuses[response.status_code] += 1
            if response.status_code == 200:
                report.latencies_s.append(elapsed)
                if observe is not None:
                    observe(response, elapsed)
            elif response.status_code == 503:
                wait = float(response.headers.get("retry-after", "1") or 1)
                await asyncio.sleep(min(wait, max_retry_wait_s, max(0.0, deadline - time.monotonic())))

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        report.duration_s = time.monotonic() - started
    return report


def format_table(rows: list[tuple[str, LoadReport]]) -> str:
    width = max([3] + [len(name) for name, _ in rows])
    header = f"{'run':<{width}} {'conc':>4} {'ok':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  statuses"
    lines = [header, "-" * len(header)]
    for name, r in rows:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(r.statuses.items()))
        if r.transport_errors:
            statuses += f", transport errors: {r.transport_errors}"
        lines.append(
            f"{name:<{width}} {r.concurrency:>4} {r.ok:>6} {r.requests_per_s:>7.1f} {r.percentile_ms(50):>8.1f} "
            f"{r.percentile_ms(95):>8.1f} {r.percentile_ms(99):>8.1f}  {statuses}"
        )
    return "\n".join(lines)
