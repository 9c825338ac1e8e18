"""One failure contract for every command, as a user meets it from a shell: one clear message and exit 2 when a
command cannot run (a traceback only with --verbose), exit 1 when items failed, 0 only when all succeeded, and
`_job.json` always in a terminal state with the reason."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.demo.samples import make_images

ROOT = Path(__file__).parents[1]


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local run unless told
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_message(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, no traceback, one `error:` line naming what failed."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    text = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in text, text


@pytest.fixture()
def images(tmp_path):
    make_images(tmp_path / "in", 2)
    return tmp_path / "in"


def test_a_mistyped_model_directory_stops_the_run_with_one_message(tiny_dir, images, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "run",
        "--task",
        "caption",
        "--input",
        str(images),
        "--output",
        str(out),
        "--model",
        "./models/gemma-4-12b-itt",
        "--no-progress",
    )
    one_message(result, "no model directory at './models/gemma-4-12b-itt'")
    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "failed" and "no model directory" in record["reason"]


@pytest.mark.slow  # whole CLI processes that wait on a network timeout or a model load
def test_verbose_adds_the_traceback_anywhere_on_the_line(tiny_dir, images, tmp_path):
    result = cli(
        "run",
        "--task",
        "caption",
        "--input",
        str(images),
        "--output",
        str(tmp_path / "out"),
        "--model",
        "./nope",
        "--no-progress",
        "--verbose",
    )
    assert result.returncode == 2 and "Traceback" in result.stderr and "no model directory" in result.stderr


def test_a_missing_engine_extra_is_named(tiny_dir, images, tmp_path):
    pytest.importorskip("ray")
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    result = cli(
        "run",
        "--task",
        "caption",
        "--input",
        str(images),
        "--output",
        str(tmp_path / "out"),
        "--engine",
        "vllm",
        "--no-progress",
    )
    one_message(result, "vLLM is not installed here", "'.[vllm]'")


@pytest.mark.slow  # whole CLI processes that wait on a network timeout or a model load
def test_an_unreachable_cluster_fails_within_a_minute(tiny_dir, images, tmp_path):
    started = time.monotonic()
    address = f"127.0.0.1:{_closed_port()}"
    result = cli(
        "run",
        "--task",
        "caption",
        "--input",
        str(images),
        "--output",
        str(tmp_path / "out"),
        "--address",
        address,
        "--no-progress",
    )
    one_message(result, f"cannot reach the Ray cluster at {address}")
    assert time.monotonic() - started < 60
    dashboard = cli(
        "run",
        "--task",
        "caption",
        "--input",
        str(images),
        "--output",
        str(tmp_path / "out2"),
        "--address",
        "http://127.0.0.1:8265",
        "--no-progress",
    )
    one_message(dashboard, "gemma-unified submit")


@pytest.mark.slow  # whole CLI processes that wait on a network timeout or a model load
def test_inspect_and_serve_with_a_missing_model(tiny_dir, images):
    one_message(cli("inspect", str(images / "image_0.jpg"), "--model", "/no/such/model"), "no model directory")
    one_message(cli("serve", "--model", "./no-such-model", "--port", str(_closed_port())), "no model directory")


@pytest.mark.slow
def test_a_crash_mid_run_leaves_a_terminal_job_record(tiny_dir, tmp_path):
    manifest = tmp_path / "broken.jsonl"
    manifest.write_text('{"uri": "a.jpg"}\nthis is not json\n')
    out = tmp_path / "out"
    result = cli(
        "run", "--task", "caption", "--input", str(manifest), "--output", str(out), "--no-progress", timeout=300
    )
    one_message(result)
    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "failed" and record["reason"] and "finished_at" in record


@pytest.mark.slow
def test_serve_reports_a_model_whose_weights_cannot_load(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "no-weights"  # tokenizer and config are there, so the pre-check passes; the replica fails
    shutil.copytree(tiny_dir, broken, ignore=shutil.ignore_patterns("*.safetensors", "assistant"))
    result = cli("serve", "--model", str(broken), "--port", str(_closed_port()), "--num-cpus", "2", timeout=400)
    one_message(result, "could not load", "no file named model.safetensors")


@pytest.mark.slow
def test_a_refused_authentication_token_is_one_message(ray_cluster, images, tmp_path):
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        pytest.skip("token authentication is off for this Ray instance")
    address = ray_cluster.get_runtime_context().gcs_address
    started = time.monotonic()
    result = cli(
        "run",
        "--task",
        "caption",
        "--input",
        str(images),
        "--output",
        str(tmp_path / "out"),
        "--address",
        address,
        "--no-progress",
        env={"RAY_AUTH_TOKEN": "not-the-cluster-token"},
    )
    one_message(result, "refused this client's authentication token", "RAY_AUTH_TOKEN")
    assert time.monotonic() - started < 60
