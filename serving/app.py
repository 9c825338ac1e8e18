"""The Ray Serve application: ingress (FastAPI) -> model deployment, configured from one ServeSpec.

`build_app(spec)` is what `gemma-unified serve` runs; `app_builder` is the import path for Serve's own config
file (`serve deploy serve_config.yaml` with `import_path: serving.app:app_builder`), where `args` holds either
`config: path/to/serve.yaml` or the spec inline under `spec:`.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from pipelines.cluster import connect as join_or_start
from pipelines.environment import forwarded_env  # API keys travel as digests, never as plain env values
from pipelines.preflight import cluster_address
from serving.auth import Authenticator, configured_digests
from serving.routing import ROUTER_CLASS, ROUTING_STATS_PERIOD_S
from serving.spec import ServeSpec, build_spec, load_spec

INGRESS_NAME = "Ingress"
MODEL_NAME = "Model"


class Ingress:
    def __init__(self, spec: dict, model, key_digests: list[str]) -> None:
        from ray.serve import get_replica_context

        from pipelines.model_sources import load_tokenizer
        from serving.metrics import Metrics
        from serving.model_client import ServeModelBackend
        from serving.router import build_api

        config = ServeSpec.model_validate(spec)
        try:
            replica = get_replica_context().replica_id.unique_id
        except Exception:
            replica = "local"
        metrics = Metrics(replica)
        backend = ServeModelBackend(
            model, metrics, retry_after_s=config.limits.retry_after_s, timeout_s=config.limits.request_timeout_s
        )
        # Keys from this replica's own environment count too (runtime_env of `serve deploy`).
        authenticator = Authenticator(set(key_digests) | configured_digests([]))
        self._api = build_api(
            config, backend, load_tokenizer(config.model), authenticator=authenticator, metrics=metrics
        )

    def __serve_build_asgi_app__(self):
        return self._api


def _model_gpus(spec: ServeSpec) -> float:
    if spec.resources.model.num_gpus is not None:
        return spec.resources.model.num_gpus
    if spec.engine.device == "cpu":
        return 0
    if spec.engine.device == "cuda" or spec.engine.kind == "vllm":
        return 1
    import ray

    return 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0


def build_app(spec: ServeSpec):
    """The bound Serve application for a spec (ingress bound to the model deployment)."""
    from serving.model_server import ModelServer

    payload = spec.model_dump(mode="json", exclude={"auth"})  # keys reach replicas as digests only
    env = {"env_vars": forwarded_env()}
    model_scaling, ingress_scaling = spec.autoscaling.model, spec.autoscaling.ingress
    backpressure = BackpressureConfig(status_code=503, retry_after_s=spec.limits.retry_after_s)
    model = serve.deployment(ModelServer).options(
        name=MODEL_NAME,
        autoscaling_config=model_scaling.serve_config(),
        max_ongoing_requests=model_scaling.max_ongoing_requests,
        max_queued_requests=spec.limits.max_queued_requests,
        ray_actor_options={
            "num_cpus": spec.resources.model.num_cpus,
            "num_gpus": _model_gpus(spec),
            "runtime_env": env,
        },
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
        # Replicas come up before their model has loaded: requests go to loaded ones while there are any.
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S
        ),
    )
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name=INGRESS_NAME,
        autoscaling_config=ingress_scaling.serve_config(),
        max_ongoing_requests=ingress_scaling.max_ongoing_requests,
        # Past this, Serve's proxy itself answers 503 + Retry-After rather than queueing without bound.
        max_queued_requests=max(ingress_scaling.max_ongoing_requests, spec.limits.max_queued_requests),
        backpressure_config=backpressure,
        ray_actor_options={
            "num_cpus": spec.resources.ingress.num_cpus,
            "num_gpus": spec.resources.ingress.num_gpus or 0,
            "runtime_env": env,
        },
    )
    digests = sorted(configured_digests(spec.auth.api_keys))
    return ingress.bind(payload, model.bind(payload), digests)


def app_builder(args: dict):
    """Serve's application builder: `args` is `{config: path}` or `{spec: {...}}` (both: the spec overrides)."""
    args = dict(args or {})
    inline = args.pop("spec", None) or {}
    path = args.pop("config", None)
    if args:
        raise ValueError(f"unknown application args {sorted(args)}: use `config` and/or `spec`")
    spec = load_spec(path, inline) if path else build_spec(inline, source="application args")
    return build_app(spec)


# Ray's high-throughput mode (its KubeRay guide pairs the two): HAProxy straight to the ingress replicas, and gRPC
# between replicas with Serve's router and the user code on each replica's own event loop.
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}


def connect(spec: ServeSpec, address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join a cluster (address, or RAY_ADDRESS) or start a local instance set up for the spec's proxy."""
    import ray

    if not ray.is_initialized() and spec.http.proxy == "haproxy" and not cluster_address(address):
        # Serve's controller and replicas read these when they start; a local instance inherits this environment.
        os.environ.update(HAPROXY_ENV)
    join_or_start(address, num_cpus=num_cpus)


def start(spec: ServeSpec, *, blocking: bool = False):
    """Start Serve's HTTP proxy on the spec's host and port and deploy the app; returns the ingress handle."""
    serve.start(
        http_options={"host": spec.http.host, "port": spec.http.port}, logging_config={"log_level": spec.log_level}
    )
    return serve.run(
        build_app(spec),
        name=spec.app_name,
        route_prefix=spec.route_prefix,
        blocking=blocking,
        logging_config={"log_level": spec.log_level},
    )
