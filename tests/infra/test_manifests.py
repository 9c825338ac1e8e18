"""The rendered manifests are valid for the CRD and Kubernetes versions named in tests/infra/data/README.md, and say
what the specs they came from say: replica bounds, per-replica resources, model settings, credentials."""

from __future__ import annotations

import math

import pytest
import yaml
from schema_check import crd_errors, crd_schema, manifest_errors, subschema


def test_every_manifest_parses_and_is_a_known_kind(rendered, manifests):
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            assert list(yaml.safe_load_all(text)), path
    assert set(manifests) == {
        "RayService",
        "RayJob",
        "RayCluster",
        "ConfigMap",
        "PersistentVolumeClaim",
        "CronJob",
        "Secret",
    }


@pytest.mark.parametrize(
    "kind", ["RayService", "RayJob", "RayCluster", "ConfigMap", "PersistentVolumeClaim", "CronJob", "Secret"]
)
def test_manifest_matches_its_published_schema(manifests, kind):
    assert manifest_errors(manifests[kind]) == []


def test_the_checker_rejects_fields_the_crd_does_not_have(manifests):
    import copy

    service = copy.deepcopy(manifests["RayService"])
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    service["spec"]["serveConfig"] = "old field name"
    errors = manifest_errors(service)
    assert any("maxReplica:" in e for e in errors)
    assert any("imagePullPolicyy" in e for e in errors)
    assert any("spec.serveConfig:" in e for e in errors)
    job = copy.deepcopy(manifests["RayJob"])
    job["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["name"]
    errors = manifest_errors(job)
    assert any("'Fast' is not one of" in e for e in errors)
    assert any("V1Container" in e and "name" in e for e in errors)
    cron = copy.deepcopy(manifests["CronJob"])
    cron["spec"]["concurrency"] = "Forbid"
    assert any("concurrency: not a field of V1CronJobSpec" in e for e in manifest_errors(cron))


def test_old_rayservice_crd_requirements_hold_too():
    # This CRD version requires rayStartParams on every worker group; the rendered groups always carry them.
    schema = subschema(crd_schema("ray.io_rayservices.yaml"), "spec", "rayClusterConfig", "workerGroupSpecs")
    errors = crd_errors([{"groupName": "g", "minReplicas": 0, "maxReplicas": 1, "template": {}}], schema, "w")
    assert errors == ["w[0].rayStartParams: required"]


def _groups(cluster_spec: dict) -> dict:
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_rayservice_serve_config_is_the_specs(manifests, serve_spec):
    from jobs.deploy.serve_config import serve_config
    from jobs.deploy.specs import cluster_serve_spec

    config = yaml.safe_load(manifests["RayService"]["spec"]["serveConfigV2"])
    assert config == serve_config(serve_spec)
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:app_builder"
    assert app["route_prefix"] == serve_spec.route_prefix and app["name"] == serve_spec.app_name
    assert config["http_options"]["port"] == serve_spec.http.port
    deployments = {d["name"]: d for d in app["deployments"]}
    for name, scaling, resources in (
        ("Model", serve_spec.autoscaling.model, serve_spec.resources.model),
        ("Ingress", serve_spec.autoscaling.ingress, serve_spec.resources.ingress),
    ):
        deployment = deployments[name]
        assert deployment["autoscaling_config"] == scaling.serve_config()
        assert deployment["max_ongoing_requests"] == scaling.max_ongoing_requests
        assert deployment["ray_actor_options"]["num_cpus"] == resources.num_cpus
        assert "runtime_env" not in deployment["ray_actor_options"]
    assert deployments["Model"]["ray_actor_options"]["num_gpus"] == 1
    # The embedded spec is the spec: the model, engine and limits the tests exercise locally.
    embedded = cluster_serve_spec(serve_spec).model_validate(app["args"]["spec"])
    assert embedded == cluster_serve_spec(serve_spec)
    assert embedded.model.name == serve_spec.model.name and embedded.engine == serve_spec.engine


def test_serve_config_is_what_rays_own_schema_accepts_and_what_the_app_builds(manifests):
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app_builder

    config = yaml.safe_load(manifests["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    built = {d.name: d for d in build_serve_app(app_builder(app["args"]), name=app["name"]).deployments}
    assert set(built) == {d["name"] for d in app["deployments"]}
    for deployment in app["deployments"]:
        live, scaling = built[deployment["name"]], deployment["autoscaling_config"]
        assert live._deployment_config.autoscaling_config.min_replicas == scaling["min_replicas"]
        assert live._deployment_config.autoscaling_config.max_replicas == scaling["max_replicas"]
        assert live.max_ongoing_requests == deployment["max_ongoing_requests"]
        assert live.ray_actor_options["num_gpus"] == deployment["ray_actor_options"]["num_gpus"]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"engine": {"device": "cpu"}, "resources": {"model": {"num_cpus": 2}, "ingress": {"num_cpus": 0.5}}},
        {
            "autoscaling": {
                "model": {"min_replicas": 0, "max_replicas": 3, "initial_replicas": 2},
                "ingress": {"max_replicas": 6, "max_ongoing_requests": 64},
            },
            "limits": {"max_queued_requests": 500, "retry_after_s": 3},
            "resources": {"ingress": {"num_gpus": 0.25}},
        },
    ],
)
def test_rendered_deployments_are_the_options_build_app_sets(fields):
    """The config's deployment entries, built from the spec on Serve's public schema, carry exactly the options
    that `serving.app.build_app` sets on the deployments it binds for the same spec (less the runtime_env, which
    pods take from the storage Secret)."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.deployment import deployment_to_schema

    from jobs.deploy.serve_config import deployments
    from jobs.deploy.specs import cluster_serve_spec
    from serving.app import build_app
    from serving.spec import build_spec

    spec = cluster_serve_spec(build_spec(fields))
    built = []
    for live in build_serve_app(build_app(spec), name=spec.app_name).deployments:
        options = deployment_to_schema(live).model_dump(mode="json", exclude_unset=True)
        options["ray_actor_options"].pop("runtime_env")
        built.append(options)
    assert deployments(spec) == built


def test_rayservice_worker_groups_follow_the_deployments_replica_bounds(manifests, serve_spec, cluster):
    spec = manifests["RayService"]["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = _groups(spec)
    model, ingress = serve_spec.autoscaling.model, serve_spec.autoscaling.ingress
    gpu = groups["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (model.min_replicas, model.max_replicas)  # one GPU per replica
    assert _limits(gpu)[cluster.gpu_worker.gpu_resource] == "1"
    assert gpu["rayStartParams"]["num-cpus"] == str(math.ceil(serve_spec.resources.model.num_cpus))
    cpu = groups["cpu"]
    per_pod = cluster.cpu_worker.cpus // int(serve_spec.resources.ingress.num_cpus)
    assert cpu["maxReplicas"] == math.ceil(ingress.max_replicas / per_pod)
    assert cpu["minReplicas"] == math.ceil(ingress.min_replicas / per_pod)
    assert cluster.gpu_worker.gpu_resource not in _limits(cpu)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["rayVersion"] == _constraint("ray")


def _constraint(package: str) -> str:
    from infra_paths import REPO

    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def test_rayjob_runs_the_submitted_spec_on_a_cluster_sized_by_its_resources(manifests, job_spec, cluster):
    from jobs.deploy.specs import cluster_job_spec
    from pipelines.config import JobSpec
    from pipelines.submission import ENTRYPOINT, SPEC_ENV, runtime_env

    spec = manifests["RayJob"]["spec"]
    assert spec["entrypoint"] == ENTRYPOINT
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env == runtime_env(cluster_job_spec(job_spec))
    shipped = JobSpec.model_validate_json(env["env_vars"][SPEC_ENV])
    assert shipped.fingerprint() == job_spec.fingerprint()  # same output content as a local run
    assert shipped.resources.address is None and shipped.resources.gpus_per_replica == 1
    groups = _groups(spec["rayClusterSpec"])
    resources = job_spec.resources
    assert groups["gpu"]["minReplicas"] == groups["gpu"]["maxReplicas"] == resources.replicas
    assert groups["cpu"]["maxReplicas"] == math.ceil(resources.prepare_concurrency / cluster.cpu_worker.cpus)
    assert spec["shutdownAfterJobFinishes"] is True


def test_scheduler_reads_the_schedules_with_runs_on_the_batch_cluster(manifests, tmp_path, cluster):
    from infra_paths import RENDER_ARGS

    from jobs.deploy.kuberay import batch_dashboard_url
    from jobs.deploy.specs import cluster_job_spec
    from jobs.schedules import load_schedules

    text = manifests["ConfigMap"]["data"]["schedules.yaml"]
    (tmp_path / "schedules.yaml").write_text(text)
    loaded = load_schedules(tmp_path / "schedules.yaml", check_clusters=False)
    original = load_schedules(RENDER_ARGS["schedules_file"], check_clusters=False)
    assert [s.name for s in loaded.schedules] == [s.name for s in original.schedules]
    for mine, theirs in zip(loaded.schedules, original.schedules):
        assert mine.entry.address == batch_dashboard_url(cluster)
        assert (mine.entry.cron, mine.entry.timezone) == (theirs.entry.cron, theirs.entry.timezone)
        assert mine.job == cluster_job_spec(theirs.job)
    assert str(loaded.state) == "/var/lib/gemma-unified/schedules.db"
    cron = manifests["CronJob"]["spec"]
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        volumes[mounts["/var/lib/gemma-unified"]]["persistentVolumeClaim"]["claimName"]
        == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert volumes[mounts["/etc/gemma-unified"]]["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    assert cron["concurrencyPolicy"] == "Forbid"
    batch = manifests["RayCluster"]
    assert batch_dashboard_url(cluster).startswith(f"http://{batch['metadata']['name']}-head-svc.")
    gpu = _groups(batch["spec"])["gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] == max(s.job.resources.replicas for s in original.schedules)


def _ray_containers(manifests):
    for kind, key in (("RayService", "rayClusterConfig"), ("RayJob", "rayClusterSpec"), ("RayCluster", None)):
        spec = manifests[kind]["spec"]
        spec = spec[key] if key else spec
        yield kind, "head", spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            yield kind, group["groupName"], group["template"]


def test_every_pod_gets_storage_credentials_from_the_secret(manifests):
    secret = manifests["Secret"]["metadata"]["name"]
    templates = [t for _, _, t in _ray_containers(manifests)]
    templates.append(manifests["CronJob"]["spec"]["jobTemplate"]["spec"]["template"])
    for template in templates:
        for container in template["spec"]["containers"]:
            assert {"secretRef": {"name": secret}} in container["envFrom"]
            assert not any(e.get("name", "").startswith("AWS_") for e in container.get("env", []))


def test_workers_mirror_weights_onto_node_local_disk(manifests, cluster):
    for kind, group, template in _ray_containers(manifests):
        if group == "head":
            continue
        container = template["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["GEMMA_UNIFIED_CACHE"].startswith(mounts["model-cache"] + "/"), (kind, group)
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == "model-cache")
        assert volume == {
            "name": "model-cache",
            "hostPath": {"path": cluster.cache_host_path, "type": "DirectoryOrCreate"},
        }


def test_gpu_pods_run_the_gpu_image_and_cpu_pods_the_cpu_image(manifests, cluster):
    for kind, group, template in _ray_containers(manifests):
        image = template["spec"]["containers"][0]["image"]
        assert image == (cluster.gpu_image if group == "gpu" else cluster.image), (kind, group)


def test_no_credentials_from_the_rendering_machine_leak(monkeypatch, serve_spec, job_spec, cluster):
    from jobs.deploy.kuberay import ray_job, ray_service

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship-me")
    monkeypatch.setenv("HF_TOKEN", "do-not-ship-me-either")
    text = yaml.safe_dump([ray_service(serve_spec, cluster), ray_job(job_spec, cluster, "j")])
    assert "do-not-ship-me" not in text


def test_head_exposes_rays_metrics_ports(manifests):
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    for _kind, group, template in _ray_containers(manifests):
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == int(template["metadata"]["annotations"]["prometheus.io/port"])
        if group == "head":
            assert (ports["as-metrics"], ports["dash-metrics"]) == (AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT)


def test_http_proxy_haproxy_starts_every_node_in_rays_high_throughput_mode(serve_spec, cluster):
    """The endpoint's settings reach every Ray node (head, CPU and GPU workers; on VMs every container) before Ray
    starts, and they are the ones `gemma-unified serve` sets for a Ray instance it starts."""
    from jobs.deploy import kuberay, vm
    from jobs.deploy.serve_config import HAPROXY_ENV, node_env
    from jobs.deploy.sizing import serve_groups
    from serving.app import HAPROXY_ENV as STARTED_LOCALLY

    assert HAPROXY_ENV == STARTED_LOCALLY
    fast = serve_spec.model_copy(update={"http": serve_spec.http.model_copy(update={"proxy": "haproxy"})})
    assert node_env(serve_spec) == {} and node_env(fast) == HAPROXY_ENV

    def pods(spec) -> list[dict]:
        config = kuberay.ray_service(spec, cluster)["spec"]["rayClusterConfig"]
        groups = [config["headGroupSpec"], *config["workerGroupSpecs"]]
        return [{e["name"]: e["value"] for e in g["template"]["spec"]["containers"][0].get("env", [])} for g in groups]

    assert len(pods(fast)) == 3 and all(HAPROXY_ENV.items() <= env.items() for env in pods(fast))
    assert not any(HAPROXY_ENV.keys() & env.keys() for env in pods(serve_spec))
    cpu, gpu = serve_groups(fast, cluster)
    options = vm.launcher_config(cluster, cpu, gpu, env=node_env(fast))["docker"]["run_options"]
    assert all(f"--env {name}={value}" in options for name, value in HAPROXY_ENV.items())
