"""Cluster manifests rendered from the project's own specs: KubeRay RayService / RayJob / RayCluster, the scheduler's
CronJob, a storage Secret template, and a Ray cluster-launcher config for VMs.

Autoscaling numbers, per-replica resources and model settings come from `ServeSpec`, `JobSpec` and the schedules
file; only the cluster's shape (images, pod sizes, node-local cache) comes from a `ClusterSpec`. Every function
returns plain dicts, so tests can hold each manifest against the spec it was rendered from.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Iterable

import yaml
from pydantic import Field, ValidationError

from jobs.schedules import ScheduleFile
from pipelines.config import JobSpec, Strict
from pipelines.errors import GemmaUnifiedError
from serving.spec import ServeSpec

PROJECT_VERSION = version("gemma-unified")
SERVE_IMPORT_PATH = "serving.app:app_builder"
CACHE_MOUNT = "/cache"
CONFIG_MOUNT = "/etc/gemma-unified"
STATE_MOUNT = "/var/lib/gemma-unified"
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
# Ray's defaults for the autoscaler's and the dashboard's own metrics, served from the head pod.
AUTOSCALER_METRICS_PORT = 44217
DASHBOARD_METRICS_PORT = 44227
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
DNS_LABEL = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"
# Storage-option and env names that hold credentials: those belong in the Secret, never in a rendered manifest.
_SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential", "api_key")


class RenderError(GemmaUnifiedError):
    """The specs cannot become cluster manifests as they stand (credentials inline, a replica larger than a pod)."""


class PodSize(Strict):
    cpus: int = Field(..., ge=1, le=512, description="CPU cores requested (and limited to) per pod.")
    memory: str = Field(..., pattern=QUANTITY, description="Memory per pod, a Kubernetes quantity such as 16Gi.")


class GpuPodSize(PodSize):
    gpus: int = Field(1, ge=1, le=16, description="GPUs per pod (one 16 GB-class card by default).")
    gpu_resource: str = Field("nvidia.com/gpu", min_length=1, description="Extended resource name of the GPUs.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels GPU pods must land on (e.g. the accelerator type)."
    )


class VmSpec(Strict):
    region: str = Field("us-west-2", min_length=1, description="AWS region of the cluster launcher's VMs.")
    head_instance: str = Field("m6i.xlarge", min_length=1, description="Head node instance type.")
    cpu_instance: str = Field("m6i.2xlarge", min_length=1, description="CPU worker instance type.")
    gpu_instance: str = Field("g4dn.2xlarge", min_length=1, description="GPU worker instance type (one T4, 16 GB).")
    disk_gb: int = Field(200, ge=50, le=16_000, description="Root volume per VM; mirrored model weights live here.")
    image_id: str | None = Field(
        None, description="AMI with Docker and an NVIDIA driver new enough for the GPU image's CUDA wheels. Unset: "
        "Ray's default Deep Learning AMI for the region, whose driver may be too old.")
    ssh_user: str = Field("ubuntu", min_length=1, description="Login user of the VM image.")


class ClusterSpec(Strict):
    name: str = Field("gemma-unified", pattern=DNS_LABEL, description="Prefix of every Kubernetes object name.")
    namespace: str = Field("default", pattern=DNS_LABEL, description="Namespace of the Kubernetes objects.")
    image: str = Field(f"gemma-unified:{PROJECT_VERSION}-cpu", min_length=1,
                       description="CPU image (infra/docker/Dockerfile.cpu): head, CPU workers, scheduler.")
    gpu_image: str = Field(f"gemma-unified:{PROJECT_VERSION}-gpu", min_length=1,
                           description="GPU image (infra/docker/Dockerfile.gpu): GPU workers.")
    storage_secret: str = Field("gemma-unified-storage", pattern=DNS_LABEL,
                                description="Secret whose keys (AWS_* ...) become every pod's environment.")
    head: PodSize = Field(default_factory=lambda: PodSize(cpus=2, memory="8Gi"), description="Head pod.")
    cpu_worker: PodSize = Field(default_factory=lambda: PodSize(cpus=4, memory="16Gi"),
                                description="CPU worker pods: tokenization, media decoding, the ingress.")
    gpu_worker: GpuPodSize = Field(default_factory=lambda: GpuPodSize(cpus=8, memory="32Gi"),
                                   description="GPU worker pods: one model replica per GPU.")
    max_cpu_workers: int = Field(8, ge=1, le=10_000,
                                 description="CPU worker ceiling for batch jobs that set no prepare_concurrency.")
    cache_host_path: str | None = Field(
        None, description="Node directory holding mirrored model weights, shared by the pods of a node (hostPath). "
        "Unset: an emptyDir per pod (allowed under the baseline Pod Security Standard).")
    cache_size: str = Field("200Gi", pattern=QUANTITY, description="Size limit of the emptyDir model cache.")
    idle_timeout_s: int = Field(600, ge=60, le=86_400, description="Idle time before the autoscaler removes a worker.")
    scheduler_cron: str = Field("*/5 * * * *", min_length=1,
                                description="How often the CronJob runs `gemma-unified schedule --once`.")
    vm: VmSpec = Field(default_factory=VmSpec, description="Cluster-launcher settings for VMs.")


def load_cluster(path: str | Path | None) -> ClusterSpec:
    if not path:
        return ClusterSpec()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return ClusterSpec.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise RenderError(f"{path}: cannot read the cluster file: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise RenderError(f"{path}: {problems}") from None


# ---- credentials stay out of manifests ----

def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered == "key" or any(marker in lowered for marker in _SECRET_MARKERS)


def _secret_paths(options: dict, where: str) -> list[str]:
    found = []
    for key, value in options.items():
        if _looks_secret(str(key)):
            found.append(f"{where}.{key}")
        elif isinstance(value, dict):
            found.extend(_secret_paths(value, f"{where}.{key}"))
    return found


def _refuse_secrets(found: list[str], source: str) -> None:
    if found:
        raise RenderError(
            f"{source}: {', '.join(found)} would be written into the manifests in clear text; put credentials in "
            "the storage Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GEMMA_UNIFIED_API_KEYS, ...) instead"
        )


# ---- specs as the cluster runs them ----

def model_gpus(spec: ServeSpec) -> float:
    """GPUs per model replica on a cluster: the spec's number, else 1 unless the engine is pinned to CPU."""
    if spec.resources.model.num_gpus is not None:
        return spec.resources.model.num_gpus
    return 0.0 if spec.engine.device == "cpu" else 1.0


def job_gpus(job: JobSpec) -> float:
    if job.resources.gpus_per_replica is not None:
        return job.resources.gpus_per_replica
    return 0.0 if job.engine.device == "cpu" else 1.0


def cluster_serve_spec(spec: ServeSpec, source: str = "serve spec") -> ServeSpec:
    """The spec with GPUs decided up front: a cluster whose GPU group is scaled to zero reports no GPUs."""
    found = [f"auth.api_keys[{i}]" for i, _ in enumerate(spec.auth.api_keys)]
    found += _secret_paths(spec.model.storage_options, "model.storage_options")
    found += _secret_paths(spec.remote_media.storage_options, "remote_media.storage_options")
    _refuse_secrets(found, source)
    model = spec.resources.model.model_copy(update={"num_gpus": model_gpus(spec)})
    resources = spec.resources.model_copy(update={"model": model})
    return spec.model_copy(update={"resources": resources})


def cluster_job_spec(job: JobSpec, source: str = "job spec") -> JobSpec:
    """The job as a cluster runs it: it joins the cluster it runs on, GPUs per replica decided up front."""
    found = []
    for section in ("input", "output", "model"):
        found += _secret_paths(getattr(job, section).storage_options, f"{section}.storage_options")
    _refuse_secrets(found, source)
    resources = job.resources.model_copy(update={"address": None, "gpus_per_replica": job_gpus(job)})
    return job.model_copy(update={"resources": resources})


def serve_config(spec: ServeSpec) -> dict:
    """Ray Serve's config file for the endpoint, built by the same `build_app` that `gemma-unified serve` runs."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.deployment import deployment_to_schema

    from serving.app import build_app

    spec = cluster_serve_spec(spec)
    deployments = []
    for deployment in build_serve_app(build_app(spec), name=spec.app_name).deployments:
        options = deployment_to_schema(deployment).model_dump(mode="json", exclude_unset=True)
        # build_app copies this machine's AWS_*/HF_* variables into runtime_env: pods get theirs from the Secret.
        options.get("ray_actor_options", {}).pop("runtime_env", None)
        deployments.append(options)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.http.host, "port": spec.http.port},
        "logging_config": {"log_level": spec.log_level},
        "applications": [{
            "name": spec.app_name,
            "route_prefix": spec.route_prefix,
            "import_path": SERVE_IMPORT_PATH,
            "args": {"spec": spec.model_dump(mode="json", exclude_defaults=True)},
            "deployments": deployments,
        }],
    }


# ---- worker group sizes ----

@dataclass(frozen=True)
class GroupSize:
    """Pods of one worker group; `ray_cpus` is what each pod advertises to Ray's scheduler."""

    initial: int
    min: int
    max: int
    ray_cpus: int


def per_pod(per_replica: float, per_pod_capacity: float, what: str) -> int:
    """Replicas that fit one pod; replicas needing none of the resource pack without limit."""
    if per_replica <= 0:
        return sys.maxsize
    fit = math.floor(per_pod_capacity / per_replica + 1e-9)
    if fit < 1:
        raise RenderError(f"{what} needs {per_replica:g} per replica but a pod has {per_pod_capacity:g}")
    return fit


def _pods(replicas: int, fit: int) -> int:
    return math.ceil(replicas / fit)


def _stacked(first: GroupSize, second: GroupSize) -> GroupSize:
    """Two kinds of replicas sharing one group, each packed on pods of its own."""
    return GroupSize(first.initial + second.initial, first.min + second.min, first.max + second.max,
                     max(first.ray_cpus, second.ray_cpus))


def _scaled(autoscaling, fit: int, ray_cpus: int) -> GroupSize:
    initial = autoscaling.initial_replicas if autoscaling.initial_replicas is not None else autoscaling.min_replicas
    return GroupSize(_pods(initial, fit), _pods(autoscaling.min_replicas, fit), _pods(autoscaling.max_replicas, fit),
                     ray_cpus)


def _gpu_pod_fit(gpus: float, cpus: float, pod: GpuPodSize, what: str) -> tuple[int, int]:
    """Replicas per GPU pod, and the CPUs the pod advertises: only what those replicas reserve, so that CPU work
    (tokenization, media decoding) lands on the CPU group."""
    fit = per_pod(gpus, pod.gpus, f"a {what} (GPUs)")
    ray_cpus = max(1, math.ceil(fit * cpus))
    if ray_cpus > pod.cpus:
        raise RenderError(f"{fit} {what}(s) per GPU pod reserve {ray_cpus} CPUs; gpu_worker.cpus is {pod.cpus}")
    return fit, ray_cpus


def serve_groups(spec: ServeSpec, cluster: ClusterSpec) -> tuple[GroupSize, GroupSize | None]:
    """CPU and GPU worker groups for the endpoint: pods follow the deployments' replica bounds."""
    spec = cluster_serve_spec(spec)
    cpu_pod, gpu_pod = cluster.cpu_worker, cluster.gpu_worker
    ingress = spec.resources.ingress
    cpu = _scaled(spec.autoscaling.ingress, per_pod(ingress.num_cpus, cpu_pod.cpus, "the ingress (CPUs)"), cpu_pod.cpus)
    model_cpus, gpus = spec.resources.model.num_cpus, spec.resources.model.num_gpus
    if not gpus:
        fit = per_pod(model_cpus, cpu_pod.cpus, "the model (CPUs)")
        return _stacked(cpu, _scaled(spec.autoscaling.model, fit, cpu_pod.cpus)), None
    fit, ray_cpus = _gpu_pod_fit(gpus, model_cpus, gpu_pod, "model replica")
    return cpu, _scaled(spec.autoscaling.model, fit, ray_cpus)


def job_groups(job: JobSpec, cluster: ClusterSpec) -> tuple[GroupSize, GroupSize | None]:
    """CPU (prepare) and GPU (model actors) groups for one batch job: the actor pool has a fixed size."""
    job = cluster_job_spec(job)
    resources, cpu_pod, gpu_pod = job.resources, cluster.cpu_worker, cluster.gpu_worker
    prepare = resources.prepare_concurrency
    cpu_max = _pods(prepare, cpu_pod.cpus) if prepare else cluster.max_cpu_workers
    cpu = GroupSize(1, 1, max(1, cpu_max), cpu_pod.cpus)
    gpus = resources.gpus_per_replica
    if not gpus:
        fit = per_pod(resources.cpus_per_replica, cpu_pod.cpus, "a model actor (CPUs)")
        pods = _pods(resources.replicas, fit)
        return _stacked(cpu, GroupSize(pods, pods, pods, cpu_pod.cpus)), None
    fit, ray_cpus = _gpu_pod_fit(gpus, resources.cpus_per_replica, gpu_pod, "model actor")
    pods = _pods(resources.replicas, fit)
    return cpu, GroupSize(pods, pods, pods, ray_cpus)


def batch_groups(jobs: Iterable[JobSpec], cluster: ClusterSpec) -> tuple[GroupSize, GroupSize | None]:
    """A long-lived batch cluster: GPUs scale from zero up to what the largest job needs. One CPU worker stays up,
    so Ray Data always sees CPUs to start preparing on while the autoscaler adds more."""
    sizes = [job_groups(job, cluster) for job in jobs]
    cpu_max = max(cpu.max for cpu, _ in sizes)
    cpu = GroupSize(1, 1, cpu_max, cluster.cpu_worker.cpus)
    gpu_sizes = [gpu for _, gpu in sizes if gpu is not None]
    if not gpu_sizes:
        return cpu, None
    return cpu, GroupSize(0, 0, max(g.max for g in gpu_sizes), max(g.ray_cpus for g in gpu_sizes))


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


def _ray_pod(cluster: ClusterSpec, *, container: str, image: str, size: PodSize, ports: list[dict],
             gpus: int = 0, cache: bool = True) -> dict:
    env = [{"name": "GEMMA_UNIFIED_CACHE", "value": f"{CACHE_MOUNT}/gemma-unified"}] if cache else []
    mounts = [{"name": "shared-mem", "mountPath": "/dev/shm"}]
    # Ray's object store lives in /dev/shm, which container runtimes cap at 64 MiB unless it is a memory volume.
    volumes = [{"name": "shared-mem", "emptyDir": {"medium": "Memory"}}]
    if cache:
        mounts.append({"name": "model-cache", "mountPath": CACHE_MOUNT})
        volumes.append(_cache_volume(cluster))
    spec: dict = {
        "containers": [{
            "name": container,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            **({"env": env} if env else {}),
            "envFrom": [{"secretRef": {"name": cluster.storage_secret}}],
            "ports": ports,
            "resources": _resources(size, gpus, getattr(size, "gpu_resource", "")),
            "volumeMounts": mounts,
            "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
        }],
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


def ray_cluster_spec(cluster: ClusterSpec, cpu: GroupSize, gpu: GroupSize | None, *, serve_port: int | None = None,
                     autoscaling: bool = True) -> dict:
    """KubeRay's RayClusterSpec: a CPU head that runs no tasks, a CPU worker group and (if needed) a GPU group."""
    head_ports = [_port("gcs-server", 6379), _port("dashboard", DASHBOARD_PORT), _port("client", 10001),
                  _port("metrics", METRICS_PORT), _port("as-metrics", AUTOSCALER_METRICS_PORT),
                  _port("dash-metrics", DASHBOARD_METRICS_PORT)]
    if serve_port is not None:
        head_ports.append(_port("serve", serve_port))
    worker_ports = [_port("metrics", METRICS_PORT)]
    workers = [{
        "groupName": "cpu",
        "replicas": cpu.initial,
        "minReplicas": cpu.min,
        "maxReplicas": cpu.max,
        "rayStartParams": {"num-cpus": str(cpu.ray_cpus), "metrics-export-port": str(METRICS_PORT)},
        "template": _ray_pod(cluster, container="ray-worker", image=cluster.image, size=cluster.cpu_worker,
                             ports=worker_ports),
    }]
    if gpu is not None:
        workers.append({
            "groupName": "gpu",
            "replicas": gpu.initial,
            "minReplicas": gpu.min,
            "maxReplicas": gpu.max,
            "rayStartParams": {"num-cpus": str(gpu.ray_cpus), "metrics-export-port": str(METRICS_PORT)},
            "template": _ray_pod(cluster, container="ray-worker", image=cluster.gpu_image, size=cluster.gpu_worker,
                                 ports=worker_ports, gpus=cluster.gpu_worker.gpus),
        })
    spec = {
        "rayVersion": version("ray"),
        "enableInTreeAutoscaling": autoscaling,
        "headGroupSpec": {
            # num-cpus 0: the head keeps the GCS, the Serve controller and job drivers, never tasks or replicas.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                               "metrics-export-port": str(METRICS_PORT)},
            "template": _ray_pod(cluster, container="ray-head", image=cluster.image, size=cluster.head,
                                 ports=head_ports, cache=False),
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
            "rayClusterConfig": ray_cluster_spec(cluster, cpu, gpu, serve_port=spec.http.port),
        },
    }


def job_name(cluster: ClusterSpec, stem: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in stem.lower()).strip("-") or "job"
    return f"{cluster.name}-{slug}"[:63].rstrip("-")


def ray_job(job: JobSpec, cluster: ClusterSpec, name: str) -> dict:
    """One batch job on a cluster of its own (deleted an hour after the job ends), with `gemma-unified submit`'s
    entrypoint and runtime environment."""
    from jobs.submit import ENTRYPOINT, runtime_env

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
        _refuse_secrets([f"env.{k}" for k in schedule.entry.env if _looks_secret(k)], schedule.source)
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
        "volumeMounts": [{"name": "schedules", "mountPath": CONFIG_MOUNT, "readOnly": True},
                         {"name": "state", "mountPath": STATE_MOUNT}],
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
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": {
                "metadata": {"labels": _labels(cluster, "scheduler")},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "schedules", "configMap": {"name": config_name}},
                                {"name": "state", "persistentVolumeClaim": {"claimName": state_name}}],
                },
            }}},
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


# ---- VMs: Ray's cluster launcher ----

VM_ENV_FILE = f"{CONFIG_MOUNT}/storage.env"
LOCAL_ENV_FILE = "~/.config/gemma-unified/storage.env"
VM_SERVE_CONFIG = f"{CONFIG_MOUNT}/serve-config.yaml"
_LOAD_ENV = f"set -a && . {VM_ENV_FILE} && set +a && ulimit -n 65536"


def launcher_config(cluster: ClusterSpec, cpu: GroupSize, gpu: GroupSize | None, *, serve: bool = True) -> dict:
    """`ray up` config on AWS with the same node types as the KubeRay manifests: CPU head, CPU and GPU workers."""
    vm = cluster.vm

    def node(instance: str) -> dict:
        config = {"InstanceType": instance,
                  "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": vm.disk_gb}}]}
        return {**config, "ImageId": vm.image_id} if vm.image_id else config

    node_types: dict = {
        "head": {"resources": {"CPU": 0}, "node_config": node(vm.head_instance)},
        "cpu": {"min_workers": cpu.min, "max_workers": cpu.max, "resources": {"CPU": cpu.ray_cpus},
                "node_config": node(vm.cpu_instance)},
    }
    if gpu is not None:
        node_types["gpu"] = {
            "min_workers": gpu.min, "max_workers": gpu.max,
            "resources": {"CPU": gpu.ray_cpus, "GPU": cluster.gpu_worker.gpus},
            "node_config": node(vm.gpu_instance),
            "docker": {"worker_image": cluster.gpu_image, "worker_run_options": ["--gpus all"]},
        }
    return {
        "cluster_name": cluster.name,
        "max_workers": cpu.max + (gpu.max if gpu else 0),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": math.ceil(cluster.idle_timeout_s / 60),
        "provider": {"type": "aws", "region": vm.region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": vm.ssh_user},
        "docker": {
            "image": cluster.image,
            "container_name": cluster.name,
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536", f"--volume /mnt/{cluster.name}-cache:{CACHE_MOUNT}",
                            f"--env GEMMA_UNIFIED_CACHE={CACHE_MOUNT}/gemma-unified"],
        },
        "available_node_types": node_types,
        "head_node_type": "head",
        # Credentials stay outside the repository; the Serve config is read from the folder `ray up` runs in.
        "file_mounts": {VM_ENV_FILE: LOCAL_ENV_FILE, **({VM_SERVE_CONFIG: "./serve-config.yaml"} if serve else {})},
        "head_start_ray_commands": [
            "ray stop",
            f"{_LOAD_ENV} && ray start --head --port=6379 --dashboard-host=0.0.0.0 "
            f"--metrics-export-port={METRICS_PORT} --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"{_LOAD_ENV} && ray start --address=$RAY_HEAD_IP:6379 --metrics-export-port={METRICS_PORT}",
        ],
    }


def vm_groups(serve: ServeSpec | None, jobs: list[JobSpec], cluster: ClusterSpec) -> tuple[GroupSize, GroupSize | None]:
    """One VM cluster hosts the endpoint and batch jobs: the endpoint sets the floors (batch alone keeps one CPU
    worker, as on Kubernetes), and each group's ceiling covers the largest of them."""
    serve_sizes = [serve_groups(serve, cluster)] if serve else []
    batch_sizes = [batch_groups(jobs, cluster)] if jobs else []
    sizes = serve_sizes + batch_sizes
    floors = serve_sizes or batch_sizes
    cpu = GroupSize(0, floors[0][0].min, max(c.max for c, _ in sizes), cluster.cpu_worker.cpus)
    gpus = [g for _, g in sizes if g is not None]
    if not gpus:
        return cpu, None
    gpu_floor = floors[0][1].min if floors[0][1] is not None else 0
    return cpu, GroupSize(0, gpu_floor, max(g.max for g in gpus), max(g.ray_cpus for g in gpus))


STORAGE_ENV_EXAMPLE = """\
# Copy to ~/.config/gemma-unified/storage.env on the machine running `ray up`; every Ray process on every VM
# starts with these variables.
# Leave AWS_ENDPOINT_URL out for AWS S3; set it for MinIO, R2, GCS interoperability and other S3-compatible stores.
AWS_ACCESS_KEY_ID=REPLACE_ME
AWS_SECRET_ACCESS_KEY=REPLACE_ME
# AWS_ENDPOINT_URL=https://storage.example.com
# GEMMA_UNIFIED_API_KEYS=key-one,key-two
"""
