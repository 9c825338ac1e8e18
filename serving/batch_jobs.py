"""A batch's job on the Ray cluster: the job spec built from the endpoint's own spec (so answers match the
endpoint's), its submission, and OpenAI's batch states read from the Ray job's status and the job's `_job.json`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from pipelines.config import JobSpec
from pipelines.environment import forwarded_env
from serving.batch_protocol import TERMINAL_STATUSES, BatchError, BatchErrors, RequestCounts
from serving.batch_store import StoredBatch
from serving.spec import ServeSpec

logger = logging.getLogger(__name__)

# Until the Ray job is visible, a just-created batch is still being submitted, not lost.
SUBMIT_GRACE_S = 120
DONE_MANIFEST = frozenset({"succeeded", "partial", "failed", "stopped"})


@dataclass(frozen=True)
class JobState:
    """What the cluster says of a job: Ray's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), its start and
    end in seconds, and its message."""

    status: str
    start_time: int | None = None
    end_time: int | None = None
    message: str | None = None


class Submitter(Protocol):
    def submit(self, job: JobSpec, job_id: str) -> None: ...

    def state(self, job_id: str) -> JobState | None:
        """None when the cluster knows no such job."""

    def stop(self, job_id: str) -> None: ...


def batch_job(spec: ServeSpec, input_url: str, output_url: str) -> JobSpec:
    """The batch job for one input file: the endpoint's model, engine, media, chat and remote-media settings."""
    batch = spec.batch
    storage = batch.storage_options
    return JobSpec.model_validate(
        {
            "input": {"url": input_url, "format": "openai-batch", "storage_options": storage},
            "output": {"url": output_url, "storage_options": storage},
            "model": spec.model,
            "engine": spec.engine,
            "media": spec.media,
            "chat": spec.chat,
            "remote_media": spec.remote_media,
            "resources": batch.resources,
        }
    )


class RaySubmitter:
    """Batch jobs through Ray's Job Submission API, with the submission id chosen by the batch."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._client = None

    @property
    def client(self):
        from pipelines.submission import cluster_client

        if self._client is None:
            self._client = cluster_client(self.address)
        return self._client

    def submit(self, job: JobSpec, job_id: str) -> None:
        from pipelines.submission import submit

        # The replica's storage credentials and model settings travel with the job, never the API keys.
        submit(self.client, job, submission_id=job_id, env=forwarded_env())
        logger.info("submitted batch job %s writing to %s", job_id, job.output.url)

    def state(self, job_id: str) -> JobState | None:
        from pipelines.submission import SubmitError, call

        try:
            info = call(self.client, "get_job_info", job_id)
        except SubmitError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise
        status = str(getattr(info.status, "value", info.status))
        return JobState(status, _seconds(info.start_time), _seconds(info.end_time), info.message)

    def stop(self, job_id: str) -> None:
        from pipelines.submission import call

        call(self.client, "stop_job", job_id)
        logger.info("asked batch job %s to stop", job_id)


def _timestamp(iso: str | None) -> int | None:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else None
    except (TypeError, ValueError):
        return None


def _seconds(milliseconds: int | None) -> int | None:
    return int(milliseconds // 1000) if milliseconds else None


def _errors(code: str, message: str) -> BatchErrors:
    return BatchErrors(data=[BatchError(code=code, message=message)])


def observe(
    record: StoredBatch,
    job: JobState | None,
    manifest: dict | None,
    progress: RequestCounts,
    now: int,
) -> StoredBatch:
    """The batch as it stands now: OpenAI's state from the Ray job's status and the job's manifest.

    A terminal batch never changes again. `progress` is what the output holds so far (used until the manifest
    has the final counts)."""
    if record.status in TERMINAL_STATUSES:
        return record
    update: dict = {}
    manifest_status = (manifest or {}).get("status")
    counts = (manifest or {}).get("counts") if manifest_status in DONE_MANIFEST else None
    if counts:
        update["request_counts"] = RequestCounts(
            total=counts.get("total", record.request_counts.total),
            completed=counts.get("succeeded", 0),
            failed=counts.get("failed", 0),
        )
    else:
        update["request_counts"] = RequestCounts(
            total=record.request_counts.total, completed=progress.completed, failed=progress.failed
        )
    cancelling = record.cancelling_at is not None
    if job is None:
        if record.status == "validating" and now - record.created_at < SUBMIT_GRACE_S:
            return record.model_copy(update=update)
        message = "the batch job is not known to the Ray cluster (the cluster was replaced, or the job was deleted)"
        return record.model_copy(
            update={**update, "status": "failed", "failed_at": now, "errors": _errors("job_lost", message)}
        )
    # Ray's start_time is when it accepted the job; the driver's manifest says when the run itself began.
    started = record.in_progress_at or _timestamp((manifest or {}).get("started_at")) or now
    ended = job.end_time or now
    if job.status == "PENDING":
        update["status"] = "cancelling" if cancelling else "validating"
    elif job.status == "RUNNING":
        update["in_progress_at"] = started
        if cancelling:
            update["status"] = "cancelling"
        elif manifest_status in DONE_MANIFEST:
            update.update(status="finalizing", finalizing_at=record.finalizing_at or now)
        else:
            update["status"] = "in_progress"
    elif job.status in ("SUCCEEDED", "FAILED") and manifest_status in ("succeeded", "partial"):
        # `run` exits 1 when some lines failed: a partial job is a completed batch with an error file.
        update.update(
            status="completed",
            in_progress_at=started,
            finalizing_at=record.finalizing_at or ended,
            completed_at=ended,
        )
    elif job.status == "STOPPED" or (cancelling and job.status in ("SUCCEEDED", "FAILED")):
        update.update(status="cancelled", cancelled_at=ended)
    else:  # FAILED, or a job that ended without a successful manifest
        reason = (manifest or {}).get("reason") or job.message or f"the batch job ended {job.status.lower()}"
        update.update(status="failed", failed_at=ended, errors=_errors("job_failed", reason))
    return record.model_copy(update=update)
