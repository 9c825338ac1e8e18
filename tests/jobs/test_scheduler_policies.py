"""Scheduler policies with a hand-driven clock and a recording runner: no Ray, no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobs.history import History
from jobs.job_files import build_job
from jobs.scheduler import Scheduler, job_id_for
from jobs.schedules import Schedule, ScheduleEntry

JOB = {"input": {"url": "/data/in"}, "output": {"url": "/data/out"}}


def make_schedule(**fields) -> Schedule:
    entry = ScheduleEntry.model_validate({"name": "hourly", "cron": "0 * * * *", "job": JOB, **fields})
    return Schedule(entry, build_job(JOB), f"test: {entry.name}")


def at(hour: int, minute: int = 0, day: int = 15) -> datetime:
    return datetime(2025, 1, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def history(tmp_path):
    db = History(tmp_path / "history.db")
    yield db
    db.close()


def scheduler(history, runner, clock, **fields) -> Scheduler:
    return Scheduler([make_schedule(**fields)], history, lambda schedule: runner, clock=clock, counts=lambda r, j: {})


def states(history, name="hourly"):
    return {run.scheduled_for.hour: run.state for run in history.runs(name)}


def test_a_due_run_fires_once_even_across_a_restart(history, runner, clock):
    first = scheduler(history, runner, clock)
    assert [r.job_id for r in first.tick()] == [job_id_for("hourly", at(10))]
    clock.advance(seconds=30)
    assert first.tick() == []
    restarted = scheduler(History(history.path), runner, clock)
    assert restarted.tick() == []
    assert runner.started == ["hourly-20250115T100000Z"]
    runner.finish("hourly-20250115T100000Z")
    restarted.tick()  # the restarted scheduler adopts the run and records its end
    assert states(history) == {10: "succeeded"}


def test_the_next_occurrence_runs_at_its_time_and_not_before(history, runner, clock):
    sched = scheduler(history, runner, clock)
    sched.tick()
    runner.finish(runner.started[0])
    clock.set(2025, 1, 15, 10, 59, 59)
    assert sched.tick() == []
    clock.set(2025, 1, 15, 11, 0, 0)
    assert [r.scheduled_for for r in sched.tick()] == [at(11)]


def test_a_new_schedule_does_not_backfill_beyond_its_deadline(history, runner, clock):
    clock.set(2025, 1, 15, 10, 30)
    assert scheduler(history, runner, clock, starting_deadline=600).tick() == []
    assert runner.started == [] and history.runs("hourly") == []


def test_missed_runs_follow_starting_deadline(history, runner, clock):
    sched = scheduler(history, runner, clock, starting_deadline=600)
    sched.tick()
    runner.finish(runner.started[-1])
    clock.set(2025, 1, 15, 13, 20)  # down through 11:00, 12:00 and 13:00; 13:00 is 20 minutes late
    assert sched.tick() == []
    assert states(history) == {10: "succeeded", 13: "missed"}
    assert "missed by 1200s" in history.get("hourly", at(13)).error
    clock.set(2025, 1, 15, 14, 5)  # 5 minutes late: within the deadline
    assert [r.scheduled_for for r in sched.tick()] == [at(14)]
    assert runner.started == ["hourly-20250115T100000Z", "hourly-20250115T140000Z"]


def test_only_the_latest_missed_time_runs_within_a_long_deadline(history, runner, clock):
    sched = scheduler(history, runner, clock, starting_deadline=1800)
    sched.tick()
    runner.finish(runner.started[-1])
    clock.set(2025, 1, 15, 13, 20)
    assert [r.scheduled_for for r in sched.tick()] == [at(13)]
    assert states(history) == {10: "succeeded", 13: "running"}


def test_without_a_deadline_a_missed_run_always_starts(history, runner, clock):
    sched = scheduler(history, runner, clock, starting_deadline=None)
    sched.tick()
    runner.finish(runner.started[-1])
    clock.set(2025, 1, 17, 9, 59)
    assert [r.scheduled_for for r in sched.tick()] == [at(9, day=17)]


def test_forbid_skips_while_a_run_is_active(history, runner, clock):
    sched = scheduler(history, runner, clock, concurrency="forbid")
    sched.tick()
    clock.set(2025, 1, 15, 11, 0, 10)
    assert sched.tick() == []
    assert states(history) == {10: "running", 11: "skipped"}
    assert "hourly-20250115T100000Z still active" in history.get("hourly", at(11)).error
    runner.finish("hourly-20250115T100000Z")
    clock.set(2025, 1, 15, 12, 0, 10)
    assert [r.scheduled_for for r in sched.tick()] == [at(12)]
    assert runner.started == ["hourly-20250115T100000Z", "hourly-20250115T120000Z"]


def test_replace_stops_the_old_run_first(history, runner, clock):
    sched = scheduler(history, runner, clock, concurrency="replace")
    sched.tick()
    clock.set(2025, 1, 15, 11, 0, 10)
    assert [r.scheduled_for for r in sched.tick()] == [at(11)]
    assert runner.stopped == ["hourly-20250115T100000Z"]
    assert states(history) == {10: "stopped", 11: "running"}
    assert history.get("hourly", at(10)).error == "replaced by hourly-20250115T110000Z"


def test_allow_runs_alongside(history, runner, clock):
    sched = scheduler(history, runner, clock, concurrency="allow")
    sched.tick()
    clock.set(2025, 1, 15, 11, 0, 10)
    sched.tick()
    assert states(history) == {10: "running", 11: "running"} and runner.stopped == []


def test_a_failed_run_is_recorded_with_its_error_and_the_next_tick_proceeds(history, runner, clock):
    sched = scheduler(history, runner, clock)
    sched.tick()
    runner.finish("hourly-20250115T100000Z", "failed", "exit code 2: cannot reach s3://bucket")
    clock.set(2025, 1, 15, 11, 0, 1)
    assert [r.scheduled_for for r in sched.tick()] == [at(11)]
    failed = history.get("hourly", at(10))
    assert failed.state == "failed" and "cannot reach s3://bucket" in failed.error and failed.ended_at == clock.now


def test_a_run_that_cannot_start_is_recorded_as_failed_and_not_retried(history, runner, clock):
    sched = scheduler(history, runner, clock)
    runner.fail_start = ConnectionError("cluster down")
    sched.tick()
    assert history.get("hourly", at(10)).state == "failed"
    assert "could not start: ConnectionError: cluster down" in history.get("hourly", at(10)).error
    runner.fail_start = None
    clock.advance(minutes=5)
    assert sched.tick() == [] and runner.started == []
    clock.set(2025, 1, 15, 11, 0, 1)
    assert [r.scheduled_for for r in sched.tick()] == [at(11)]


def test_a_crash_between_recording_and_starting_never_starts_that_run(history, runner, clock):
    from jobs.history import Run

    # What a scheduler that died right after claiming 10:00 leaves behind: the row, and no job.
    history.claim(Run("hourly", at(10), "starting", job_id_for("hourly", at(10)), started_at=clock.now))
    restarted = scheduler(History(history.path), runner, clock)
    assert restarted.tick() == []
    assert states(history) == {10: "starting"}  # within the grace another process may still be starting it
    clock.advance(minutes=5)
    assert restarted.tick() == []
    assert states(history) == {10: "lost"} and runner.started == []


def test_a_second_scheduler_on_the_same_history_does_not_double_start(history, runner, clock):
    one = scheduler(history, runner, clock, concurrency="allow")
    two = scheduler(History(history.path), runner, clock, concurrency="allow")
    assert len(one.tick()) == 1
    assert two.tick() == []
    assert runner.started == ["hourly-20250115T100000Z"]


def test_cron_is_read_in_the_schedule_time_zone(history, runner, clock):
    clock.set(2025, 7, 1, 0, 0, 30)  # 02:00:30 in Paris (summer time)
    sched = scheduler(history, runner, clock, cron="0 2 * * *", timezone="Europe/Paris")
    assert [r.scheduled_for for r in sched.tick()] == [datetime(2025, 7, 1, 0, 0, tzinfo=UTC)]


def test_history_limits_prune_the_oldest_runs(history, runner, clock):
    sched = scheduler(history, runner, clock, successful_history=2, failed_history=1, concurrency="forbid")
    for hour in range(10, 15):
        clock.set(2025, 1, 15, hour, 0, 1)
        sched.tick()
        runner.finish(runner.started[-1], "succeeded" if hour != 12 else "failed", "boom")
    clock.advance(seconds=1)
    sched.tick()
    assert states(history) == {12: "failed", 13: "succeeded", 14: "succeeded"}
    assert runner.forgotten == ["hourly-20250115T100000Z", "hourly-20250115T110000Z"]


def test_non_incremental_runs_get_an_output_each(history, runner, clock):
    sched = scheduler(history, runner, clock, incremental=False)
    sched.tick()
    assert runner.jobs["hourly-20250115T100000Z"].output.url == "/data/out/20250115T100000Z"
    assert history.get("hourly", at(10)).output == "/data/out/20250115T100000Z"


def test_incremental_runs_share_the_output(history, runner, clock):
    sched = scheduler(history, runner, clock)
    sched.tick()
    assert runner.jobs["hourly-20250115T100000Z"].output.url == "/data/out"


def test_once_waits_for_the_runs_it_started(history, runner, clock):
    import threading

    sched = scheduler(history, runner, clock)
    started = sched.tick()
    threading.Timer(0.2, runner.finish, args=("hourly-20250115T100000Z",)).start()
    finished = sched.wait_for(started, poll_s=0.05)
    assert [r.state for r in finished] == ["succeeded"]


def test_serve_ticks_until_stopped(history, runner, clock):
    import threading

    sched = scheduler(history, runner, clock)
    stop = threading.Event()
    thread = threading.Thread(target=sched.serve, args=(stop,), kwargs={"poll_s": 0.05})
    thread.start()
    try:
        for _ in range(100):
            if runner.started:
                break
            stop.wait(0.02)
        clock.set(2025, 1, 15, 11, 0, 1)
        runner.finish(runner.started[0])
        for _ in range(100):
            if len(runner.started) == 2:
                break
            stop.wait(0.02)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert runner.started == ["hourly-20250115T100000Z", "hourly-20250115T110000Z"]
