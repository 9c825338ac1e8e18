"""Prometheus metrics of one ingress replica, served at its /metrics.

Every request passes through an ingress replica, so the ingress sees all it needs: requests, latencies, tokens
(from the answers), batch sizes and queue waits the model replicas report with each answer, speculative
acceptance, and the requests it has in flight to the model deployment (its queue depth). Serve replicas are
separate processes with separate registries, and Serve's proxy sends a scrape of /metrics to one ingress replica,
so a scrape is that replica's view (`gemma_unified_ingress_replica{replica=...}` names it). With one ingress
replica a scrape has the exact totals; with several, each scrape sees one of them, and the cluster-wide numbers
come from Ray's own metrics endpoint on every node, which exports Serve's `ray_serve_*` series (requests,
latencies, queue lengths, replica counts per deployment).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, replica: str = "local") -> None:
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.replica = replica
        self.requests = Counter(
            "gemma_unified_requests", "HTTP requests answered, by route and status code.", ["route", "status"], **labels
        )
        self.latency = Histogram(
            "gemma_unified_request_latency_seconds",
            "Time from request to the end of the answer, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            **labels,
        )
        self.first_token = Histogram(
            "gemma_unified_time_to_first_token_seconds",
            "Streaming: time from request to the first text.",
            buckets=_LATENCY_BUCKETS,
            **labels,
        )
        self.tokens = Counter(
            "gemma_unified_tokens", "Tokens processed, by kind: prompt (all), image, audio, output.", ["kind"], **labels
        )
        self.queue_depth = Gauge(
            "gemma_unified_model_queue_depth",
            "Requests this ingress replica has sent to the model deployment and not yet had answered.",
            **labels,
        )
        self.batch_size = Histogram(
            "gemma_unified_batch_size",
            "Requests in the model batch each answered request ran in.",
            buckets=_BATCH_BUCKETS,
            **labels,
        )
        self.model_queue_wait = Histogram(
            "gemma_unified_model_queue_wait_seconds",
            "Time a request waited inside a model replica for its batch.",
            buckets=_LATENCY_BUCKETS,
            **labels,
        )
        self.spec_drafted = Counter(
            "gemma_unified_speculative_draft_tokens",
            "Speculative decoding: tokens proposed by the MTP assistant.",
            **labels,
        )
        self.spec_accepted = Counter(
            "gemma_unified_speculative_accepted_tokens",
            "Speculative decoding: drafted tokens the model accepted.",
            **labels,
        )
        self.spec_acceptance = Gauge(
            "gemma_unified_speculative_acceptance_ratio",
            "Accepted / drafted tokens since this replica started.",
            **labels,
        )
        self.rejected = Counter(
            "gemma_unified_rejected_requests", "Requests refused on purpose, by reason.", ["reason"], **labels
        )
        self.model_ready = Gauge(
            "gemma_unified_model_ready", "1 when the model deployment answered the last readiness check.", **labels
        )
        self.info = Gauge("gemma_unified_ingress_replica", "This ingress replica (always 1).", ["replica"], **labels)
        self.info.labels(replica).set(1)
        self._drafted = self._accepted = 0

    def observe_batch(self, batch_size: int, queued_s: float) -> None:
        self.batch_size.observe(batch_size)
        self.model_queue_wait.observe(queued_s)

    def observe_result(self, result) -> None:
        self.tokens.labels("prompt").inc(result.prompt_tokens)
        self.tokens.labels("output").inc(result.output_tokens)
        if result.image_tokens:
            self.tokens.labels("image").inc(result.image_tokens)
        if result.audio_tokens:
            self.tokens.labels("audio").inc(result.audio_tokens)
        if result.spec_drafted:
            self._drafted += result.spec_drafted
            self._accepted += result.spec_accepted or 0
            self.spec_drafted.inc(result.spec_drafted)
            self.spec_accepted.inc(result.spec_accepted or 0)
            self.spec_acceptance.set(self._accepted / self._drafted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
