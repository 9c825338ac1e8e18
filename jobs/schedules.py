"""The schedules file: named cron entries, each a batch job plus Kubernetes-CronJob-style policies.

Everything is checked at load time (cron syntax, time zone, duplicate names, the job spec, cluster reachability) and
reported with the file, the schedule and the field, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.job_files import build_job, load_yaml
from pipelines.config import JobSpec, SpecError

DEFAULT_STATE = ".gemma-unified/schedules.db"


class ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Unique name; it names the runs, their job ids and their history.",
    )
    cron: str = Field(..., min_length=1, max_length=200, description="When to run, in croniter syntax.")
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA time zone the cron is read in.")
    job: dict | str = Field(..., description="A JobSpec inline, or the path of a job YAML (relative to this file).")
    address: str | None = Field(
        None,
        max_length=4096,
        description="Ray dashboard address (http://HEAD:8265): runs are submitted there. Unset: runs execute "
        "on this machine through `gemma-unified run` (which honours the job's resources.address).",
    )
    concurrency: Literal["forbid", "allow", "replace"] = Field(
        "forbid",
        description="When a run is due while the previous one is active: skip it, run both, or stop the old one first.",
    )
    starting_deadline: float | None = Field(
        3600.0,
        gt=0,
        le=366 * 86400,
        description="Seconds after its scheduled time that a missed run may still start; null means no deadline. "
        "Only the most recent missed time is ever run.",
    )
    incremental: bool = Field(
        True,
        description="Reuse one output so each run only processes items not yet in it; false gives each run "
        "a fresh output under output.url/<scheduled time>.",
    )
    successful_history: int = Field(10, ge=0, le=100_000, description="Succeeded runs kept in the history.")
    failed_history: int = Field(
        10, ge=0, le=100_000, description="Failed, lost, stopped, skipped and missed runs kept in the history."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables for the run.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"not a valid cron expression: {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Paris)") from None
        return value


@dataclass(frozen=True)
class Schedule:
    entry: ScheduleEntry
    job: JobSpec
    source: str

    @property
    def name(self) -> str:
        return self.entry.name

    def latest_due(self, now: datetime) -> datetime | None:
        """The most recent scheduled time at or before `now` (UTC in, UTC out)."""
        from croniter import croniter

        zone = ZoneInfo(self.entry.timezone)
        # croniter's get_prev is strict and whole-second: start one second after `now` floored.
        base = now.astimezone(zone).replace(microsecond=0) + timedelta(seconds=1)
        return croniter(self.entry.cron, base).get_prev(datetime).astimezone(UTC)

    def next_due(self, now: datetime) -> datetime:
        from croniter import croniter

        zone = ZoneInfo(self.entry.timezone)
        return croniter(self.entry.cron, now.astimezone(zone)).get_next(datetime).astimezone(UTC)


@dataclass(frozen=True)
class ScheduleFile:
    path: Path
    state: Path
    schedules: tuple[Schedule, ...]

    def get(self, name: str) -> Schedule:
        for schedule in self.schedules:
            if schedule.name == name:
                return schedule
        raise SpecError(f"{self.path}: no schedule named {name!r} (have: {', '.join(self.names) or 'none'})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.schedules]


def _problems(error: ValidationError) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}" for e in error.errors()]


def _resolve_job(entry: ScheduleEntry, folder: Path, where: str) -> JobSpec:
    if isinstance(entry.job, str):
        path = Path(entry.job)
        path = path if path.is_absolute() else folder / path
        try:
            data = load_yaml(path)
        except SpecError as exc:
            raise SpecError(f"{where}: job: {exc}") from None
        source = f"{where}: job: {path}"
    else:
        data, source = entry.job, f"{where}: job"
    return build_job(data, source=source)


def load_schedules(path: str | Path, *, check_clusters: bool = True) -> ScheduleFile:
    """Parse and check a schedules file; every problem is reported at once, as one SpecError."""
    path = Path(path)
    data = load_yaml(path)
    unknown = set(data) - {"schedules", "state"}
    problems = [f"{path}: unknown top-level field {key!r} (expected: schedules, state)" for key in sorted(unknown)]
    entries = data.get("schedules")
    if not isinstance(entries, list) or not entries:
        raise SpecError("; ".join(problems + [f"{path}: schedules: a non-empty list of schedules is required"]))
    schedules, seen = [], {}
    for index, raw in enumerate(entries):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"{path}: schedule {name!r} (schedules[{index}])" if name else f"{path}: schedules[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: an entry is a mapping with name, cron, timezone, job, ...")
            continue
        if name in seen:
            problems.append(f"{where}: name: duplicate of schedules[{seen[name]}]")
            continue
        seen[name] = index
        try:
            entry = ScheduleEntry.model_validate(raw)
        except ValidationError as exc:
            problems.extend(f"{where}: {problem}" for problem in _problems(exc))
            continue
        try:
            schedules.append(Schedule(entry, _resolve_job(entry, path.parent, where), where))
        except SpecError as exc:
            problems.append(str(exc))
    if check_clusters and not problems:
        problems.extend(_unreachable(schedules))
    if problems:
        raise SpecError("; ".join(problems))
    state = Path(data.get("state") or DEFAULT_STATE)
    return ScheduleFile(path, state if state.is_absolute() else path.parent / state, tuple(schedules))


def _unreachable(schedules: list[Schedule]) -> list[str]:
    from pipelines.submission import SubmitError, client

    problems, checked = [], {}
    for schedule in schedules:
        address = schedule.entry.address
        if not address:
            continue
        if address not in checked:
            try:
                client(address)
                checked[address] = None
            except SubmitError as exc:
                checked[address] = str(exc)
        if checked[address]:
            problems.append(f"{schedule.source}: address: {checked[address]}")
    return problems
