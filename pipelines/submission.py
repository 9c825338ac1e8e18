"""Batch jobs on a Ray cluster through Ray's Job Submission API: shared by the command line (`gemma-unified submit`,
the scheduler) and the endpoint's /v1/batches.

The submitted entrypoint is `gemma-unified run` itself, reading the validated spec from an environment variable
that the job's runtime environment carries, so a cluster run behaves exactly like a local one.
"""

from __future__ import annotations

import json

from pipelines.config import JobSpec
from pipelines.errors import GemmaUnifiedError

SPEC_ENV = "GEMMA_UNIFIED_JOB_SPEC"
# The driver's own ray.init forwards GEMMA_UNIFIED_* variables again; identical keys would otherwise be refused as a
# conflict between the job's runtime env and the driver's.
MERGE_ENV = {"RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
ENTRYPOINT = f"printf '%s' \"${SPEC_ENV}\" | gemma-unified run /dev/stdin --no-progress"
METADATA_KEY = "gemma_unified_output"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PROBE_TIMEOUT_S = 5.0


class SubmitError(GemmaUnifiedError):
    """The cluster cannot be reached, or refuses a request (unknown job id, duplicate submission id)."""


def normalise_address(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """Fail within seconds, naming the address, when nothing listens there (the SDK itself would wait for TCP)."""
    import socket
    from urllib.parse import urlsplit

    url = normalise_address(address)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"{address}: a job submission address is the dashboard's http(s)://HOST:PORT (8265)")
    try:
        with socket.create_connection((parts.hostname, parts.port or 8265), timeout=timeout_s):
            pass
    except OSError as exc:
        raise SubmitError(f"cannot reach a Ray cluster at {address}: {exc}") from None
    return url


def client(address: str):
    """A Job Submission client; the SDK checks the cluster's version and sends the cluster token when one is set."""
    from ray.job_submission import JobSubmissionClient

    url = probe(address)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, a 404 from something that is not Ray, an authentication error
        raise SubmitError(f"cannot reach a Ray cluster at {address}: {exc}") from None


def cluster_client(address: str | None = None):
    """A Job Submission client for `address` (the dashboard), or, with none, for the cluster this process runs on
    (a Serve replica, a Ray task): Ray reads that cluster's dashboard address from its GCS."""
    if address:
        return client(address)
    import ray
    from ray.job_submission import JobSubmissionClient

    if not ray.is_initialized():
        raise SubmitError("no job submission address: this process is not on a Ray cluster; set one (http://HEAD:8265)")
    gcs_address = ray.get_runtime_context().gcs_address
    try:
        return JobSubmissionClient(gcs_address)
    except Exception as exc:  # no dashboard on this cluster, or it is not up
        raise SubmitError(f"cannot reach the job submission API of the cluster at {gcs_address}: {exc}") from None


def cluster_spec(job: JobSpec) -> JobSpec:
    """The spec as the cluster runs it: the driver joins the cluster it runs on, never an address from the file."""
    return job.model_copy(update={"resources": job.resources.model_copy(update={"address": None})})


def runtime_env(job: JobSpec, env: dict[str, str] | None = None) -> dict:
    spec = json.dumps(cluster_spec(job).model_dump(mode="json", exclude_defaults=True))
    return {"env_vars": {**(env or {}), **MERGE_ENV, SPEC_ENV: spec}}


def submit(
    address_or_client,
    job: JobSpec,
    *,
    submission_id: str | None = None,
    env: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> str:
    ray_client = client(address_or_client) if isinstance(address_or_client, str) else address_or_client
    try:
        return ray_client.submit_job(
            entrypoint=ENTRYPOINT,
            submission_id=submission_id,
            runtime_env=runtime_env(job, env),
            metadata={METADATA_KEY: job.output.url, **(metadata or {})},
        )
    except Exception as exc:
        raise SubmitError(f"the cluster refused the job: {exc}") from None


def call(ray_client, method: str, job_id: str):
    """One SDK call on a job, with the SDK's errors (404 for an unknown id, ...) as SubmitError."""
    try:
        return getattr(ray_client, method)(job_id)
    except Exception as exc:
        raise SubmitError(f"{job_id}: {exc}") from None
