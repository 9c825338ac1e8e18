"""Scheduler test kit: a clock the test moves by hand and a runner that only records what it was asked to do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobs.runners import Outcome


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def set(self, *args: int) -> None:
        self.now = datetime(*args, tzinfo=UTC)

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class FakeRunner:
    """Jobs live in `outcomes` (None while running); a job id the runner never saw polls as lost."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.forgotten: list[str] = []
        self.jobs: dict[str, object] = {}
        self.outcomes: dict[str, Outcome | None] = {}
        self.fail_start: Exception | None = None

    def start(self, job_id, job, env) -> None:
        if self.fail_start is not None:
            raise self.fail_start
        assert job_id not in self.outcomes, f"{job_id} started twice"
        self.started.append(job_id)
        self.jobs[job_id] = job
        self.outcomes[job_id] = None

    def poll(self, job_id):
        return self.outcomes.get(job_id, Outcome("lost", "unknown to the runner"))

    def stop(self, job_id) -> None:
        self.stopped.append(job_id)
        self.outcomes[job_id] = Outcome("stopped")

    def forget(self, job_id) -> None:
        self.forgotten.append(job_id)

    def finish(self, job_id, state: str = "succeeded", error: str | None = None) -> None:
        assert self.outcomes[job_id] is None, f"{job_id} is not running"
        self.outcomes[job_id] = Outcome(state, error)


@pytest.fixture
def clock():
    return FakeClock(datetime(2025, 1, 15, 10, 0, 5, tzinfo=UTC))


@pytest.fixture
def runner():
    return FakeRunner()


@pytest.fixture
def closed_address():
    """An http address on loopback where nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
