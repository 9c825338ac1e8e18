"""How the scheduler starts, watches and stops a run: on this machine, or on a Ray cluster.

Both run the same `gemma-unified run` entrypoint. A runner is addressed by a job id the scheduler chooses before
starting, so a restarted scheduler can find (or fail to find) the job of a run it recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.config import JobSpec


@dataclass(frozen=True)
class Outcome:
    """A finished run: `state` is succeeded, failed, stopped or lost."""

    state: str
    error: str | None = None


class Runner(Protocol):
    def start(self, job_id: str, job: JobSpec, env: dict[str, str]) -> None: ...

    def poll(self, job_id: str) -> Outcome | None:
        """None while the run is still going."""

    def stop(self, job_id: str) -> None: ...

    def forget(self, job_id: str) -> None:
        """Drop what the runner keeps about a run that left the history."""


class LocalRunner:
    """Each run is a `gemma-unified run` process of its own session, so it survives a scheduler restart.

    A run directory holds the spec, the log, the pid and, once the process ends, its exit code: the exit code file
    is how any scheduler process (not only the parent) learns the outcome.
    """

    LOG_TAIL = 2000

    def __init__(self, root: str | Path, command: list[str] | None = None) -> None:
        self.root = Path(root)
        self.command = command or [sys.executable, "-m", "jobs.cli", "run"]
        self._children: dict[str, subprocess.Popen] = {}

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def start(self, job_id: str, job: JobSpec, env: dict[str, str]) -> None:
        folder = self.folder(job_id)
        folder.mkdir(parents=True, exist_ok=False)
        spec = folder / "job.json"
        spec.write_text(json.dumps(job.model_dump(mode="json", exclude_defaults=True), indent=2))
        # The shell records the exit code atomically once the run ends; the scheduler only ever reads it.
        script = '"$@" > "$LOG" 2>&1; echo $? > "$RC.tmp" && mv "$RC.tmp" "$RC"'
        child = subprocess.Popen(
            ["/bin/sh", "-c", script, "sh", *self.command, str(spec), "--no-progress"],
            env={**os.environ, **env, "LOG": str(folder / "log.txt"), "RC": str(folder / "exit_code")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        (folder / "pid").write_text(str(child.pid))
        self._children[job_id] = child

    def poll(self, job_id: str) -> Outcome | None:
        folder = self.folder(job_id)
        child = self._children.get(job_id)
        if child is not None:
            child.poll()  # reap, so a finished child is not mistaken for a live one
        code_file = folder / "exit_code"
        if code_file.exists():
            self._children.pop(job_id, None)
            code = int(code_file.read_text().strip() or -1)
            if code == 0:
                return Outcome("succeeded")
            return Outcome("failed", f"exit code {code}: {self.log_tail(job_id)}")
        if self._alive(job_id):
            return None
        self._children.pop(job_id, None)
        return Outcome("lost", "the run's process is gone without an exit code (killed, or never started)")

    def stop(self, job_id: str) -> None:
        pid = self._pid(job_id)
        if pid is not None and self._alive(job_id):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        child = self._children.pop(job_id, None)
        if child is not None:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                child.wait()

    def forget(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def log_tail(self, job_id: str) -> str:
        log = self.folder(job_id) / "log.txt"
        text = log.read_text(errors="replace") if log.exists() else ""
        return text[-self.LOG_TAIL :].strip()

    def _pid(self, job_id: str) -> int | None:
        pid_file = self.folder(job_id) / "pid"
        return int(pid_file.read_text()) if pid_file.exists() else None

    def _alive(self, job_id: str) -> bool:
        pid = self._pid(job_id)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        proc = Path(f"/proc/{pid}")
        if not proc.exists():
            return True  # no procfs: trust the signal check
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
        if state == "Z":
            return False  # ended, waiting for a parent that is not us to reap it
        # A recycled pid belongs to some other program: ours names its run folder on the command line (which reads
        # empty for an instant while a process is being exec'd).
        return not cmdline or str(self.folder(job_id)).encode() in cmdline


class ClusterRunner:
    """Runs are Ray jobs whose submission id is the run's job id; Ray itself refuses a second job with that id."""

    STATES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "stopped"}

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = None

    @property
    def client(self):
        from pipelines.submission import client

        if self._client is None:
            self._client = client(self.address)
        return self._client

    def start(self, job_id: str, job: JobSpec, env: dict[str, str]) -> None:
        from pipelines.submission import submit

        submit(self.client, job, submission_id=job_id, env=env)

    def poll(self, job_id: str) -> Outcome | None:
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return Outcome("lost", f"no job {job_id} on {self.address}")
            raise
        state = self.STATES.get(str(info.status.value if hasattr(info.status, "value") else info.status))
        if state is None:
            return None
        return Outcome(state, None if state == "succeeded" else (info.message or state))

    def stop(self, job_id: str) -> None:
        self.client.stop_job(job_id)

    def forget(self, job_id: str) -> None:
        # Ray does not support reusing the submission id of a deleted job; the record stays on the cluster.
        pass
