"""KubeRay objects rendered from the specs: RayService, RayJob, the batch RayCluster, the scheduler's ConfigMap,
volume claim and CronJob, and a storage Secret template."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import version

import yaml

from jobs.deploy.cluster import CACHE_MOUNT, CONFIG_MOUNT, METRICS_PORT, ClusterSpec, PodSize
from jobs.deploy.serve_config import node_env, serve_config
from jobs.deploy.sizing import GroupSize, batch_groups, job_groups, serve_groups
from jobs.deploy.specs import ServeSpec, cluster_job_spec, looks_secret, refuse_secrets
from jobs.schedules import ScheduleFile
from pipelines.config import JobSpec

STATE_MOUNT = "/var/lib/gemma-unified"
DASHBOARD_PORT = 8265
# Ray's defaults for the autoscaler's and the dashboard's own metrics, served from the head pod.
AUTOSCALER_METRICS_PORT = 44217
DASHBOARD_METRICS_PORT = 44227


# ---- pod templates ----


def _labels(cluster: ClusterSpec, component: str) -> dict:
    return {"app.kubernetes.io/name": cluster.name, "app.kubernetes.io/component": component}


def _metadata(cluster: ClusterSpec, name: str, component: str) -> dict:
    return {"name": name, "namespace": cluster.namespace, "labels": _labels(cluster, component)}


def _resources(size: PodSize, gpus: int = 0, gpu_resource: str = "") -> dict:
    amounts = {"cpu": str(size.cpus), "memory": size.memory}
    if gpus:
        amounts[gpu_resource] = str(gpus)
    # requests == limits: Guaranteed QoS, so a busy node never evicts a model replica first.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _cache_volume(cluster: ClusterSpec) -> dict:
    if cluster.cache_host_path:
        return {"name": "model-cache", "hostPath": {"path": cluster.cache_host_path, "type": "DirectoryOrCreate"}}
    return {"name": "model-cache", "emptyDir": {"sizeLimit": cluster.cache_size}}


def _ray_pod(
    cluster: ClusterSpec,
    *,
    container: str,
    image: str,
    size: PodSize,
    ports: list[dict],
    gpus: int = 0,
    cache: bool = True,
    extra_env: dict[str, str] | None = None,
) -> dict:
    env = [{"name": "GEMMA_UNIFIED_CACHE", "value": f"{CACHE_MOUNT}/gemma-unified"}] if cache else []
    env += [{"name": name, "value": value} for name, value in (extra_env or {}).items()]
    mounts = [{"name": "shared-mem", "mountPath": "/dev/shm"}]
    # Ray's object store lives in /dev/shm, which container runtimes cap at 64 MiB unless it is a memory volume.
    volumes = [{"name": "shared-mem", "emptyDir": {"medium": "Memory"}}]
    if cache:
        mounts.append({"name": "model-cache", "mountPath": CACHE_MOUNT})
        volumes.append(_cache_volume(cluster))
    spec: dict = {
        "containers": [
            {
                "name": container,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                **({"env": env} if env else {}),
                "envFrom": [{"secretRef": {"name": cluster.storage_secret}}],
                "ports": ports,
                "resources": _resources(size, gpus, getattr(size, "gpu_resource", "")),
                "volumeMounts": mounts,
                "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
            }
        ],
        "volumes": volumes,
    }
    if gpus:
        gpu_pod = cluster.gpu_worker
        spec["tolerations"] = [{"key": gpu_pod.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
        if gpu_pod.node_selector:
            spec["nodeSelector"] = dict(gpu_pod.node_selector)
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT)}
    return {"metadata": {"annotations": annotations}, "spec": spec}


def _port(name: str, number: int) -> dict:
    return {"name": name, "containerPort": number}


def ray_cluster_spec(
    cluster: ClusterSpec,
    cpu: GroupSize,
    gpu: GroupSize | None,
    *,
    serve_port: int | None = None,
    autoscaling: bool = True,
    env: dict[str, str] | None = None,
) -> dict:
    """KubeRay's RayClusterSpec: a CPU head that runs no tasks, a CPU worker group and (if needed) a GPU group."""
    head_ports = [
        _port("gcs-server", 6379),
        _port("dashboard", DASHBOARD_PORT),
        _port("client", 10001),
        _port("metrics", METRICS_PORT),
        _port("as-metrics", AUTOSCALER_METRICS_PORT),
        _port("dash-metrics", DASHBOARD_METRICS_PORT),
    ]
    if serve_port is not None:
        head_ports.append(_port("serve", serve_port))
    worker_ports = [_port("metrics", METRICS_PORT)]

    def worker_group(name: str, group: GroupSize, image: str, size: PodSize, gpus: int = 0) -> dict:
        return {
            "groupName": name,
            "replicas": group.initial,
            "minReplicas": group.min,
            "maxReplicas": group.max,
            "rayStartParams": {"num-cpus": str(group.ray_cpus), "metrics-export-port": str(METRICS_PORT)},
            "template": _ray_pod(
                cluster, container="ray-worker", image=image, size=size, ports=worker_ports, gpus=gpus, extra_env=env
            ),
        }

    workers = [worker_group("cpu", cpu, cluster.image, cluster.cpu_worker)]
    if gpu is not None:
        workers.append(worker_group("gpu", gpu, cluster.gpu_image, cluster.gpu_worker, cluster.gpu_worker.gpus))
    spec = {
        "rayVersion": version("ray"),
        "enableInTreeAutoscaling": autoscaling,
        "headGroupSpec": {
            # num-cpus 0: the head keeps the GCS, the Serve controller and job drivers, never tasks or replicas.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
            "template": _ray_pod(
                cluster,
                container="ray-head",
                image=cluster.image,
                size=cluster.head,
                ports=head_ports,
                cache=False,
                extra_env=env,
            ),
        },
        "workerGroupSpecs": workers,
    }
    if autoscaling:
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": cluster.idle_timeout_s}
    return spec


# ---- Kubernetes objects ----


def ray_service(spec: ServeSpec, cluster: ClusterSpec) -> dict:
    """The online endpoint: Serve config from the spec, autoscaled CPU and GPU groups sized from its deployments."""
    cpu, gpu = serve_groups(spec, cluster)
    config = serve_config(spec)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(cluster, cluster.name, "endpoint"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(cluster, cpu, gpu, serve_port=spec.http.port, env=node_env(spec)),
        },
    }


def job_name(cluster: ClusterSpec, stem: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in stem.lower()).strip("-") or "job"
    return f"{cluster.name}-{slug}"[:63].rstrip("-")


def ray_job(job: JobSpec, cluster: ClusterSpec, name: str) -> dict:
    """One batch job on a cluster of its own (deleted an hour after the job ends), with `gemma-unified submit`'s
    entrypoint and runtime environment."""
    from pipelines.submission import ENTRYPOINT, runtime_env

    job = cluster_job_spec(job, name)
    cpu, gpu = job_groups(job, cluster)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(cluster, name, "batch"),
        "spec": {
            "entrypoint": ENTRYPOINT,
            "runtimeEnvYAML": yaml.safe_dump(runtime_env(job), sort_keys=False, width=1_000_000),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "backoffLimit": 0,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": ray_cluster_spec(cluster, cpu, gpu),
        },
    }


def batch_cluster_name(cluster: ClusterSpec) -> str:
    return f"{cluster.name}-batch"


def batch_dashboard_url(cluster: ClusterSpec) -> str:
    # KubeRay names the head Service <cluster>-head-svc.
    return f"http://{batch_cluster_name(cluster)}-head-svc.{cluster.namespace}.svc.cluster.local:{DASHBOARD_PORT}"


def batch_ray_cluster(jobs: Iterable[JobSpec], cluster: ClusterSpec) -> dict:
    """A long-lived, autoscaled cluster for scheduled runs and `gemma-unified submit`."""
    cpu, gpu = batch_groups(jobs, cluster)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": _metadata(cluster, batch_cluster_name(cluster), "batch"),
        "spec": ray_cluster_spec(cluster, cpu, gpu),
    }


def cluster_schedules(schedule_file: ScheduleFile, cluster: ClusterSpec) -> dict:
    """The schedules file as the CronJob reads it: jobs inline, runs on the batch cluster, history on the volume."""
    entries = []
    for schedule in schedule_file.schedules:
        refuse_secrets([f"env.{k}" for k in schedule.entry.env if looks_secret(k)], schedule.source)
        entry = schedule.entry.model_dump(mode="json", exclude_defaults=True)
        job = cluster_job_spec(schedule.job, schedule.source)
        entry.update(address=batch_dashboard_url(cluster), job=job.model_dump(mode="json", exclude_defaults=True))
        entries.append(entry)
    return {"state": f"{STATE_MOUNT}/schedules.db", "schedules": entries}


def scheduler_objects(schedule_file: ScheduleFile, cluster: ClusterSpec) -> list[dict]:
    """ConfigMap (the schedules), PVC (their run history) and the CronJob running `schedule --once`."""
    config_name, state_name = f"{cluster.name}-schedules", f"{cluster.name}-scheduler-state"
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(cluster, config_name, "scheduler"),
        "data": {"schedules.yaml": yaml.safe_dump(cluster_schedules(schedule_file, cluster), sort_keys=False)},
    }
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(cluster, state_name, "scheduler"),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    container = {
        "name": "scheduler",
        "image": cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["gemma-unified", "schedule", f"{CONFIG_MOUNT}/schedules.yaml", "--once"],
        "envFrom": [{"secretRef": {"name": cluster.storage_secret}}],
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [
            {"name": "schedules", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "state", "mountPath": STATE_MOUNT},
        ],
    }
    cron_job = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _metadata(cluster, f"{cluster.name}-scheduler", "scheduler"),
        "spec": {
            "schedule": cluster.scheduler_cron,
            # One scheduler at a time: the history volume is ReadWriteOnce, and --once waits for its runs.
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 300,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 0,
                    "template": {
                        "metadata": {"labels": _labels(cluster, "scheduler")},
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [container],
                            "volumes": [
                                {"name": "schedules", "configMap": {"name": config_name}},
                                {"name": "state", "persistentVolumeClaim": {"claimName": state_name}},
                            ],
                        },
                    },
                }
            },
        },
    }
    return [config_map, claim, cron_job]


def storage_secret(cluster: ClusterSpec) -> dict:
    """A template: fill in the values (or create the Secret with kubectl) before the first deploy."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(cluster, cluster.storage_secret, "storage"),
        "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": "REPLACE_ME", "AWS_SECRET_ACCESS_KEY": "REPLACE_ME"},
    }
