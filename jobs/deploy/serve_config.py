"""Ray Serve's config file for the endpoint (RayService `serveConfigV2`, `serve deploy` on VMs), built from the
serve spec and checked against Serve's public config schema.

Serve builds the application on the cluster from `import_path` and `args` (the spec itself); the `deployments`
entries restate, from the same spec, the options that `serving.app.build_app` gives each deployment, so the
config file says what the cluster runs. The infra tests hold these entries against the deployments `build_app`
makes for the same spec.
"""

from __future__ import annotations

from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from jobs.deploy.cluster import RenderError
from jobs.deploy.specs import ServeSpec, cluster_serve_spec

SERVE_IMPORT_PATH = "serving.app:app_builder"
# serving.app's deployment names (MODEL_NAME, INGRESS_NAME): the ingress calls the model by name.
MODEL_DEPLOYMENT = "Model"
INGRESS_DEPLOYMENT = "Ingress"
# serving.routing's request router for the model deployment and its routing-stats period.
MODEL_ROUTER_CLASS = "serving.routing.LoadedReplicasFirst"
MODEL_ROUTING_STATS_PERIOD_S = 1.0
# serving.app's HAPROXY_ENV: what every Ray node needs in its environment, before Ray starts, for `http.proxy: haproxy`.
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}


def node_env(spec: ServeSpec) -> dict[str, str]:
    """Environment every Ray node of the endpoint's cluster starts with."""
    return dict(HAPROXY_ENV) if spec.http.proxy == "haproxy" else {}


def _deployment(**options) -> dict:
    """One deployment's options as Serve's schema normalises them, with only the options given."""
    return DeploymentSchema(**options).model_dump(mode="json", exclude_unset=True)


def deployments(spec: ServeSpec) -> list[dict]:
    """The model deployment, then the ingress bound to it: names, autoscaling, queues and replica resources.
    Replicas get their environment from the cluster (the storage Secret), so no runtime_env is written."""
    model_scaling, ingress_scaling = spec.autoscaling.model, spec.autoscaling.ingress
    model = _deployment(
        name=MODEL_DEPLOYMENT,
        max_ongoing_requests=model_scaling.max_ongoing_requests,
        max_queued_requests=spec.limits.max_queued_requests,
        autoscaling_config=AutoscalingConfig(**model_scaling.serve_config()),
        graceful_shutdown_timeout_s=30,
        health_check_period_s=10,
        health_check_timeout_s=60,
        request_router_config={
            "request_router_class": MODEL_ROUTER_CLASS,
            "request_routing_stats_period_s": MODEL_ROUTING_STATS_PERIOD_S,
        },
        ray_actor_options={"num_cpus": spec.resources.model.num_cpus, "num_gpus": spec.resources.model.num_gpus},
    )
    ingress = _deployment(
        name=INGRESS_DEPLOYMENT,
        max_ongoing_requests=ingress_scaling.max_ongoing_requests,
        # Past this, Serve's proxy itself answers 503 + Retry-After rather than queueing without bound.
        max_queued_requests=max(ingress_scaling.max_ongoing_requests, spec.limits.max_queued_requests),
        backpressure_config={"status_code": 503, "retry_after_s": spec.limits.retry_after_s},
        autoscaling_config=AutoscalingConfig(**ingress_scaling.serve_config()),
        ray_actor_options={
            "num_cpus": spec.resources.ingress.num_cpus,
            "num_gpus": spec.resources.ingress.num_gpus or 0,
        },
    )
    return [model, ingress]


def serve_config(spec: ServeSpec) -> dict:
    """Ray Serve's config file for the endpoint: one application, GPUs per model replica decided up front."""
    spec = cluster_serve_spec(spec)
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.http.host, "port": spec.http.port},
        "logging_config": {"log_level": spec.log_level},
        "applications": [
            {
                "name": spec.app_name,
                "route_prefix": spec.route_prefix,
                "import_path": SERVE_IMPORT_PATH,
                "args": {"spec": spec.model_dump(mode="json", exclude_defaults=True)},
                "deployments": deployments(spec),
            }
        ],
    }
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise RenderError(f"the Serve config does not validate: {exc}") from None
    return config
