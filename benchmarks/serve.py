"""What the endpoint costs on top of the engine, and what batching buys, in one run on a local Ray instance.

1. Overhead at concurrency 1: the same chat request timed through the engine in this process (the baseline) and
   through the endpoint over loopback HTTP (proxy -> ingress -> model replica and back), one of each in turn so
   both see the same background load. Reported two ways: endpoint p50 minus engine p50, and per request, end-to-end
   time minus the engine time the replica reports for that very request (Server-Timing header; it leaves out the
   engine's collate and decode, about 1 ms, so it slightly overstates). Target: under 15 ms p50.
2. Throughput at concurrency 32 for a fixed time, one model replica, with batching on (max 8) and off (max 1).
3. Streamed answers (read to their end) at concurrency 1 and 16: concurrent streams share engine batches, so
   requests/s at 16 should be well above concurrency 1 (target: at least 3x).
4. A client that leaves: the next request's latency after a client timeout (0.5 s) and after a stream closed at its
   first chunk, each on an answer that would otherwise run 4,000 tokens, beside the idle latency (target: within 2x).

    python benchmarks/serve.py                    # tiny model, about 2 minutes
    python benchmarks/serve.py --quick            # fewer requests, shorter runs
    python benchmarks/serve.py --haproxy          # through Serve's (experimental) HAProxy ingress
    python benchmarks/serve.py --model /models/gemma-4-12B-it --threads 8 --max-tokens 64
"""

from __future__ import annotations

import os
import sys

# Run as a script, the project imports from this checkout: the repo root goes first on the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import asyncio
import re
import socket
import statistics
import time

PROMPT = "Write one sentence about the sea."
ENDLESS_TOKENS = 4000  # an answer with end of turn banned: many seconds on the tiny model


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base: str, timeout_s: float = 600.0) -> None:
    """Serve has the app running before the model replica's weights load: wait for /health/ready."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
        while http.get("/health/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit(f"the endpoint was not ready within {timeout_s:g} s")
            time.sleep(0.2)


def percentile_ms(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q) * 1000)


def spec_for(args, batch_size: int):
    from serving.spec import build_spec

    return build_spec(
        {
            "app_name": "bench",
            "model": {"name": args.model},
            "engine": {"speculative": False, "max_batch_size": 8},
            "batching": {"max_batch_size": batch_size, "batch_wait_timeout_s": 0.0},
            "resources": {"ingress": {"num_cpus": 0.5}, "model": {"num_cpus": 1, "torch_threads": args.threads}},
            "autoscaling": {
                "ingress": {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 256},
                "model": {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 64},
            },
            "limits": {"max_output_tokens": max(args.max_tokens, ENDLESS_TOKENS), "max_queued_requests": 1024},
        }
    )


def load_engine(spec, body: dict):
    """The engine the model replica runs, in this process, and the prepared request the endpoint would build."""
    import torch

    from pipelines.chat.protocol import ChatCompletionRequest
    from pipelines.engines.transformers import TransformersEngine
    from pipelines.model_sources import load_tokenizer, resolve
    from serving.router import chat_preparer

    torch.set_num_threads(spec.resources.model.torch_threads)
    chat = chat_preparer(spec, load_tokenizer(spec.model))
    prepared = asyncio.run(chat.prepare(ChatCompletionRequest.model_validate(body)))
    return TransformersEngine(resolve(spec.model), spec.engine), prepared


def interleaved(engine, prepared, url: str, body: dict, requests: int) -> tuple[list, list, list, dict, object]:
    """Engine alone and endpoint, one request each in turn, so both see the same background load. Also where the
    endpoint's time goes, from each answer's Server-Timing header."""
    import httpx

    engine_s, endpoint_s, overhead_s = [], [], []
    parts: dict[str, list[float]] = {}
    with httpx.Client(timeout=120, trust_env=False) as http:
        for index in range(requests + 3):
            started = time.perf_counter()
            result = engine.generate([prepared])[0]
            alone = time.perf_counter() - started
            started = time.perf_counter()
            response = http.post(url, json=body)
            through = time.perf_counter() - started
            response.raise_for_status()
            if index < 3:  # warm-up
                continue
            timing = {
                k: float(v) / 1000 for k, v in re.findall(r"(\w+);dur=([\d.]+)", response.headers["server-timing"])
            }
            engine_s.append(alone)
            endpoint_s.append(through)
            overhead_s.append(through - timing["engine"])
            for name, seconds in (
                ("HTTP and Serve's proxy (end to end - ingress)", through - timing["ingress"]),
                ("ingress: prepare (parse, template, tokenize)", timing["prepare"]),
                ("ingress -> model replica call (model - replica)", timing["model"] - timing["replica"]),
                ("model replica around the engine (replica - engine)", timing["replica"] - timing["engine"]),
                (
                    "ingress: the rest (ingress - prepare - model)",
                    timing["ingress"] - timing["prepare"] - timing["model"],
                ),
            ):
                parts.setdefault(name, []).append(seconds)
    return engine_s, endpoint_s, overhead_s, parts, result


def after_leaving(url: str, body: dict, endless: dict, rounds: int) -> list[tuple[str, list[float]]]:
    """The same short request: idle, then right after each way a client leaves an endless answer."""
    import httpx

    with httpx.Client(timeout=120, trust_env=False) as http:

        def short() -> float:
            started = time.perf_counter()
            http.post(url, json=body).raise_for_status()
            return time.perf_counter() - started

        def time_out() -> None:
            try:
                http.post(url, json=endless, timeout=0.5)
            except httpx.ReadTimeout:
                return
            raise RuntimeError("the endless answer ended within 0.5 s: raise max_tokens")

        def close_stream() -> None:
            with http.stream("POST", url, json={**endless, "stream": True}) as response:
                next(response.iter_lines())

        rows = [("idle (baseline)", [short() for _ in range(rounds)])]
        for name, leave in (
            ("after a client timeout at 0.5 s", time_out),
            ("after a stream closed early", close_stream),
        ):
            after = []
            for _ in range(rounds):
                leave()
                after.append(short())
            rows.append((name, after))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=60, help="Requests at concurrency 1 (each path).")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=20.0, help="Length of each throughput run.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model replica and baseline.")
    parser.add_argument("--num-cpus", type=int, default=4, help="Logical CPUs of the local Ray instance.")
    parser.add_argument("--quick", action="store_true", help="20 requests, 8 s runs.")
    parser.add_argument(
        "--haproxy",
        action="store_true",
        help="Serve's experimental HAProxy ingress (direct to ingress replicas, no Python proxy).",
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.duration_s = 20, 8.0
    if args.haproxy:
        from serving.app import HAPROXY_ENV

        # Read by Serve's controller and replicas at start: set before Ray starts so every process inherits them.
        os.environ.update(HAPROXY_ENV)

    import ray
    from ray import serve

    from serving.app import build_app
    from serving.loadtest import format_table, run_load

    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    spec_on, spec_off = spec_for(args, 8), spec_for(args, 1)

    ray.init(
        num_cpus=args.num_cpus, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    try:
        log("deploying the endpoint, batching on")
        serve.run(build_app(spec_on), name="bench", logging_config={"log_level": "WARNING"})
        wait_ready(f"http://127.0.0.1:{port}")
        engine, prepared = load_engine(spec_on, body)
        log(f"concurrency 1: {args.requests} requests, engine alone and endpoint in turn")
        baseline, endpoint, overheads, parts, result = interleaved(engine, prepared, url, body, args.requests)
        endless = {
            **body,
            "max_tokens": ENDLESS_TOKENS,
            "logit_bias": {str(token): -100 for token in engine.stop_ids},
        }
        engine.close()
        log(f"  {result.output_tokens} output tokens per request, prompt {result.prompt_tokens} tokens")
        log("a client that leaves: the next request's latency")
        leaving = after_leaving(url, body, endless, rounds=5)

        asyncio.run(run_load(url, body, concurrency=args.concurrency, requests=2 * args.concurrency))  # warm up
        log(f"concurrency {args.concurrency}, batching on, {args.duration_s:g} s")
        batched = asyncio.run(run_load(url, body, concurrency=args.concurrency, duration_s=args.duration_s))

        streamed_body = {**body, "stream": True}
        streams = []
        for concurrency in (1, 16):
            log(f"streams at concurrency {concurrency}, {args.duration_s:g} s")
            report = asyncio.run(run_load(url, streamed_body, concurrency=concurrency, duration_s=args.duration_s))
            streams.append((f"streamed, concurrency {concurrency}", report))

        log("redeploying with batching off")
        serve.run(build_app(spec_off), name="bench", logging_config={"log_level": "WARNING"})
        wait_ready(f"http://127.0.0.1:{port}")
        asyncio.run(run_load(url, body, concurrency=args.concurrency, requests=2 * args.concurrency))
        log(f"concurrency {args.concurrency}, batching off, {args.duration_s:g} s")
        unbatched = asyncio.run(run_load(url, body, concurrency=args.concurrency, duration_s=args.duration_s))
    finally:
        serve.shutdown()
        ray.shutdown()

    engine_p50, endpoint_p50 = percentile_ms(baseline, 50), percentile_ms(endpoint, 50)
    print()
    proxy = "HAProxy direct ingress" if args.haproxy else "Serve's HTTP proxy"
    print(
        f"Overhead at concurrency 1: model {args.model}, {args.max_tokens} max tokens, {args.requests} requests, "
        f"{args.threads} torch thread(s), {proxy}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'':<46} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
    rows = [
        ("engine.generate in-process (baseline)", baseline),
        ("endpoint, end to end over HTTP", endpoint),
        ("per request: end to end - replica engine time", overheads),
    ]
    for name, values in rows:
        print(
            f"{name:<46} {percentile_ms(values, 50):>8.1f} {percentile_ms(values, 95):>8.1f} "
            f"{statistics.mean(values) * 1000:>8.1f}"
        )
    print(f"{'endpoint p50 - engine p50':<46} {endpoint_p50 - engine_p50:>8.1f}")
    print("where the overhead goes (p50 of each part, from Server-Timing):")
    for name, values in parts.items():
        print(f"  {name:<52} {percentile_ms(values, 50):>6.1f}")
    verdict = "meets" if percentile_ms(overheads, 50) < 15 else "misses"
    print(f"overhead p50 {percentile_ms(overheads, 50):.1f} ms {verdict} the 15 ms target")
    print()
    print(f"Throughput at concurrency {args.concurrency}, {args.duration_s:g} s each, one model replica")
    print(
        format_table(
            [("batching on (up to 8 per engine call)", batched), ("batching off (1 per engine call)", unbatched)]
        )
    )
    if unbatched.requests_per_s:
        print(f"batching speed-up: {batched.requests_per_s / unbatched.requests_per_s:.2f}x requests/s")
    print()
    print("Next request after a client left an endless answer (5 each; same request, same replica)")
    print(f"{'':<46} {'p50 ms':>8} {'max ms':>8}")
    for name, values in leaving:
        print(f"{name:<46} {percentile_ms(values, 50):>8.1f} {max(values) * 1000:>8.1f}")
    print()
    print(f"Streamed answers, read to their end, {args.duration_s:g} s each, batching on (baseline: concurrency 1)")
    print(format_table(streams))
    (_, alone), (_, shared) = streams
    if alone.requests_per_s:
        speedup = shared.requests_per_s / alone.requests_per_s
        verdict = "meets" if speedup >= 3 else "misses"
        print(f"streams at 16 vs 1: {speedup:.2f}x requests/s, {verdict} the 3x target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
