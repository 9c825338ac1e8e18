"""Worker groups sized from the specs: pods follow the deployments' replica bounds and each replica's resources."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from jobs.deploy.cluster import ClusterSpec, GpuPodSize, RenderError
from jobs.deploy.specs import ServeSpec, cluster_job_spec, cluster_serve_spec
from pipelines.config import JobSpec


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
    return GroupSize(
        first.initial + second.initial,
        first.min + second.min,
        first.max + second.max,
        max(first.ray_cpus, second.ray_cpus),
    )


def _scaled(autoscaling, fit: int, ray_cpus: int) -> GroupSize:
    initial = autoscaling.initial_replicas if autoscaling.initial_replicas is not None else autoscaling.min_replicas
    return GroupSize(
        _pods(initial, fit), _pods(autoscaling.min_replicas, fit), _pods(autoscaling.max_replicas, fit), ray_cpus
    )


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
