"""/v1/files and /v1/batches logic without HTTP and without Ray: the store under a local directory, the cluster a
recorder whose job states the tests set, the job's output written as the job writes it."""

from __future__ import annotations

import io
import json

import pytest
from batch_helpers import FakeCluster, batch_file, finish_job, request_line, write_results

from pipelines.output import RESULTS, OutputDir
from pipelines.submission import SubmitError
from serving.batch_jobs import SUBMIT_GRACE_S
from serving.batch_protocol import BatchCreateRequest
from serving.batch_store import BatchStore
from serving.batches import BatchService
from serving.errors import APIError
from serving.spec import build_spec

ALICE, BOB = "a" * 64, "b" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path):
    spec = build_spec(
        {
            "served_model_name": "gemma-batch",
            "batch": {
                "storage_url": str(tmp_path / "batches"),
                "max_file_bytes": 4096,
                "max_lines_per_batch": 5,
                "max_concurrent_batches_per_key": 2,
                "resources": {"replicas": 1, "batch_size": 2},
            },
            "limits": {"max_output_tokens": 16},
        }
    )
    cluster, clock = FakeCluster(), Clock()
    service = BatchService(spec, BatchStore(spec.batch.storage_url), cluster, clock)
    return service, cluster, clock


def upload(service, content: bytes, owner: str = ALICE, name: str = "requests.jsonl"):
    return service.upload(owner, name, "batch", io.BytesIO(content))


def create(service, owner: str = ALICE, file_id: str | None = None, **fields):
    file_id = file_id or upload(service, batch_file("a", "b", "c"), owner).id
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
    return service.create_batch(owner, BatchCreateRequest.model_validate(body))


def refused(call, status: int, *words: str) -> APIError:
    with pytest.raises(APIError) as caught:
        call()
    assert caught.value.status == status, caught.value.message
    for word in words:
        assert word in caught.value.message
    return caught.value


# ---- files ----


def test_a_file_is_stored_listed_read_and_deleted_by_its_owner_only(setup):
    service, _, clock = setup
    content = batch_file("a", "b")
    first = upload(service, content)
    clock.now += 1
    second = upload(service, batch_file("c"), name="../../other.jsonl")
    assert first.object == "file" and first.bytes == len(content) and first.purpose == "batch"
    assert second.filename == "other.jsonl"
    assert [f.id for f in service.list_files(ALICE).data] == [second.id, first.id]  # newest first
    assert [f.id for f in service.list_files(ALICE, order="asc").data] == [first.id, second.id]
    page = service.list_files(ALICE, limit=1)
    assert page.has_more and page.first_id == page.last_id == second.id
    assert [f.id for f in service.list_files(ALICE, after=second.id).data] == [first.id]
    assert service.list_files(ALICE, purpose="batch_output").data == []
    _, chunks = service.content(ALICE, first.id)
    assert b"".join(chunks) == content
    # Another key: nothing there, not even a 403 that would say the id exists.
    assert service.list_files(BOB).data == []
    refused(lambda: service.retrieve_file(BOB, first.id), 404)
    refused(lambda: service.content(BOB, first.id), 404)
    refused(lambda: service.delete_file(BOB, first.id), 404)
    assert service.delete_file(ALICE, first.id).deleted
    refused(lambda: service.retrieve_file(ALICE, first.id), 404)
    refused(lambda: service.retrieve_file(ALICE, "file-../../etc/passwd"), 404)


@pytest.mark.parametrize(
    "content, status, words",
    [
        (batch_file("a") + b"{not json\n", 400, ["line 2"]),
        (batch_file("a") + json.dumps({**request_line("b"), "method": "GET"}).encode() + b"\n", 400, ["line 2"]),
        (batch_file("a", "b", "a"), 400, ["'a'", "lines 1, 3"]),
        (batch_file(*"abcdef"), 400, ["more than 5"]),
        (b"\n\n", 400, ["no requests"]),
        (batch_file("x" * 5000), 413, ["limit is 4,096"]),
    ],
    ids=["not-json", "not-post", "duplicates", "too-many-lines", "empty", "too-large"],
)
def test_a_bad_file_is_refused_whole_and_nothing_is_stored(setup, content, status, words):
    service, _, _ = setup
    refused(lambda: upload(service, content), status, *words)
    assert service.list_files(ALICE).data == []


def test_only_batch_files_are_accepted(setup):
    service, _, _ = setup
    error = refused(lambda: service.upload(ALICE, "x.jsonl", "fine-tune", io.BytesIO(batch_file("a"))), 400)
    assert error.param == "purpose"


def test_records_live_in_storage_so_another_replica_or_a_restart_sees_them(setup):
    service, cluster, clock = setup
    batch = create(service)
    again = BatchService(service.spec, BatchStore(service.spec.batch.storage_url), cluster, clock)
    assert again.retrieve_batch(ALICE, batch.id).id == batch.id
    assert [f.id for f in again.list_files(ALICE).data] == [batch.input_file_id]


# ---- batches ----


def test_creating_a_batch_submits_the_endpoints_settings_as_a_batch_job(setup):
    service, cluster, clock = setup
    batch = create(service, metadata={"project": "x"})
    assert batch.status == "validating" and batch.object == "batch" and batch.metadata == {"project": "x"}
    assert batch.request_counts.total == 3 and batch.expires_at == batch.created_at + 24 * 3600
    ((job_id, job),) = cluster.specs.items()
    root = service.spec.batch.storage_url
    assert job.input.url == f"{root}/files/{batch.input_file_id}.jsonl" and job.input.format == "openai-batch"
    assert job.output.url == f"{root}/batches/{batch.id}/output"
    assert job.chat.served_model_name == "gemma-batch" and job.chat.limits.max_output_tokens == 16
    assert job.resources.batch_size == 2 and job.model == service.spec.model
    refused(lambda: service.retrieve_batch(BOB, batch.id), 404)
    assert service.list_batches(BOB).data == []


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"endpoint": "/v1/embeddings"}, None),
        ({"completion_window": "1h"}, None),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"file_id": "file-nothere"}, "input_file_id"),
    ],
)
def test_bad_batch_requests_are_refused(setup, fields, param):
    service, cluster, _ = setup
    error = refused(lambda: create(service, **fields), 404 if "file_id" in fields else 400)
    assert param is None or error.param == param
    assert cluster.specs == {}


def test_another_keys_file_cannot_start_a_batch(setup):
    service, _, _ = setup
    file_id = upload(service, batch_file("a"), owner=BOB).id
    refused(lambda: create(service, file_id=file_id), 404)


def test_the_states_follow_the_job_and_its_output(setup):
    service, cluster, clock = setup
    batch = create(service)
    job_id = next(iter(cluster.jobs))
    output = f"{service.spec.batch.storage_url}/batches/{batch.id}/output"
    start = int(clock.now) + 5
    assert service.retrieve_batch(ALICE, batch.id).status == "validating"

    cluster.set(job_id, "RUNNING", start)
    write_results(output, ["a"], ["b"])
    running = service.retrieve_batch(ALICE, batch.id)
    assert running.status == "in_progress" and running.in_progress_at == int(clock.now)  # first seen running
    OutputDir(output, {}).write_manifest({"status": "running", "started_at": "2023-11-14T22:13:30+00:00"})
    assert service.retrieve_batch(ALICE, batch.id).in_progress_at == int(clock.now)  # set once, kept
    assert running.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 1}

    finish_job(output, ["a", "c"], ["b"], status="partial")
    clock.now += 60
    assert service.retrieve_batch(ALICE, batch.id).status == "finalizing"  # the manifest is done, the job not yet

    cluster.set(job_id, "FAILED", start, start + 70, "exit code 1")  # `run` exits 1 when some lines failed
    done = service.retrieve_batch(ALICE, batch.id)
    assert done.status == "completed" and done.completed_at == start + 70 and done.errors is None
    assert done.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert done.output_file_id and done.error_file_id
    output_file = service.retrieve_file(ALICE, done.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.filename == f"{batch.id}_output.jsonl"
    lines = [json.loads(line) for line in b"".join(service.content(ALICE, done.output_file_id)[1]).splitlines()]
    assert [line["custom_id"] for line in lines] == ["a", "c"]
    errors = b"".join(service.content(ALICE, done.error_file_id)[1]).decode()
    assert json.loads(errors)["custom_id"] == "b"
    refused(lambda: service.content(BOB, done.output_file_id), 404)

    # A terminal batch is settled: the cluster forgetting its job changes nothing.
    cluster.jobs.clear()
    assert service.retrieve_batch(ALICE, batch.id) == done
    refused(lambda: service.cancel_batch(ALICE, batch.id), 409)


def test_a_clean_run_has_no_error_file(setup):
    service, cluster, _ = setup
    batch = create(service)
    finish_job(f"{service.spec.batch.storage_url}/batches/{batch.id}/output", ["a", "b", "c"])
    cluster.set(next(iter(cluster.jobs)), "SUCCEEDED", 1, 2)
    done = service.retrieve_batch(ALICE, batch.id)
    assert done.status == "completed" and done.output_file_id and done.error_file_id is None


def test_a_failed_job_fails_the_batch_with_its_reason(setup):
    service, cluster, _ = setup
    batch = create(service)
    output = f"{service.spec.batch.storage_url}/batches/{batch.id}/output"
    OutputDir(output, {}).write_manifest({"status": "failed", "reason": "the model could not load"})
    cluster.set(next(iter(cluster.jobs)), "FAILED", 1, 2, "exit code 2")
    failed = service.retrieve_batch(ALICE, batch.id)
    assert failed.status == "failed" and failed.failed_at == 2
    assert failed.errors.data[0].message == "the model could not load"


def test_cancel_stops_the_job_and_keeps_what_finished(setup):
    service, cluster, _ = setup
    batch = create(service)
    job_id = next(iter(cluster.jobs))
    cluster.set(job_id, "RUNNING", 10)
    output = f"{service.spec.batch.storage_url}/batches/{batch.id}/output"
    write_results(output, ["a"])
    cancelling = service.cancel_batch(ALICE, batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at and cluster.stopped == [job_id]
    refused(lambda: service.cancel_batch(BOB, batch.id), 404)
    cancelled = service.retrieve_batch(ALICE, batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.request_counts.completed == 1
    # The stopped job wrote no output.jsonl: the finished answer is written from its parts, as the job would have.
    (answer,) = [
        json.loads(line) for line in b"".join(service.content(ALICE, cancelled.output_file_id)[1]).splitlines()
    ]
    assert (
        answer["custom_id"] == "a" and answer["response"]["body"]["choices"][0]["message"]["content"] == "answer to a"
    )
    assert cancelled.error_file_id is None
    assert list(OutputDir(output, {}).read_column(RESULTS)) == ["a"]  # kept: a rerun would resume from it


def test_a_batch_past_its_window_expires_and_its_job_stops(setup):
    service, cluster, clock = setup
    batch = create(service)
    job_id = next(iter(cluster.jobs))
    cluster.set(job_id, "RUNNING", 10)
    clock.now += 24 * 3600 + 1
    expired = service.retrieve_batch(ALICE, batch.id)
    assert expired.status == "expired" and expired.expired_at == int(clock.now) and cluster.stopped == [job_id]


def test_unfinished_batches_per_key_are_limited(setup):
    service, cluster, _ = setup
    first, _second = create(service), create(service)
    error = refused(lambda: create(service), 429, "2 unfinished")
    assert error.code == "too_many_active_batches"
    create(service, owner=BOB)  # another key has its own allowance
    finish_job(f"{service.spec.batch.storage_url}/batches/{first.id}/output", ["a", "b", "c"])
    cluster.set(f"gemma-unified-{first.id}", "SUCCEEDED", 1, 2)
    assert create(service).status == "validating"


def test_a_refused_submission_or_a_lost_job_fails_the_batch(setup):
    service, cluster, clock = setup
    cluster.refuse = SubmitError("cannot reach a Ray cluster at http://head:8265")
    refused_batch = create(service)
    assert refused_batch.status == "failed" and refused_batch.errors.data[0].code == "submission_failed"
    cluster.refuse = None
    lost = create(service)
    cluster.jobs.clear()
    assert service.retrieve_batch(ALICE, lost.id).status == "validating"  # still being submitted, maybe
    clock.now += SUBMIT_GRACE_S + 1
    gone = service.retrieve_batch(ALICE, lost.id)
    assert gone.status == "failed" and gone.errors.data[0].code == "job_lost"


def test_batches_list_newest_first_with_a_cursor(setup):
    service, _, clock = setup
    ids = []
    for _ in range(2):  # the key's limit of unfinished batches
        ids.append(create(service).id)
        clock.now += 1
    listed = service.list_batches(ALICE)
    assert [b.id for b in listed.data] == ids[::-1] and not listed.has_more
    page = service.list_batches(ALICE, limit=1)
    assert [b.id for b in page.data] == [ids[1]] and page.has_more and page.last_id == ids[1]
    assert [b.id for b in service.list_batches(ALICE, after=ids[1]).data] == [ids[0]]


def test_in_progress_at_is_when_the_run_began_as_its_manifest_says(setup):
    service, cluster, clock = setup
    batch = create(service)
    output = OutputDir(f"{service.spec.batch.storage_url}/batches/{batch.id}/output", {})
    output.write_manifest({"status": "running", "started_at": "2023-11-14T22:13:30+00:00"})
    cluster.set(next(iter(cluster.jobs)), "RUNNING", int(clock.now))
    clock.now += 600  # first looked at long after the run began
    assert service.retrieve_batch(ALICE, batch.id).in_progress_at == 1_700_000_010
