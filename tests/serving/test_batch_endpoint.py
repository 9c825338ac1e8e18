"""OpenAI's Batch API end to end: a Ray head with the dashboard, `gemma-unified serve --address` on it in a process
of its own, files and batch records in a real S3-compatible server on loopback, batch jobs submitted by the endpoint
through the Job Submission API, and the official `openai` client doing what a user does."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from ray_nodes import Head, free_ports, node_env, stop_node

pytestmark = pytest.mark.slow

KEYS = ["batch-key-alice", "batch-key-bob"]
BUCKET = "batch-store"
GOOD = ["q1", "q2", "q3"]


def request(custom_id: str, content, max_tokens: int = 4) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


class Endpoint:
    """`gemma-unified serve` on the cluster, as a process that can be stopped and started again."""

    def __init__(self, config: Path, gcs_address: str, port: int, env: dict, log: Path) -> None:
        self.command = [
            str(Path(sys.executable).parent / "gemma-unified"),
            "serve",
            str(config),
            "--address",
            gcs_address,
        ]
        self.base = f"http://127.0.0.1:{port}"
        self.env, self.log = env, log
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> None:
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base, timeout=10, trust_env=False) as http:
            while True:
                assert self.process.poll() is None, f"the endpoint exited: {self.log.read_text()[-3000:]}"
                try:
                    if http.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the endpoint did not become ready"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # `serve` deletes its app and leaves, like Ctrl-C
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def client(self, key: str = KEYS[0]) -> openai.OpenAI:
        return openai.OpenAI(api_key=key, base_url=f"{self.base}/v1", max_retries=2, timeout=60)


@pytest.fixture(scope="module")
def storage(s3_server) -> dict:
    import s3fs

    options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    return options


@pytest.fixture(scope="module")
def endpoint(tiny_dir, storage, tmp_path_factory):
    logs = tmp_path_factory.mktemp("batch-endpoint-logs")
    temp_dir = tempfile.mkdtemp(prefix="gu-batch-", dir="/tmp")
    env = node_env()
    head = Head.start(env, logs / "head.log", temp_dir, num_cpus=4, object_store_mb=300)
    (port,) = free_ports(1)
    config = logs / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "app_name": "batches",
                "engine": {"speculative": False},
                "limits": {"max_output_tokens": 16},
                "resources": {"ingress": {"num_cpus": 0.25}, "model": {"num_cpus": 0.25, "torch_threads": 1}},
                "autoscaling": {"ingress": {"max_replicas": 1}, "model": {"max_replicas": 1}},
                "auth": {"api_keys": KEYS},
                "http": {"host": "127.0.0.1", "port": port},
                "batch": {
                    "storage_url": f"s3://{BUCKET}/store",
                    "storage_options": storage,
                    "max_concurrent_batches_per_key": 2,
                    "resources": {"replicas": 1, "batch_size": 4, "cpus_per_replica": 0.5},
                },
            }
        )
    )
    running = Endpoint(config, head.gcs_address, port, env, logs / "serve.log")
    try:
        running.start()
        yield running
    finally:
        running.stop()
        stop_node(head.process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in statuses:
        assert batch.status not in {"failed", "expired", "cancelled", "completed"} - statuses, batch
        assert time.monotonic() < deadline, f"{batch_id} stayed {batch.status}"
        time.sleep(1.0)
    return batch


def submit(client: openai.OpenAI, lines: list[dict]):
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_batch_runs_to_completion_with_bad_lines_in_the_error_file(endpoint):
    client = endpoint.client()
    bad_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}
    lines = [request(c, f"Say {c}.") for c in GOOD]
    lines.append(request("bad-image", [{"type": "text", "text": "What is this?"}, bad_image]))
    lines.append(request("too-long", "Talk.", max_tokens=1000))  # over the endpoint's max_output_tokens
    batch = submit(client, lines)
    assert batch.status == "validating" and batch.request_counts.total == 5
    done = wait_for(client, batch.id, {"completed"})
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 3, 2)
    assert done.in_progress_at and done.completed_at and done.output_file_id and done.error_file_id

    answers = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(a["custom_id"] for a in answers) == GOOD
    for answer in answers:
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        body = answer["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["usage"]["completion_tokens"] <= 4
    errors = {
        e["custom_id"]: e["error"] for e in map(json.loads, client.files.content(done.error_file_id).text.splitlines())
    }
    assert set(errors) == {"bad-image", "too-long"} and all(e["message"] for e in errors.values())

    # Another key: the batch and its files do not exist for it.
    other = endpoint.client(KEYS[1])
    for call in (lambda: other.batches.retrieve(batch.id), lambda: other.files.content(done.output_file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [b.id for b in other.batches.list()] == []


def test_cancelling_a_running_batch_stops_its_job(endpoint):
    client = endpoint.client()
    batch = submit(client, [request(f"long-{i}", "Tell a story.", max_tokens=16) for i in range(40)])
    wait_for(client, batch.id, {"in_progress"})
    assert client.batches.cancel(batch.id).status == "cancelling"
    cancelled = wait_for(client, batch.id, {"cancelled"}, timeout_s=120)
    finished = cancelled.request_counts.completed
    assert cancelled.cancelled_at and finished < 40
    # What finished before the stop is kept, and downloadable like a completed batch's answers.
    kept = client.files.content(cancelled.output_file_id).text.splitlines() if cancelled.output_file_id else []
    assert len(kept) == finished and all(json.loads(line)["response"]["status_code"] == 200 for line in kept)


def test_a_batch_survives_an_endpoint_restart(endpoint):
    client = endpoint.client()
    batch = submit(client, [request(c, f"Say {c}.") for c in GOOD])
    endpoint.stop()
    endpoint.start()
    done = wait_for(endpoint.client(), batch.id, {"completed"})
    assert done.request_counts.completed == 3
    assert len(client.files.content(done.output_file_id).text.splitlines()) == 3
