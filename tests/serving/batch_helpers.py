"""Batch test kit: OpenAI batch files, a cluster that only records what it is asked (the real submission runs in
test_batch_endpoint.py), and a batch job's output written as the job writes it."""

from __future__ import annotations

import json

import pyarrow as pa

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
    """Result and error parts as the running job writes them (only their ids matter for the counts)."""
    out = OutputDir(output_url, {})
    if ok:
        out.write_part(pa.table({"id": ok}), f"{RESULTS}/part-ok.parquet")
    if failed:
        out.write_part(pa.table({"id": list(failed)}), f"{ERRORS}/part-bad.parquet")
    return out


def finish_job(output_url: str, ok: list[str], failed: list[str] = (), status: str = "succeeded") -> None:
    """What the job leaves at its end: output.jsonl, errors.jsonl and _job.json."""
    out = write_results(output_url, ok, failed)
    lines = [{"id": f"batch_req_{c}", "custom_id": c, "response": {"status_code": 200, "body": {}}, "error": None}
             for c in ok]  # fmt: skip
    errors = [{"id": f"batch_req_{c}", "custom_id": c, "response": None,
               "error": {"code": "invalid_media", "message": "bad image"}} for c in failed]  # fmt: skip
    with out.fs.open(out.path("output.jsonl"), "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    with out.fs.open(out.path("errors.jsonl"), "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in errors)
    total = len(ok) + len(failed)
    out.write_manifest({"status": status, "counts": {"total": total, "succeeded": len(ok), "failed": len(failed)}})
