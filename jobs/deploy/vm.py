"""Ray's cluster launcher (`ray up`) on VMs, with the same node types as the KubeRay manifests."""

from __future__ import annotations

import math

from jobs.deploy.cluster import CACHE_MOUNT, CONFIG_MOUNT, METRICS_PORT, ClusterSpec
from jobs.deploy.sizing import GroupSize

VM_ENV_FILE = f"{CONFIG_MOUNT}/storage.env"
LOCAL_ENV_FILE = "~/.config/gemma-unified/storage.env"
VM_SERVE_CONFIG = f"{CONFIG_MOUNT}/serve-config.yaml"
_LOAD_ENV = f"set -a && . {VM_ENV_FILE} && set +a && ulimit -n 65536"


def launcher_config(
    cluster: ClusterSpec,
    cpu: GroupSize,
    gpu: GroupSize | None,
    *,
    serve: bool = True,
    env: dict[str, str] | None = None,
) -> dict:
    """`ray up` config on AWS with the same node types as the KubeRay manifests: CPU head, CPU and GPU workers.
    `env`: what every node's container starts with (the endpoint's `http.proxy: haproxy` settings, say)."""
    vm = cluster.vm

    def node(instance: str) -> dict:
        config = {
            "InstanceType": instance,
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": vm.disk_gb}}],
        }
        return {**config, "ImageId": vm.image_id} if vm.image_id else config

    node_types: dict = {
        "head": {"resources": {"CPU": 0}, "node_config": node(vm.head_instance)},
        "cpu": {
            "min_workers": cpu.min,
            "max_workers": cpu.max,
            "resources": {"CPU": cpu.ray_cpus},
            "node_config": node(vm.cpu_instance),
        },
    }
    if gpu is not None:
        node_types["gpu"] = {
            "min_workers": gpu.min,
            "max_workers": gpu.max,
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
            "run_options": [
                "--ulimit nofile=65536:65536",
                f"--volume /mnt/{cluster.name}-cache:{CACHE_MOUNT}",
                f"--env GEMMA_UNIFIED_CACHE={CACHE_MOUNT}/gemma-unified",
                *(f"--env {name}={value}" for name, value in (env or {}).items()),
            ],
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


STORAGE_ENV_EXAMPLE = """\
# Copy to ~/.config/gemma-unified/storage.env on the machine running `ray up`; every Ray process on every VM
# starts with these variables.
# Leave AWS_ENDPOINT_URL out for AWS S3; set it for MinIO, R2, GCS interoperability and other S3-compatible stores.
AWS_ACCESS_KEY_ID=REPLACE_ME
AWS_SECRET_ACCESS_KEY=REPLACE_ME
# AWS_ENDPOINT_URL=https://storage.example.com
# GEMMA_UNIFIED_API_KEYS=key-one,key-two
"""
