"""/v1/files and /v1/batches without HTTP types: uploads validated as OpenAI batch files, batches run as batch jobs
on the Ray cluster, every record in the BatchStore, and each API key seeing only what it created."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO

from pipelines.chat.batch_file import duplicate_custom_ids, iter_batch_lines
from pipelines.chat.batch_output import ERROR_FILE, OUTPUT_FILE, write_batch_output
from pipelines.config import JobSpec
from pipelines.output import ERRORS, RESULTS, OutputDir
from pipelines.submission import SubmitError
from serving.batch_jobs import JobState, Submitter, batch_job, observe
from serving.batch_protocol import (
    CHAT_ENDPOINT,
    COMPLETION_WINDOW,
    MAX_METADATA_PAIRS,
    TERMINAL_STATUSES,
    Batch,
    BatchCreateRequest,
    BatchError,
    BatchErrors,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
    RequestCounts,
)
from serving.batch_store import FILES, BatchStore, StoredBatch, StoredFile
from serving.errors import NOT_FOUND, APIError
from serving.spec import ServeSpec

logger = logging.getLogger(__name__)

BATCH_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
WINDOW_S = 24 * 3600
MAX_LISTED_FILES = 10_000
MAX_LISTED_BATCHES = 100
CONTENT_CHUNK = 1024 * 1024
JOB_ENDED = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def _not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"no {kind} with id {ident!r}", type=NOT_FOUND, param=param, code=f"{kind}_not_found")


def _listing(records: list, after: str | None, limit: int, public=lambda record: record.public()) -> dict:
    """The fields of an OpenAI list object for one page of records: data, first_id, last_id, has_more."""
    page, more = _page(records, after, limit)
    data = [public(record) for record in page]
    return {
        "data": data,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
        "has_more": more,
    }


def _page(records: list, after: str | None, limit: int) -> tuple[list, bool]:
    """The records after the cursor `after` (an id; unknown: an empty page), at most `limit`, and whether more
    follow."""
    if after is not None:
        ids = [record.id for record in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    return records[:limit], len(records) > limit


class BatchService:
    def __init__(
        self,
        spec: ServeSpec,
        store: BatchStore,
        submitter: Submitter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.limits = spec.batch
        self.store = store
        self.submitter = submitter
        self.clock = clock

    def now(self) -> int:
        return int(self.clock())

    # ---- files ----

    def upload(self, owner: str, filename: str, purpose: str, content: IO[bytes]) -> FileObject:
        """Check size and every line before storing anything: a bad file is refused whole, naming its first bad
        line."""
        if purpose != BATCH_PURPOSE:
            raise APIError(
                400,
                f"purpose must be {BATCH_PURPOSE!r}: files here are batch inputs",
                param="purpose",
                code="unsupported",
            )
        size = content.seek(0, os.SEEK_END)
        if size > self.limits.max_file_bytes:
            raise APIError(
                413,
                f"the file has {size:,} bytes; the limit is {self.limits.max_file_bytes:,}",
                param="file",
                code="file_too_large",
            )
        content.seek(0)
        lines = self._check_lines(content)
        content.seek(0)
        record = StoredFile(
            id=f"file-{uuid.uuid4().hex}",
            bytes=size,
            created_at=self.now(),
            filename=os.path.basename(filename or "") or "batch.jsonl",
            purpose=purpose,
            owner=owner,
            path="",
            lines=lines,
        )
        record = record.model_copy(update={"path": f"{FILES}/{record.id}.jsonl"})
        self.store.put_file(record, content)
        return record.public()

    def _check_lines(self, content: IO[bytes]) -> int:
        infos = []
        for info in iter_batch_lines(content):
            if info.problem:
                raise APIError(400, info.problem, param="file", code="invalid_batch_line")
            infos.append(info)
            if len(infos) > self.limits.max_lines_per_batch:
                raise APIError(
                    400,
                    f"more than {self.limits.max_lines_per_batch:,} requests in one file",
                    param="file",
                    code="too_many_requests",
                )
        if not infos:
            raise APIError(400, "the file holds no requests", param="file", code="empty_file")
        duplicates = duplicate_custom_ids(infos)
        if duplicates:
            shown = "; ".join(
                f"{custom_id!r} on lines {', '.join(map(str, numbers))}"
                for custom_id, numbers in list(duplicates.items())[:5]
            )
            raise APIError(400, f"custom_id must be unique: {shown}", param="file", code="duplicate_custom_id")
        return len(infos)

    def _own_file(self, owner: str, file_id: str, param: str | None = None) -> StoredFile:
        record = self.store.file(file_id)
        if record is None or record.owner != owner:  # another key's file does not exist for this one
            raise _not_found("file", file_id, param)
        return record

    def list_files(
        self, owner: str, *, purpose: str | None = None, after: str | None = None, limit: int = 10_000, order="desc"
    ) -> FileList:
        records = [r for r in self.store.files() if r.owner == owner and purpose in (None, r.purpose)]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=order == "desc")
        return FileList(**_listing(records, after, limit))

    def retrieve_file(self, owner: str, file_id: str) -> FileObject:
        return self._own_file(owner, file_id).public()

    def content(self, owner: str, file_id: str) -> tuple[FileObject, Iterator[bytes]]:
        record = self._own_file(owner, file_id)
        try:
            handle = self.store.open(record.path)
        except FileNotFoundError:
            raise _not_found("file", file_id) from None

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(CONTENT_CHUNK):
                    yield chunk

        return record.public(), chunks()

    def delete_file(self, owner: str, file_id: str) -> FileDeleted:
        self.store.delete_file(self._own_file(owner, file_id))
        return FileDeleted(id=file_id)

    # ---- batches ----

    def create_batch(self, owner: str, request: BatchCreateRequest) -> Batch:
        if request.endpoint != CHAT_ENDPOINT:
            raise APIError(
                400, f"endpoint must be {CHAT_ENDPOINT}: the only batched route", param="endpoint", code="unsupported"
            )
        if request.completion_window != COMPLETION_WINDOW:
            raise APIError(400, "completion_window must be 24h", param="completion_window", code="invalid_value")
        metadata = request.metadata or {}
        if len(metadata) > MAX_METADATA_PAIRS or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            raise APIError(
                400,
                f"metadata holds at most {MAX_METADATA_PAIRS} pairs, keys up to 64 and values up to 512 characters",
                param="metadata",
                code="invalid_value",
            )
        source = self._own_file(owner, request.input_file_id, "input_file_id")
        if source.purpose != BATCH_PURPOSE:
            raise APIError(
                400, f"{source.id} was not uploaded with purpose 'batch'", param="input_file_id", code="invalid_value"
            )
        if (source.lines or 0) > self.limits.max_lines_per_batch:
            raise APIError(
                400,
                f"{source.id} holds {source.lines:,} requests; a batch takes at most "
                f"{self.limits.max_lines_per_batch:,}",
                param="input_file_id",
                code="too_many_requests",
            )
        active = [b for b in self.store.batches() if b.owner == owner and b.status not in TERMINAL_STATUSES]
        active = [b for b in map(self._refresh, active) if b.status not in TERMINAL_STATUSES]
        if len(active) >= self.limits.max_concurrent_batches_per_key:
            raise APIError(
                429,
                f"this key has {len(active)} unfinished batches, the limit; wait for one to finish or cancel one",
                code="too_many_active_batches",
            )
        created = self.now()
        batch_id = f"batch_{uuid.uuid4().hex}"
        record = StoredBatch(
            id=batch_id,
            owner=owner,
            job_id=f"gemma-unified-{batch_id}",
            endpoint=request.endpoint,
            model=self.spec.model_id,
            input_file_id=source.id,
            completion_window=request.completion_window,
            status="validating",
            created_at=created,
            expires_at=created + WINDOW_S,
            request_counts=RequestCounts(total=source.lines or 0),
            metadata=request.metadata,
        )
        job = self._job(record)
        self.store.save_batch(record)  # before submitting: a job always has its record
        try:
            self.submitter.submit(job, record.job_id)
        except SubmitError as exc:
            logger.warning("batch %s: submission failed: %s", batch_id, exc)
            error = BatchError(code="submission_failed", message=str(exc))
            record = record.model_copy(
                update={"status": "failed", "failed_at": self.now(), "errors": BatchErrors(data=[error])}
            )
            self.store.save_batch(record)
        return record.public()

    def _own_batch(self, owner: str, batch_id: str) -> StoredBatch:
        record = self.store.batch(batch_id)
        if record is None or record.owner != owner:
            raise _not_found("batch", batch_id)
        return record

    def retrieve_batch(self, owner: str, batch_id: str) -> Batch:
        return self._refresh(self._own_batch(owner, batch_id)).public()

    def list_batches(self, owner: str, *, after: str | None = None, limit: int = 20) -> BatchList:
        records = [r for r in self.store.batches() if r.owner == owner]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return BatchList(**_listing(records, after, limit, lambda record: self._refresh(record).public()))

    def cancel_batch(self, owner: str, batch_id: str) -> Batch:
        record = self._refresh(self._own_batch(owner, batch_id))
        if record.status in TERMINAL_STATUSES:
            raise APIError(409, f"{batch_id} is already {record.status}", code="batch_not_cancellable")
        if record.status != "cancelling":
            record = record.model_copy(update={"status": "cancelling", "cancelling_at": self.now()})
            self.store.save_batch(record)
        try:
            self.submitter.stop(record.job_id)
        except SubmitError as exc:  # the next look at the batch reads what became of the job
            logger.warning("batch %s: could not stop job %s: %s", batch_id, record.job_id, exc)
        return record.public()

    # ---- state ----

    def _output(self, record: StoredBatch) -> OutputDir:
        output = OutputDir(self.store.url_of(self.store.output_path(record.id)), self.store.storage_options)
        for folder in (RESULTS, ERRORS):  # the job adds parts and rewrites _job.json: no stale listing
            output.fs.invalidate_cache(output.path(folder))
        return output

    def _refresh(self, record: StoredBatch) -> StoredBatch:
        """Read the job's state, store what changed, and register the output files once the batch is over."""
        if record.status in TERMINAL_STATUSES:
            return record
        try:
            job = self.submitter.state(record.job_id)
        except SubmitError as exc:  # the cluster does not answer now: the record as last seen
            logger.warning("batch %s: cannot read job %s: %s", record.id, record.job_id, exc)
            return record
        output = self._output(record)
        manifest = output.read_manifest()
        progress = self._progress(output, job, manifest)
        now = self.now()
        current = observe(record, job, manifest, progress, now)
        if current.status not in TERMINAL_STATUSES and record.expires_at and now >= record.expires_at:
            self._stop_quietly(current)
            current = current.model_copy(update={"status": "expired", "expired_at": now})
        if current.status == "cancelled" and job is not None and job.status in JOB_ENDED:
            self._write_finished(current, output, manifest)
        if current.status in TERMINAL_STATUSES:
            current = self._register_outputs(current)
            logger.info("batch %s is %s: %s", record.id, current.status, current.request_counts)
        if current != record:
            self.store.save_batch(current)
        return current

    @staticmethod
    def _progress(output: OutputDir, job: JobState | None, manifest: dict | None) -> RequestCounts:
        if job is None or job.status == "PENDING" or (manifest or {}).get("counts"):
            return RequestCounts()
        return RequestCounts(completed=output.count_ids(RESULTS), failed=output.count_ids(ERRORS))

    def _stop_quietly(self, record: StoredBatch) -> None:
        try:
            self.submitter.stop(record.job_id)
        except SubmitError as exc:
            logger.warning("batch %s: could not stop expired job %s: %s", record.id, record.job_id, exc)

    def _write_finished(self, record: StoredBatch, output: OutputDir, manifest: dict | None) -> None:
        """A stopped job leaves its finished lines in its result and error parts without output.jsonl: write the
        two files from them as the job would have (same ids), so a cancelled batch's answers can be downloaded."""
        if self.store.size(f"{self.store.output_path(record.id)}/{OUTPUT_FILE}") is not None:
            return
        if not output.parts(RESULTS) and not output.parts(ERRORS):
            return  # stopped before anything finished: no output file, as OpenAI's
        job_key = (manifest or {}).get("fingerprint") or self._job(record).fingerprint()
        counts = write_batch_output(output, job_key=job_key, model_id=record.model or self.spec.model_id)
        logger.info(
            "batch %s: kept %d answers and %d errors of its stopped job", record.id, counts.succeeded, counts.failed
        )

    def _job(self, record: StoredBatch) -> JobSpec:
        source = f"{FILES}/{record.input_file_id}.jsonl"
        return batch_job(self.spec, self.store.url_of(source), self.store.url_of(self.store.output_path(record.id)))

    def _register_outputs(self, record: StoredBatch) -> StoredBatch:
        """The job's output.jsonl and errors.jsonl as files of the batch's owner (kept also for a cancelled or
        expired batch: what finished stays). Ids follow from the batch's, so replicas racing here agree."""
        update = {}
        suffix = record.id.removeprefix("batch_")
        for field, name, always in (("output_file_id", OUTPUT_FILE, True), ("error_file_id", ERROR_FILE, False)):
            relative = f"{self.store.output_path(record.id)}/{name}"
            size = self.store.size(relative)
            if size is None or (size == 0 and not always):
                continue
            file_id = f"file-{suffix}-{name.split('.')[0]}"
            if self.store.file(file_id) is None:
                self.store.save_file(
                    StoredFile(
                        id=file_id,
                        bytes=size,
                        created_at=self.now(),
                        filename=f"{record.id}_{name}",
                        purpose=OUTPUT_PURPOSE,
                        owner=record.owner,
                        path=relative,
                    )
                )
            update[field] = file_id
        return record.model_copy(update=update)
