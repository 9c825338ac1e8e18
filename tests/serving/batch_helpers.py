"""Batch test kit: OpenAI batch files, a cluster that only records what it is asked (the real submission runs in
test_batch_endpoint.py), and a batch job's output written as the job writes it."""

from __future__ import annotations

import json

import pyarrow as pa

from pipelines.chat.batch_output import write_batch_output
from pipelines.output import ERRORS, RESULTS, OutputDir
from serving.batch_jobs import JobState


def request_line(custom_id: str, text: str = "Say hi.", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **body},
    }


def batch_file(*custom_ids: str) -> bytes:
    return b"".join(json.dumps(request_line(c)).encode() + b"\n" for c in custom_ids)


class FakeCluster:
    """Jobs by submission id, each a JobState the test moves by hand."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobState] = {}
        self.specs: dict = {}
        self.stopped: list[str] = []
        self.refuse: Exception | None = None

    def submit(self, job, job_id: str) -> None:
        if self.refuse is not None:
            raise self.refuse
        assert job_id not in self.jobs, f"{job_id} submitted twice"
        self.jobs[job_id] = JobState("PENDING")
        self.specs[job_id] = job

    def state(self, job_id: str) -> JobState | None:
        return self.jobs.get(job_id)

    def stop(self, job_id: str) -> None:
        self.stopped.append(job_id)
        job = self.jobs[job_id]
        if job.status in ("PENDING", "RUNNING"):
            self.jobs[job_id] = JobState("STOPPED", job.start_time, job.start_time, "stopped")

    def set(self, job_id: str, status: str, start: int | None = None, end: int | None = None, message=None):
        self.jobs[job_id] = JobState(status, start, end, message)


def write_results(output_url: str, ok: list[str], failed: list[str] = ()) -> OutputDir:
    """Result and error parts as the running job writes them."""
    out = OutputDir(output_url, {})
    if ok:
        answers = {"id": ok, "text": [f"answer to {c}" for c in ok], "finish_reason": ["stop"] * len(ok),
                   "prompt_tokens": [5] * len(ok), "output_tokens": [3] * len(ok)}  # fmt: skip
        out.write_part(pa.table(answers), f"{RESULTS}/part-{ok[0]}.parquet")
    if failed:
        errors = {"id": list(failed), "error": ["the image cannot be decoded"] * len(failed),
                  "code": ["invalid_media"] * len(failed)}  # fmt: skip
        out.write_part(pa.table(errors), f"{ERRORS}/part-{failed[0]}.parquet")
    return out


def finish_job(output_url: str, ok: list[str], failed: list[str] = (), status: str = "succeeded") -> None:
    """What the job leaves at its end: output.jsonl and errors.jsonl (by the job's own writer), then _job.json."""
    out = write_results(output_url, ok, failed)
    write_batch_output(out, job_key="test-job", model_id="tiny")
    total = len(ok) + len(failed)
    out.write_manifest({"status": status, "counts": {"total": total, "succeeded": len(ok), "failed": len(failed)}})
