"""ServeSpec: the endpoint's whole configuration, one YAML file, validated once at the boundary.

`model`, `engine` and `media` are the same classes batch jobs use, so one block means the same thing in both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import (
    ChatLimits,
    ChatSpec,
    EngineSpec,
    MediaSpec,
    ModelSpec,
    RemoteMediaSpec,
    ResourcesSpec,
    SamplingDefaults,
    Strict,
    load_spec_file,
)
from pipelines.config import build_spec as build_config
from pipelines.environment import API_KEYS_ENV


class AutoscalingSpec(Strict):
    min_replicas: int = Field(1, ge=0, le=1024, description="Replicas kept running with no traffic.")
    max_replicas: int = Field(1, ge=1, le=1024, description="Upper bound on replicas under load.")
    initial_replicas: int | None = Field(
        None, ge=0, le=1024, description="Replicas started at deploy time; min_replicas when unset."
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0, le=10_000, description="Requests in flight (running plus queued) per replica to aim for."
    )
    max_ongoing_requests: int = Field(
        8, ge=1, le=100_000, description="Requests a replica runs at once; more wait in the caller's queue."
    )
    upscale_delay_s: float = Field(30.0, ge=0, le=3600, description="Load must persist this long to add replicas.")
    downscale_delay_s: float = Field(
        600.0, ge=0, le=86_400, description="Load must stay low this long to remove replicas."
    )
    look_back_period_s: float = Field(30.0, gt=0, le=3600, description="Window over which load is averaged.")
    metrics_interval_s: float = Field(
        10.0, gt=0, le=600, description="How often replicas and callers report load to the Serve controller."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        return self

    def serve_config(self) -> dict:
        """Ray Serve's `autoscaling_config` for this deployment."""
        return self.model_dump(exclude={"max_ongoing_requests"}, exclude_none=True)


def _ingress_autoscaling() -> AutoscalingSpec:
    return AutoscalingSpec(max_replicas=2, target_ongoing_requests=32, max_ongoing_requests=128)


def _model_autoscaling() -> AutoscalingSpec:
    return AutoscalingSpec(max_replicas=4, target_ongoing_requests=8, max_ongoing_requests=16)


class DeploymentAutoscaling(Strict):
    ingress: AutoscalingSpec = Field(
        default_factory=_ingress_autoscaling, description="HTTP ingress: validation, media decoding, tokenization."
    )
    model: AutoscalingSpec = Field(
        default_factory=_model_autoscaling, description="Model replicas, one engine each (one GPU each on GPU)."
    )


class ReplicaResources(Strict):
    num_cpus: float = Field(1.0, ge=0, le=256, description="CPUs reserved per replica (0 allowed for tests).")
    num_gpus: float | None = Field(
        None, ge=0, le=8, description="GPUs per replica; unset: 1 for the model when the cluster has GPUs, else 0."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads per replica; unset: max(1, num_cpus)."
    )


class DeploymentResources(Strict):
    ingress: ReplicaResources = Field(
        default_factory=lambda: ReplicaResources(num_cpus=1.0, num_gpus=0), description="Per ingress replica."
    )
    model: ReplicaResources = Field(default_factory=ReplicaResources, description="Per model replica.")


class BatchingSpec(Strict):
    max_batch_size: int = Field(8, ge=1, le=1024, description="Requests the model replica runs in one batch.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=1.0,
        description="Extra wait for a fuller batch when the engine is idle. Requests arriving while a batch runs "
        "join the next one without it, so 0 keeps single-request latency low and still batches under load.",
    )


class LimitsSpec(ChatLimits):
    """The endpoint's limits: those on each chat request plus overload behaviour."""

    max_queued_requests: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Requests an ingress replica lets wait for a busy model deployment; beyond it, 503 with "
        "Retry-After instead of an unbounded queue.",
    )
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After seconds on 503 answers.")
    request_timeout_s: float = Field(300.0, gt=0, le=3600, description="Longest a request may wait for the model.")


class AuthSpec(Strict):
    api_keys: list[str] = Field(
        default_factory=list,
        max_length=1024,
        description=f"Accepted Bearer keys; {API_KEYS_ENV} (comma-separated) adds more. Any key set makes every "
        "/v1 route require one.",
    )


DEFAULT_BATCH_STORAGE = "gemma-unified-batches"


def _batch_resources() -> ResourcesSpec:
    return ResourcesSpec(replicas=1)


class BatchSpec(Strict):
    """/v1/files and /v1/batches: where uploads and batch records live, which cluster runs batch jobs, and limits."""

    storage_url: str = Field(
        default_factory=lambda: os.path.abspath(DEFAULT_BATCH_STORAGE),
        min_length=1,
        max_length=4096,
        description="fsspec URL under which files (files/), batch records and each batch job's output (batches/) "
        "live; every ingress replica and the batch jobs must reach it. Default: ./gemma-unified-batches where the "
        "spec is loaded (a relative local path is made absolute there), which suits one machine only; use object "
        "storage (s3://bucket/batches) on a cluster.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for storage_url (endpoint_url, ...), given to the jobs too."
    )
    ray_address: str | None = Field(
        None,
        max_length=1024,
        description="Job submission address of the cluster batch jobs run on (http://HEAD:8265). Unset: the "
        "cluster the endpoint runs on, whose dashboard address Ray reads from its GCS (the head needs the "
        "dashboard); RAY_API_SERVER_ADDRESS in the replicas' environment overrides that lookup.",
    )
    max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, le=100 * 1024**3, description="Largest upload; larger files get 413."
    )
    max_lines_per_batch: int = Field(
        50_000, ge=1, le=10_000_000, description="Requests (lines) in one batch input file; more get 400."
    )
    max_concurrent_batches_per_key: int = Field(
        4,
        ge=1,
        le=10_000,
        description="Batches one API key may have unfinished (validating, in_progress, finalizing, cancelling); "
        "one more gets 429.",
    )
    resources: ResourcesSpec = Field(
        default_factory=_batch_resources,
        description="The batch job's model actors and CPU tasks (as a job file's `resources`; `address` is "
        "ignored: jobs run where ray_address points). Batch actors are apart from the endpoint's model replicas, "
        "so size the cluster for both.",
    )

    @field_validator("storage_url")
    @classmethod
    def _absolute_local_path(cls, value: str) -> str:
        # Replicas and batch jobs run in other working directories: a relative path would name other folders.
        return value if "://" in value else os.path.abspath(value)

    @field_validator("resources")
    @classmethod
    def _no_address(cls, value: ResourcesSpec) -> ResourcesSpec:
        if value.address is not None:
            raise ValueError("resources.address does not apply to batch jobs: set batch.ray_address")
        return value


class HttpSpec(Strict):
    host: str = Field("0.0.0.0", min_length=1, max_length=255, description="Address the Serve proxy binds.")
    port: int = Field(8000, ge=1, le=65_535, description="Port of the Serve proxy.")
    proxy: Literal["serve", "haproxy"] = Field(
        "serve",
        description="serve: Ray Serve's HTTP proxy. haproxy: Ray's high-throughput mode, HAProxy straight to the "
        "ingress replicas and gRPC between replicas (RAY_SERVE_ENABLE_DIRECT_INGRESS=1, RAY_SERVE_ENABLE_HA_PROXY=1, "
        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1; the haproxy binary on every node): about 10 ms less per request. "
        "`gemma-unified serve` sets them for a Ray instance it starts; a cluster needs them in every node's "
        "environment before Ray starts.",
    )


class ServeSpec(Strict):
    model: ModelSpec = Field(default_factory=ModelSpec, description="Which model (same block as in batch jobs).")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Which engine and how it runs the model.")
    media: MediaSpec = Field(
        default_factory=MediaSpec, description="Image token budget, pixel and audio duration limits, audio windows."
    )
    served_model_name: str | None = Field(
        None, min_length=1, max_length=256, description="Name clients pass as `model`; model.name when unset."
    )
    app_name: str = Field("gemma-unified", min_length=1, max_length=128, description="Serve application name.")
    route_prefix: str = Field("/", min_length=1, max_length=256, pattern=r"^/", description="URL prefix of the app.")
    autoscaling: DeploymentAutoscaling = Field(
        default_factory=DeploymentAutoscaling, description="Replica counts and scaling of each deployment."
    )
    resources: DeploymentResources = Field(default_factory=DeploymentResources, description="CPUs/GPUs per replica.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="How the model replica batches.")
    sampling: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="Sampling for chat requests that leave a setting unset."
    )
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Request limits and overload behaviour.")
    auth: AuthSpec = Field(default_factory=AuthSpec, description="Optional Bearer API keys.")
    remote_media: RemoteMediaSpec = Field(
        default_factory=RemoteMediaSpec, description="Which image URLs beyond data: URLs may be fetched."
    )
    batch: BatchSpec = Field(
        default_factory=BatchSpec, description="/v1/files and /v1/batches: storage, the batch jobs' cluster, limits."
    )
    http: HttpSpec = Field(default_factory=HttpSpec, description="Where `gemma-unified serve` listens.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", description="Serve replica logs.")

    @model_validator(mode="after")
    def _consistent(self) -> ServeSpec:
        model_concurrency = self.autoscaling.model.max_ongoing_requests
        if self.engine.kind == "transformers" and model_concurrency < self.batching.max_batch_size:
            # A replica never sees more requests at once than this, so it could never fill a batch.
            raise ValueError("autoscaling.model.max_ongoing_requests must be >= batching.max_batch_size")
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model.name

    @property
    def chat(self) -> ChatSpec:
        """How chat requests are read, as batch jobs submitted here read their lines."""
        limits = self.limits.model_dump(include=set(ChatLimits.model_fields))
        return ChatSpec(served_model_name=self.model_id, sampling=self.sampling, limits=ChatLimits(**limits))


def build_spec(data: dict, overrides: dict | None = None, source: str = "serve spec") -> ServeSpec:
    """A ServeSpec from a mapping plus overrides (nested dicts; None values leave the field alone)."""
    return build_config(ServeSpec, data, overrides, source)


def load_spec(path: str | Path | None, overrides: dict | None = None) -> ServeSpec:
    return load_spec_file(ServeSpec, path, overrides, "serve", "model, engine, media, autoscaling, limits, ...")
