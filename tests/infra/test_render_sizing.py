"""How specs become worker groups, and what the renderer refuses to write."""

from __future__ import annotations

import pytest

from jobs.deploy.cluster import ClusterSpec, GpuPodSize, PodSize, RenderError
from jobs.deploy.kuberay import ray_service
from jobs.deploy.serve_config import serve_config
from jobs.deploy.sizing import batch_groups, job_groups, per_pod, serve_groups, vm_groups
from jobs.deploy.specs import cluster_job_spec, cluster_serve_spec
from jobs.job_files import build_job
from serving.spec import build_spec

JOB = {"input": {"url": "s3://in/"}, "output": {"url": "s3://out/"}}


def serve(**fields):
    return build_spec(fields)


def job(**resources):
    return build_job({**JOB, "resources": resources})


def test_replicas_per_pod():
    assert per_pod(1, 1, "x") == 1
    assert per_pod(0.5, 1, "x") == 2
    assert per_pod(0.3, 1, "x") == 3
    assert per_pod(0, 4, "x") >= 1_000_000  # needs no CPU: any number packs into one pod
    with pytest.raises(RenderError, match="needs 2 per replica but a pod has 1"):
        per_pod(2, 1, "the model (GPUs)")


def test_gpu_group_scales_with_the_model_deployment():
    spec = serve(autoscaling={"model": {"min_replicas": 0, "max_replicas": 6, "initial_replicas": 2}})
    cpu, gpu = serve_groups(spec, ClusterSpec())
    assert (gpu.initial, gpu.min, gpu.max) == (2, 0, 6)  # scale to zero when idle
    assert gpu.ray_cpus == 1
    assert (cpu.min, cpu.max) == (1, 1)  # two 1-CPU ingress replicas fit one 4-CPU pod


def test_fractional_gpus_pack_replicas_per_pod():
    spec = serve(
        resources={"model": {"num_gpus": 0.5, "num_cpus": 2}},
        autoscaling={"model": {"min_replicas": 1, "max_replicas": 5}},
    )
    _, gpu = serve_groups(spec, ClusterSpec())
    assert (gpu.min, gpu.max, gpu.ray_cpus) == (1, 3, 4)


def test_a_model_replica_larger_than_a_gpu_pod_is_refused():
    spec = serve(resources={"model": {"num_gpus": 2}})
    with pytest.raises(RenderError, match="GPUs"):
        serve_groups(spec, ClusterSpec())
    small = ClusterSpec(gpu_worker=GpuPodSize(cpus=2, memory="8Gi"))
    with pytest.raises(RenderError, match="reserve 4 CPUs"):
        serve_groups(serve(resources={"model": {"num_gpus": 1, "num_cpus": 4}}), small)


def test_cpu_only_model_needs_no_gpu_group():
    spec = serve(engine={"device": "cpu"}, autoscaling={"model": {"max_replicas": 3}})
    cpu, gpu = serve_groups(spec, ClusterSpec(cpu_worker=PodSize(cpus=2, memory="4Gi")))
    assert gpu is None
    assert cpu.max == 1 + 2  # one pod of ingress replicas, then two 1-CPU model replicas per 2-CPU pod
    manifest = ray_service(spec, ClusterSpec())
    assert [g["groupName"] for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["cpu"]


def test_gpus_are_decided_before_the_cluster_exists():
    assert cluster_serve_spec(serve()).resources.model.num_gpus == 1
    assert cluster_serve_spec(serve(engine={"device": "cpu"})).resources.model.num_gpus == 0
    assert cluster_serve_spec(serve(resources={"model": {"num_gpus": 0.25}})).resources.model.num_gpus == 0.25
    assert cluster_job_spec(job()).resources.gpus_per_replica == 1
    assert cluster_job_spec(job(address="ray://elsewhere:10001")).resources.address is None


def test_job_groups_follow_its_resources():
    cluster = ClusterSpec()
    cpu, gpu = job_groups(job(replicas=3, prepare_concurrency=10), cluster)
    assert (gpu.min, gpu.max) == (3, 3)
    assert (cpu.min, cpu.max) == (1, 3)  # ten 1-CPU prepare tasks on 4-CPU pods
    cpu, _ = job_groups(job(), cluster)
    assert cpu.max == cluster.max_cpu_workers


def test_batch_cluster_scales_from_zero_to_the_largest_job():
    cpu, gpu = batch_groups([job(replicas=1), job(replicas=4, prepare_concurrency=4)], ClusterSpec())
    assert (gpu.min, gpu.max) == (0, 4)
    assert cpu.min == 1


def test_vm_cluster_covers_the_endpoint_and_the_jobs():
    cluster = ClusterSpec()
    cpu, gpu = vm_groups(
        serve(autoscaling={"model": {"min_replicas": 1, "max_replicas": 2}}), [job(replicas=5)], cluster
    )
    assert (gpu.min, gpu.max) == (1, 5)
    cpu, gpu = vm_groups(None, [job(replicas=2)], cluster)
    assert (gpu.min, gpu.max) == (0, 2)


@pytest.mark.parametrize(
    "fields, where",
    [
        ({"auth": {"api_keys": ["sk-live"]}}, "auth.api_keys[0]"),
        (
            {"model": {"name": "s3://m/", "storage_options": {"key": "AKIA", "secret": "s"}}},
            "model.storage_options.key",
        ),
        (
            {"model": {"name": "s3://m/", "storage_options": {"client_kwargs": {"aws_secret_access_key": "s"}}}},
            "model.storage_options.client_kwargs.aws_secret_access_key",
        ),
        ({"remote_media": {"storage_options": {"token": "t"}}}, "remote_media.storage_options.token"),
    ],
)
def test_inline_credentials_are_refused(fields, where):
    with pytest.raises(RenderError, match="clear text") as caught:
        serve_config(serve(**fields))
    assert where in str(caught.value)


def test_job_credentials_are_refused_but_endpoints_pass():
    spec = build_job({**JOB, "input": {"url": "s3://in/", "storage_options": {"endpoint_url": "http://minio:9000"}}})
    assert cluster_job_spec(spec).input.storage_options == {"endpoint_url": "http://minio:9000"}
    spec = build_job({**JOB, "output": {"url": "s3://out/", "storage_options": {"password": "p"}}})
    with pytest.raises(RenderError, match="output.storage_options.password"):
        cluster_job_spec(spec)


def test_vm_image_is_ray_s_default_unless_set():
    from jobs.deploy.cluster import VmSpec
    from jobs.deploy.sizing import GroupSize
    from jobs.deploy.vm import launcher_config

    cpu = GroupSize(0, 0, 1, 4)
    nodes = launcher_config(ClusterSpec(), cpu, None)["available_node_types"]
    assert all("ImageId" not in n["node_config"] for n in nodes.values())
    nodes = launcher_config(ClusterSpec(vm=VmSpec(image_id="ami-0123456789abcdef0")), cpu, None)["available_node_types"]
    assert {n["node_config"]["ImageId"] for n in nodes.values()} == {"ami-0123456789abcdef0"}
