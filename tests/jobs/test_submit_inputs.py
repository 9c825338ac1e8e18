"""Submission without a cluster: what travels in the runtime env, and bad input refused before anything is sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from jobs.cli.cluster import jobs_app, submit
from jobs.job_files import build_job
from pipelines.submission import ENTRYPOINT, SPEC_ENV, runtime_env

JOB = {
    "input": {"url": "/data/in"},
    "output": {"url": "/data/out"},
    "task": {"task": "caption", "max_new_tokens": 8},
    "resources": {"address": "ray://elsewhere:10001"},
}


def cli():
    app = typer.Typer()
    app.command()(submit)
    app.add_typer(jobs_app, name="jobs")
    return app


def test_the_runtime_env_carries_the_validated_spec_without_a_cluster_address():
    job = build_job(JOB)
    env = runtime_env(job, {"HF_TOKEN": "x"})["env_vars"]
    carried = build_job(json.loads(env[SPEC_ENV]))
    assert carried.fingerprint() == job.fingerprint()
    assert carried.task.max_new_tokens == 8 and carried.resources.address is None
    assert env["HF_TOKEN"] == "x" and env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_the_entrypoint_is_gemma_unified_run_on_the_carried_spec(tmp_path):
    job = build_job({**JOB, "input": {"url": str(tmp_path / "missing")}})
    env = {**os.environ, **runtime_env(job)["env_vars"]}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # The spec reaches `run` (its input check fails fast, before Ray starts): proof that the plumbing works.
    result = subprocess.run(
        ["/bin/sh", "-c", ENTRYPOINT], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"nothing found at {tmp_path / 'missing'}" in " ".join((result.stdout + result.stderr).split())


def test_an_invalid_spec_is_refused_before_contacting_the_cluster(tmp_path, closed_address):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, "task": {"task": "paint"}}))
    result = CliRunner().invoke(cli(), ["submit", str(path), "--address", closed_address])
    assert result.exit_code == 2
    assert str(path) in result.output and "task.task" in result.output and "cannot reach" not in result.output


def test_an_unreachable_cluster_is_reported(tmp_path, closed_address):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    result = CliRunner().invoke(cli(), ["submit", str(path), "--address", closed_address])
    assert result.exit_code == 2 and f"cannot reach a Ray cluster at {closed_address}" in result.output
    for command in (["jobs", "list"], ["jobs", "status", "x"], ["jobs", "logs", "x"], ["jobs", "stop", "x"]):
        result = CliRunner().invoke(cli(), [*command, "--address", closed_address])
        assert result.exit_code == 2 and "cannot reach" in result.output, command


def test_an_address_is_required(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    result = CliRunner().invoke(cli(), ["submit", str(path)])
    assert result.exit_code == 2 and "--address" in result.output
