"""A real two-node Ray cluster on this machine: a head, and a worker holding a custom `gpu_node` resource that
stands in for a GPU node. Jobs go in through the Job Submission API; the model actors must land on the worker."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from jobs.cli.cluster import jobs_app, submit
from jobs.demo.samples import make_samples
from pipelines.output import ERRORS, RESULTS, OutputDir

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
GENERATE_ACTOR = "MapBatches(Generate)"


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _free_range(size: int) -> tuple[int, int]:
    """A run of bindable ports below the ephemeral range and above Ray's default worker ports (10002-19999)."""
    for _ in range(50):
        base = random.randrange(20_000, 30_000 - size)
        try:
            with ExitStack() as stack:
                for port in range(base, base + size):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return base, base + size - 1
        except OSError:
            continue
    raise RuntimeError("no free port range")


def _node_ports() -> list[str]:
    manager, objects, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    low, high = _free_range(40)
    return [
        "--node-ip-address",
        "127.0.0.1",
        "--node-manager-port",
        str(manager),
        "--object-manager-port",
        str(objects),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
        "--min-worker-port",
        str(low),
        "--max-worker-port",
        str(high),
    ]


@dataclass
class Cluster:
    address: str  # the dashboard: where jobs are submitted

    def nodes(self):
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.address) if n.state == "ALIVE"]

    def worker_node_id(self) -> str:
        return next(n.node_id for n in self.nodes() if "gpu_node" in (n.resources_total or {}))


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Its own session: the whole node (ray start --block and what it spawns) is one process group to stop.
    return subprocess.Popen(
        [RAY, "start", "--block", "--disable-usage-stats", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # `ray start --block` drains and stops its node's processes on SIGTERM; signalling the whole group at once
    # would kill the GCS under it and leave it waiting a minute for a GCS that is gone.
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_until(check, timeout_s: float, what: str, processes=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a ray node exited while waiting for {what}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    from ray.job_submission import JobSubmissionClient

    logs = tmp_path_factory.mktemp("ray-logs")
    temp_head = tempfile.mkdtemp(prefix="gu-head-", dir="/tmp")
    temp_worker = tempfile.mkdtemp(prefix="gu-worker-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `gemma-unified` for jobs
    env["RAY_AUTH_MODE"] = "disabled"  # token auth is Ray's business, not this test's; see the README for clients
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain at teardown
    gcs_port, dashboard_port, client_port = _free_ports(3)
    head = _start(
        [
            "--head",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--include-dashboard",
            "true",
            "--ray-client-server-port",
            str(client_port),
            "--num-cpus",
            "2",
            "--object-store-memory",
            str(200 * 1024 * 1024),
            "--temp-dir",
            temp_head,
            *_node_ports(),
        ],
        env,
        logs / "head.log",
    )
    processes = [head]
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        _wait_until(lambda: JobSubmissionClient(address), 90, "the head", processes)
        worker = _start(
            [
                "--address",
                f"127.0.0.1:{gcs_port}",
                "--num-cpus",
                "2",
                "--resources",
                json.dumps({"gpu_node": 1}),
                "--object-store-memory",
                str(200 * 1024 * 1024),
                "--temp-dir",
                temp_worker,
                *_node_ports(),
            ],
            env,
            logs / "worker.log",
        )
        processes.append(worker)
        running = Cluster(address)
        _wait_until(lambda: len(running.nodes()) == 2, 90, "two nodes", processes)
        yield running
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(temp_head, ignore_errors=True)
        shutil.rmtree(temp_worker, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cluster-inbox")
    samples = [s for s in make_samples(tmp_path_factory.mktemp("samples")) if s.suffix in (".jpg", ".png", ".webp")]
    for sample in samples:
        shutil.copy(sample, folder / sample.name)
    for index, sample in enumerate(samples[:2]):
        shutil.copy(sample, folder / f"copy_{index}{sample.suffix}")
    return folder


def job_yaml(folder: Path, images: Path, output: Path) -> Path:
    path = folder / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "input": {"url": str(images)},
                "output": {"url": str(output)},
                "task": {"task": "caption", "max_new_tokens": 4},
                "engine": {"speculative": False},
                "resources": {
                    "replicas": 1,
                    "batch_size": 4,
                    "cpus_per_replica": 1,
                    "replica_resources": {"gpu_node": 1},
                },
            }
        )
    )
    return path


def cli():
    app = typer.Typer()
    app.command()(submit)
    app.add_typer(jobs_app, name="jobs")
    return app


def invoke(*args: str):
    return CliRunner().invoke(cli(), list(args), env={"COLUMNS": "200"})


@dataclass
class Submitted:
    job_id: str
    job_file: Path
    inbox: Path
    output: Path
    expected_ids: list[str]


@pytest.fixture(scope="module")
def submitted(cluster, images, tmp_path_factory) -> Submitted:
    """One job submitted through the CLI and waited for; the tests below inspect it, and the schedule resumes it."""
    folder = tmp_path_factory.mktemp("submitted")
    inbox = folder / "inbox"
    shutil.copytree(images, inbox)
    job_file = job_yaml(folder, inbox, folder / "captions")
    result = invoke("submit", str(job_file), "--address", cluster.address, "--wait")
    assert result.exit_code == 0, result.output
    return Submitted(
        result.output.splitlines()[0].strip(),
        job_file,
        inbox,
        folder / "captions",
        sorted(p.name for p in inbox.iterdir()),
    )


def test_a_submitted_job_completes_with_its_model_actors_on_the_worker_node(cluster, submitted):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    out = OutputDir(str(submitted.output), {})
    assert sorted(out.read_column(RESULTS)) == submitted.expected_ids and len(out.read_column(ERRORS)) == 0
    assert json.loads((submitted.output / "_job.json").read_text())["status"] == "succeeded"

    info = JobSubmissionClient(cluster.address).get_job_info(submitted.job_id)
    actors = [
        a
        for a in list_actors(address=cluster.address, limit=10_000)
        if GENERATE_ACTOR in (a.class_name or "") and a.job_id == info.job_id
    ]
    assert actors, "no model actor recorded for the job"
    assert {a.node_id for a in actors} == {cluster.worker_node_id()}


def test_jobs_commands_report_the_job(cluster, submitted):
    job_id = submitted.job_id
    listed = invoke("jobs", "list", "--address", cluster.address)
    assert listed.exit_code == 0 and job_id in listed.output and "SUCCEEDED" in listed.output
    status = invoke("jobs", "status", job_id, "--address", cluster.address)
    assert status.exit_code == 0 and "SUCCEEDED" in status.output
    logs = invoke("jobs", "logs", job_id, "--address", cluster.address)
    assert logs.exit_code == 0 and "this run: 5 succeeded, 0 failed" in logs.output
    assert invoke("jobs", "stop", job_id, "--address", cluster.address).exit_code == 1  # already ended
    again = invoke("submit", str(submitted.job_file), "--address", cluster.address, "--submission-id", job_id)
    assert again.exit_code == 2 and "refused" in again.output  # one submission id, one run


def test_stop_and_status_exit_codes(cluster, images, tmp_path):
    result = invoke("submit", str(job_yaml(tmp_path, images, tmp_path / "out")), "--address", cluster.address)
    assert result.exit_code == 0, result.output
    job_id = result.output.strip()
    assert invoke("jobs", "status", job_id, "--address", cluster.address).exit_code in (0, 3)
    assert invoke("jobs", "stop", job_id, "--address", cluster.address).exit_code == 0
    _wait_until(
        lambda: invoke("jobs", "status", job_id, "--address", cluster.address).exit_code != 3, 60, "the job to stop"
    )
    status = invoke("jobs", "status", job_id, "--address", cluster.address)
    assert status.exit_code == 1 and "STOPPED" in status.output
    assert invoke("jobs", "status", "no-such-job", "--address", cluster.address).exit_code == 2


def test_a_scheduled_run_on_the_cluster_processes_only_new_items(cluster, submitted, clock):
    from jobs.history import History
    from jobs.scheduler import Scheduler, default_runners
    from jobs.schedules import load_schedules

    shutil.copy(next(submitted.inbox.glob("*.png")), submitted.inbox / "new.png")
    schedules = submitted.job_file.parent / "schedules.yaml"
    schedules.write_text(
        yaml.safe_dump(
            {
                "schedules": [
                    {
                        "name": "captions",
                        "cron": "0 * * * *",
                        "job": submitted.job_file.name,
                        "address": cluster.address,
                    },
                ]
            }
        )
    )
    config = load_schedules(schedules)
    scheduler = Scheduler(config.schedules, History(config.state), default_runners(config), clock=clock)
    runs = scheduler.wait_for(scheduler.tick(), poll_s=1.0)
    assert [(r.job_id, r.state, r.succeeded, r.failed, r.skipped) for r in runs] == [
        ("captions-20250115T100000Z", "succeeded", 1, 0, 5)
    ], runs
    assert len(OutputDir(str(submitted.output), {}).read_column(RESULTS)) == 6
