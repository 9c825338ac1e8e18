"""The cluster's shape, from a cluster file: images, pod sizes, the node-local model cache, VM types."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from pipelines.config import Strict
from pipelines.errors import GemmaUnifiedError

PROJECT_VERSION = version("gemma-unified")
CACHE_MOUNT = "/cache"
CONFIG_MOUNT = "/etc/gemma-unified"
METRICS_PORT = 8080
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
DNS_LABEL = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"


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
        None,
        description="AMI with Docker and an NVIDIA driver new enough for the GPU image's CUDA wheels. Unset: "
        "Ray's default Deep Learning AMI for the region, whose driver may be too old.",
    )
    ssh_user: str = Field("ubuntu", min_length=1, description="Login user of the VM image.")


class ClusterSpec(Strict):
    name: str = Field("gemma-unified", pattern=DNS_LABEL, description="Prefix of every Kubernetes object name.")
    namespace: str = Field("default", pattern=DNS_LABEL, description="Namespace of the Kubernetes objects.")
    image: str = Field(
        f"gemma-unified:{PROJECT_VERSION}-cpu",
        min_length=1,
        description="CPU image (infra/docker/Dockerfile.cpu): head, CPU workers, scheduler.",
    )
    gpu_image: str = Field(
        f"gemma-unified:{PROJECT_VERSION}-gpu",
        min_length=1,
        description="GPU image (infra/docker/Dockerfile.gpu): GPU workers.",
    )
    storage_secret: str = Field(
        "gemma-unified-storage",
        pattern=DNS_LABEL,
        description="Secret whose keys (AWS_* ...) become every pod's environment.",
    )
    head: PodSize = Field(default_factory=lambda: PodSize(cpus=2, memory="8Gi"), description="Head pod.")
    cpu_worker: PodSize = Field(
        default_factory=lambda: PodSize(cpus=4, memory="16Gi"),
        description="CPU worker pods: tokenization, media decoding, the ingress.",
    )
    gpu_worker: GpuPodSize = Field(
        default_factory=lambda: GpuPodSize(cpus=8, memory="32Gi"),
        description="GPU worker pods: one model replica per GPU.",
    )
    max_cpu_workers: int = Field(
        8, ge=1, le=10_000, description="CPU worker ceiling for batch jobs that set no prepare_concurrency."
    )
    cache_host_path: str | None = Field(
        None,
        description="Node directory holding mirrored model weights, shared by the pods of a node (hostPath). "
        "Unset: an emptyDir per pod (allowed under the baseline Pod Security Standard).",
    )
    cache_size: str = Field("200Gi", pattern=QUANTITY, description="Size limit of the emptyDir model cache.")
    idle_timeout_s: int = Field(600, ge=60, le=86_400, description="Idle time before the autoscaler removes a worker.")
    scheduler_cron: str = Field(
        "*/5 * * * *", min_length=1, description="How often the CronJob runs `gemma-unified schedule --once`."
    )
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
