"""The serve and job specs as a cluster runs them: GPUs per replica decided up front, credentials refused."""

from __future__ import annotations

from typing import Any

from jobs.deploy.cluster import RenderError
from pipelines.config import JobSpec

# serving.spec.ServeSpec, handed in by the command line: rendering reads its fields and never imports serving.
ServeSpec = Any
# Storage-option and env names that hold credentials: those belong in the Secret, never in a rendered manifest.
_SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential", "api_key")


# ---- credentials stay out of manifests ----


def looks_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered == "key" or any(marker in lowered for marker in _SECRET_MARKERS)


def _secret_paths(options: dict, where: str) -> list[str]:
    found = []
    for key, value in options.items():
        if looks_secret(str(key)):
            found.append(f"{where}.{key}")
        elif isinstance(value, dict):
            found.extend(_secret_paths(value, f"{where}.{key}"))
    return found


def refuse_secrets(found: list[str], source: str) -> None:
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
    refuse_secrets(found, source)
    model = spec.resources.model.model_copy(update={"num_gpus": model_gpus(spec)})
    resources = spec.resources.model_copy(update={"model": model})
    return spec.model_copy(update={"resources": resources})


def cluster_job_spec(job: JobSpec, source: str = "job spec") -> JobSpec:
    """The job as a cluster runs it: it joins the cluster it runs on, GPUs per replica decided up front."""
    found = []
    for section in ("input", "output", "model"):
        found += _secret_paths(getattr(job, section).storage_options, f"{section}.storage_options")
    refuse_secrets(found, source)
    resources = job.resources.model_copy(update={"address": None, "gpus_per_replica": job_gpus(job)})
    return job.model_copy(update={"resources": resources})
