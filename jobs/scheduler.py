"""The scheduler: on each tick, settle finished runs, then start what is due, following each schedule's policies.

Policies mirror a Kubernetes CronJob: only the most recent due time is considered; it starts if it is within
`starting_deadline` (else it is recorded as missed); `concurrency` decides what happens while an earlier run is active.
Time comes from an injectable clock and runs from injectable runners, so the policies are testable without waiting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from jobs.history import History, Run
from jobs.runners import ClusterRunner, LocalRunner, Runner
from jobs.schedules import Schedule, ScheduleFile
from pipelines.config import JobSpec

log = logging.getLogger("gemma_unified.scheduler")

Clock = Callable[[], datetime]
STARTING_GRACE_S = 120.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def job_id_for(schedule: str, scheduled_for: datetime) -> str:
    return f"{schedule}-{scheduled_for.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def job_for_run(schedule: Schedule, scheduled_for: datetime) -> JobSpec:
    """Incremental runs share one output (the batch resume skips what is there); others get one output each."""
    job = schedule.job
    if schedule.entry.incremental:
        return job
    url = f"{job.output.url.rstrip('/')}/{scheduled_for.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    return job.model_copy(update={"output": job.output.model_copy(update={"url": url})})


def default_runners(config: ScheduleFile) -> Callable[[Schedule], Runner]:
    local = LocalRunner(config.state.parent / "runs")
    clusters: dict[str, ClusterRunner] = {}

    def runner_for(schedule: Schedule) -> Runner:
        address = schedule.entry.address
        if not address:
            return local
        return clusters.setdefault(address, ClusterRunner(address))

    return runner_for


def read_counts(run: Run, job: JobSpec) -> dict:
    """This run's counts from the output's `_job.json`, when the batch job got that far."""
    from pipelines.output import OutputDir

    try:
        manifest = OutputDir(run.output or job.output.url, job.output.storage_options).read_manifest() or {}
    except Exception:  # counts are informative: an unreadable output must not fail the bookkeeping
        return {}
    this_run = manifest.get("this_run") or {}
    finished = manifest.get("finished_at")
    if manifest.get("status") not in ("succeeded", "partial") or not this_run or not finished:
        return {}
    if run.started_at and datetime.fromisoformat(finished) < run.started_at:
        return {}  # the manifest of an earlier run: this one failed before finishing
    return {
        "succeeded": this_run.get("succeeded"),
        "failed": this_run.get("failed"),
        "skipped": this_run.get("skipped_already_done"),
    }


class Scheduler:
    def __init__(
        self,
        schedules: tuple[Schedule, ...] | list[Schedule],
        history: History,
        runner_for: Callable[[Schedule], Runner],
        clock: Clock = utc_now,
        counts: Callable[[Run, JobSpec], dict] = read_counts,
    ) -> None:
        self.schedules = {s.name: s for s in schedules}
        self.history = history
        self.runner_for = runner_for
        self.clock = clock
        self.counts = counts

    def tick(self) -> list[Run]:
        """Settle finished runs, then start (or skip, or record as missed) each schedule's due run."""
        self.settle()
        started = []
        for schedule in self.schedules.values():
            try:
                run = self._tick_one(schedule)
            except Exception:  # one broken schedule must not stop the others
                log.exception("schedule %s: tick failed", schedule.name)
                run = None
            if run is not None:
                started.append(run)
        return started

    def settle(self) -> list[Run]:
        """Poll every active run; record the ones that ended. Also how a restarted scheduler adopts its runs."""
        ended = []
        for run in self.history.active():
            schedule = self.schedules.get(run.schedule)
            if schedule is None:
                continue  # a schedule removed from the file: its active runs are left alone, not guessed at
            try:
                outcome = self.runner_for(schedule).poll(run.job_id)
            except Exception as exc:
                log.warning("schedule %s: cannot poll %s: %s", run.schedule, run.job_id, exc)
                continue
            if outcome is None:
                if run.state == "starting":
                    self.history.update(run.schedule, run.scheduled_for, state="running")
                continue
            if run.state == "starting" and outcome.state == "lost" and self._recent(run):
                continue  # another scheduler process may be between claiming this run and starting it
            self._finish(schedule, run, outcome.state, outcome.error)
            ended.append(run)
        return ended

    def due(self, schedule: Schedule, now: datetime) -> datetime | None:
        latest = schedule.latest_due(now)
        cursor = self.history.cursor(schedule.name)
        if cursor is None:
            # A schedule seen for the first time only catches up within its deadline.
            deadline = schedule.entry.starting_deadline
            cursor = now - timedelta(seconds=deadline) - timedelta(microseconds=1) if deadline else None
        if cursor is not None and latest <= cursor:
            return None
        return latest

    def next_wake(self, now: datetime) -> datetime:
        return min(s.next_due(now) for s in self.schedules.values())

    def wait_for(self, runs: list[Run], poll_s: float, stop: threading.Event | None = None) -> list[Run]:
        """Block until these runs end (for --once); returns their final records."""
        stop = stop or threading.Event()
        while True:
            self.settle()
            current = [self.history.get(r.schedule, r.scheduled_for) for r in runs]
            if all(r is None or not r.active for r in current) or stop.is_set():
                return [r for r in current if r is not None]
            stop.wait(poll_s)

    def serve(self, stop: threading.Event, poll_s: float = 30.0) -> None:
        """The daemon loop: tick, then sleep until the next due time or the next poll of active runs."""
        while not stop.is_set():
            self.tick()
            now = self.clock()
            pause = min(poll_s, max(0.0, (self.next_wake(now) - now).total_seconds()) + 0.01)
            stop.wait(pause)

    def _tick_one(self, schedule: Schedule) -> Run | None:
        now = self.clock()
        scheduled_for = self.due(schedule, now)
        if scheduled_for is None:
            return None
        entry = schedule.entry
        job = job_for_run(schedule, scheduled_for)
        job_id = job_id_for(schedule.name, scheduled_for)
        late = (now - scheduled_for).total_seconds()
        if entry.starting_deadline is not None and late > entry.starting_deadline:
            self.history.claim(
                Run(
                    schedule.name,
                    scheduled_for,
                    "missed",
                    job_id,
                    output=job.output.url,
                    ended_at=now,
                    error=f"missed by {late:.0f}s (starting_deadline {entry.starting_deadline:.0f}s)",
                )
            )
            return None
        active = self.history.active(schedule.name)
        if active and entry.concurrency == "forbid":
            blocking = ", ".join(r.job_id for r in active)
            self.history.claim(
                Run(
                    schedule.name,
                    scheduled_for,
                    "skipped",
                    job_id,
                    output=job.output.url,
                    ended_at=now,
                    error=f"concurrency forbid: {blocking} still active",
                )
            )
            self._prune(schedule)
            return None
        run = Run(schedule.name, scheduled_for, "starting", job_id, output=job.output.url, started_at=now)
        if not self.history.claim(run):
            return None  # another scheduler process took this time first
        runner = self.runner_for(schedule)
        if entry.concurrency == "replace":
            for old in active:
                runner.stop(old.job_id)
                self.history.update(
                    old.schedule,
                    old.scheduled_for,
                    state="stopped",
                    ended_at=self.clock(),
                    error=f"replaced by {job_id}",
                )
        try:
            runner.start(job_id, job, dict(entry.env))
        except Exception as exc:
            self.history.update(
                schedule.name,
                scheduled_for,
                state="failed",
                ended_at=self.clock(),
                error=f"could not start: {type(exc).__name__}: {exc}",
            )
            self._prune(schedule)
            log.error("schedule %s: %s could not start: %s", schedule.name, job_id, exc)
            return self.history.get(schedule.name, scheduled_for)
        self.history.update(schedule.name, scheduled_for, state="running")
        log.info("schedule %s: started %s", schedule.name, job_id)
        return self.history.get(schedule.name, scheduled_for)

    def _finish(self, schedule: Schedule, run: Run, state: str, error: str | None) -> None:
        counts = self.counts(run, job_for_run(schedule, run.scheduled_for)) if state in ("succeeded", "failed") else {}
        self.history.update(
            run.schedule,
            run.scheduled_for,
            state=state,
            ended_at=self.clock(),
            error=error,
            **{k: v for k, v in counts.items() if v is not None},
        )
        log.info("schedule %s: %s %s", run.schedule, run.job_id, state)
        self._prune(schedule)

    def _recent(self, run: Run) -> bool:
        return run.started_at is not None and (self.clock() - run.started_at).total_seconds() < STARTING_GRACE_S

    def _prune(self, schedule: Schedule) -> None:
        entry = schedule.entry
        for run in self.history.prune(schedule.name, entry.successful_history, entry.failed_history):
            try:
                self.runner_for(schedule).forget(run.job_id)
            except Exception as exc:
                log.warning("schedule %s: cannot clean up %s: %s", schedule.name, run.job_id, exc)
