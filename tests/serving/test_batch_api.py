"""/v1/files and /v1/batches over HTTP, without Ray: the app's routes called through the official `openai` client
(over FastAPI's TestClient), a recorder standing in for the cluster, and raw HTTP for the refusals."""

from __future__ import annotations

import json

import openai
import pytest
from batch_helpers import FakeCluster, batch_file, finish_job
from fastapi.testclient import TestClient
from openai_schema import check

from serving.auth import Authenticator, configured_digests
from serving.batch_store import BatchStore
from serving.batches import BatchService
from serving.metrics import Metrics
from serving.router import build_api
from serving.spec import build_spec

KEYS = ["key-alice", "key-bob"]


@pytest.fixture
def app(tmp_path):
    spec = build_spec({"batch": {"storage_url": str(tmp_path / "store"), "max_file_bytes": 2048}})
    cluster = FakeCluster()
    service = BatchService(spec, BatchStore(spec.batch.storage_url), cluster)
    # The batch routes need neither the model nor the tokenizer.
    api = build_api(
        spec, None, None, authenticator=Authenticator(configured_digests(KEYS, {})), metrics=Metrics(), batches=service
    )
    with TestClient(api) as http:
        yield http, cluster, spec


def client(http, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0)


def test_the_openai_client_uploads_runs_and_downloads_a_batch(app):
    http, cluster, spec = app
    alice = client(http)
    uploaded = alice.files.create(file=("requests.jsonl", batch_file("a", "b")), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(batch_file("a", "b"))
    assert uploaded.filename == "requests.jsonl" and uploaded.purpose == "batch"
    assert [f.id for f in alice.files.list()] == [uploaded.id]
    assert alice.files.retrieve(uploaded.id).id == uploaded.id
    assert alice.files.content(uploaded.id).content == batch_file("a", "b")

    batch = alice.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "1"}
    )
    assert batch.status == "validating" and batch.metadata == {"run": "1"} and batch.request_counts.total == 2
    assert [b.id for b in alice.batches.list()] == [batch.id]
    finish_job(f"{spec.batch.storage_url}/batches/{batch.id}/output", ["a"], ["b"], status="partial")
    cluster.set(f"gemma-unified-{batch.id}", "FAILED", 100, 160, "exit code 1")
    done = alice.batches.retrieve(batch.id)
    assert done.status == "completed" and done.completed_at == 160
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    results = [json.loads(line) for line in alice.files.content(done.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in results] == ["a"]
    assert json.loads(alice.files.content(done.error_file_id).text)["custom_id"] == "b"
    assert {f.purpose for f in alice.files.list()} == {"batch", "batch_output"}

    with pytest.raises(openai.ConflictError):
        alice.batches.cancel(batch.id)
    deleted = alice.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(uploaded.id)


def test_a_key_sees_only_what_it_created(app):
    http, _, _ = app
    alice, bob = client(http), client(http, KEYS[1])
    uploaded = alice.files.create(file=("r.jsonl", batch_file("a")), purpose="batch")
    batch = alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (
        lambda: bob.files.retrieve(uploaded.id),
        lambda: bob.files.content(uploaded.id),
        lambda: bob.files.delete(uploaded.id),
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert list(bob.files.list()) == [] and list(bob.batches.list()) == []
    cancelled = alice.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    assert alice.batches.retrieve(batch.id).status == "cancelled"


def refusal(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    check("ErrorResponse", body)
    return body["error"]


def test_refusals_are_openai_errors(app):
    http, _, _ = app
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    assert refusal(http.get("/v1/files"), 401)["code"] == "missing_api_key"
    assert refusal(http.get("/v1/batches", headers={"Authorization": "Bearer nope"}), 401)["code"] == "invalid_api_key"

    def upload(content: bytes, purpose: str = "batch"):
        return http.post("/v1/files", headers=auth, files={"file": ("r.jsonl", content)}, data={"purpose": purpose})

    bad = refusal(upload(batch_file("a") + b"oops\n"), 400)
    assert bad["message"].startswith("line 2:") and bad["code"] == "invalid_batch_line" and bad["param"] == "file"
    assert "lines 1, 2" in refusal(upload(batch_file("a", "a")), 400)["message"]
    assert refusal(upload(batch_file("x" * 2100)), 413)["code"] == "file_too_large"
    assert refusal(upload(b"x" * 200_000), 413)["code"] == "request_too_large"  # stopped before the app reads it
    assert refusal(upload(batch_file("a"), purpose="fine-tune"), 400)["param"] == "purpose"
    assert refusal(http.post("/v1/files", headers=auth, data={"purpose": "batch"}), 400)["param"] == "file"
    assert refusal(http.get("/v1/files?limit=0", headers=auth), 400)["param"] == "limit"

    file_id = upload(batch_file("a")).json()["id"]
    create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert refusal(http.post("/v1/batches", headers=auth, json={**create, "endpoint": "/v1/x"}), 400)["param"] == (
        "endpoint"
    )
    assert refusal(http.post("/v1/batches", headers=auth, json={"endpoint": "/v1/x"}), 400)["param"] == (
        "input_file_id"
    )
    assert (
        refusal(http.post("/v1/batches", headers={**auth, "Content-Type": "application/json"}, content=b"{"), 400)[
            "code"
        ]
        == "invalid_json"
    )
    assert refusal(http.get("/v1/batches/batch_nothere", headers=auth), 404)["code"] == "batch_not_found"
    assert refusal(http.get("/v1/files/..%2F..%2Fetc", headers=auth), 404)["type"] == "not_found_error"
