"""The local runner's process handling, with a stand-in for `gemma-unified run` (fast, no Ray)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from jobs.job_files import build_job
from jobs.runners import LocalRunner

# Reads the spec it is given, then behaves as the environment says: sleep, print, exit with a code.
FAKE_RUN = (
    "import json, os, sys, time; spec = json.load(open(sys.argv[1])); "
    "print('output', spec['output']['url']); sys.stdout.flush(); "
    "time.sleep(float(os.environ.get('FAKE_SLEEP', '0'))); sys.exit(int(os.environ.get('FAKE_EXIT', '0')))"
)
JOB = build_job({"input": {"url": "/data/in"}, "output": {"url": "/data/out"}})


@pytest.fixture
def local(tmp_path):
    runner = LocalRunner(tmp_path / "runs", command=[sys.executable, "-c", FAKE_RUN])
    yield runner
    for folder in (tmp_path / "runs").glob("*"):
        runner.stop(folder.name)


def wait_for_outcome(runner, job_id, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = runner.poll(job_id)
        if outcome is not None:
            return outcome
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not finish")


def test_a_run_that_exits_zero_succeeds_and_gets_the_spec(local):
    local.start("ok", JOB, {})
    assert wait_for_outcome(local, "ok").state == "succeeded"
    assert "output /data/out" in local.log_tail("ok")


def test_a_failing_run_reports_its_exit_code_and_log(local):
    local.start("bad", JOB, {"FAKE_EXIT": "2"})
    outcome = wait_for_outcome(local, "bad")
    assert outcome.state == "failed" and outcome.error.startswith("exit code 2:") and "/data/out" in outcome.error


def test_a_run_outlives_its_scheduler_and_is_adopted(local):
    local.start("long", JOB, {"FAKE_SLEEP": "1.5"})
    adopter = LocalRunner(local.root, command=local.command)  # a restarted scheduler's runner
    assert adopter.poll("long") is None
    assert wait_for_outcome(adopter, "long").state == "succeeded"


def test_a_killed_run_is_lost_and_a_stopped_one_is_gone(local):
    local.start("killed", JOB, {"FAKE_SLEEP": "60"})
    local.start("stopped", JOB, {"FAKE_SLEEP": "60"})
    os.killpg(int((local.folder("killed") / "pid").read_text()), signal.SIGKILL)
    assert wait_for_outcome(local, "killed").state == "lost"
    local.stop("stopped")
    assert local.poll("stopped").state == "lost"  # the scheduler has already recorded it as stopped


def test_an_unknown_run_is_lost_and_forget_removes_its_folder(local):
    assert local.poll("never-started").state == "lost"
    local.start("done", JOB, {})
    wait_for_outcome(local, "done")
    local.forget("done")
    assert not local.folder("done").exists()
