"""A real two-node Ray cluster on this machine: a head, and a worker holding a custom `gpu_node` resource that
stands in for a GPU node. Jobs go in through the Job Submission API; the model actors must land on the worker."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from ray_nodes import Head, node_env, node_ports, start_node, stop_node, wait_until
from typer.testing import CliRunner

from jobs.cli.cluster import jobs_app, submit
from jobs.demo.samples import make_samples
from pipelines.output import ERRORS, RESULTS, OutputDir

pytestmark = pytest.mark.slow

GENERATE_ACTOR = "MapBatches(Generate)"


@dataclass
class Cluster:
    address: str  # the dashboard: where jobs are submitted

    def nodes(self):
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.address) if n.state == "ALIVE"]

    def worker_node_id(self) -> str:
        return next(n.node_id for n in self.nodes() if "gpu_node" in (n.resources_total or {}))


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    temp_head = tempfile.mkdtemp(prefix="gu-head-", dir="/tmp")
    temp_worker = tempfile.mkdtemp(prefix="gu-worker-", dir="/tmp")
    env = node_env()
    head = Head.start(env, logs / "head.log", temp_head, num_cpus=2)
    processes = [head.process]
    try:
        worker = start_node(
            [
                "--address",
                head.gcs_address,
                "--num-cpus",
                "2",
                "--resources",
                json.dumps({"gpu_node": 1}),
                "--object-store-memory",
                str(200 * 1024 * 1024),
                "--temp-dir",
                temp_worker,
                *node_ports(),
            ],
            env,
            logs / "worker.log",
        )
        processes.append(worker)
        running = Cluster(head.address)
        wait_until(lambda: len(running.nodes()) == 2, 90, "two nodes", processes)
        yield running
    finally:
        for process in reversed(processes):
            stop_node(process)
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
    wait_until(
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
