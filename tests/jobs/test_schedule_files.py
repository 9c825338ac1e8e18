"""Loading schedules files: every bad input is reported at load time with the file, the schedule and the field."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from jobs.cli.schedule import schedule_app
from jobs.schedules import load_schedules
from pipelines.config import SpecError

JOB = {"input": {"url": "/data/in"}, "output": {"url": "/data/out"}}


def write(tmp_path: Path, schedules, **top) -> Path:
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump({"schedules": schedules, **top}))
    return path


def entry(**fields) -> dict:
    return {"name": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Paris", "job": JOB, **fields}


def load_error(path: Path) -> str:
    with pytest.raises(SpecError) as caught:
        load_schedules(path)
    return str(caught.value)


def test_a_good_file_loads_with_inline_and_referenced_jobs(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "captions.yaml").write_text(yaml.safe_dump({**JOB, "task": {"task": "caption"}}))
    path = write(
        tmp_path,
        [entry(), entry(name="captions", job="jobs/captions.yaml", concurrency="replace")],
        state="state/history.db",
    )
    config = load_schedules(path)
    assert config.names == ["nightly", "captions"]
    assert config.get("captions").job.task.task == "caption"
    assert config.state == tmp_path / "state" / "history.db"
    assert load_schedules(write(tmp_path, [entry()])).state == tmp_path / ".gemma-unified" / "schedules.db"


def test_invalid_cron_names_file_schedule_and_field(tmp_path):
    path = write(tmp_path, [entry(cron="61 * * * *")])
    message = load_error(path)
    assert str(path) in message and "schedule 'nightly'" in message and "cron:" in message
    assert "'61 * * * *'" in message


def test_unknown_time_zone(tmp_path):
    message = load_error(write(tmp_path, [entry(timezone="Mars/Olympus_Mons")]))
    assert "schedule 'nightly'" in message and "timezone:" in message and "Mars/Olympus_Mons" in message


def test_duplicate_names(tmp_path):
    message = load_error(write(tmp_path, [entry(), entry(cron="0 3 * * *")]))
    assert "schedules[1]" in message and "name: duplicate of schedules[0]" in message


def test_an_invalid_inline_spec_names_the_job_field(tmp_path):
    message = load_error(write(tmp_path, [entry(job={**JOB, "task": {"max_new_tokens": 0}})]))
    assert "schedule 'nightly'" in message and "job" in message and "task.max_new_tokens" in message


def test_a_missing_job_file(tmp_path):
    message = load_error(write(tmp_path, [entry(job="nope.yaml")]))
    assert "schedule 'nightly'" in message and "nope.yaml" in message


def test_bad_policy_values_and_unknown_fields(tmp_path):
    message = load_error(write(tmp_path, [entry(concurrency="sometimes", starting_deadline=-1, colour="blue")]))
    assert "concurrency:" in message and "starting_deadline:" in message and "colour:" in message


def test_an_empty_or_malformed_file(tmp_path):
    assert "non-empty list" in load_error(write(tmp_path, []))
    path = tmp_path / "broken.yaml"
    path.write_text("schedules: [\n")
    assert "cannot read" in load_error(path)


def test_all_problems_are_reported_together(tmp_path):
    message = load_error(write(tmp_path, [entry(cron="nope"), entry(name="b", timezone="Nowhere")]))
    assert "cron:" in message and "timezone:" in message


def test_an_unreachable_cluster_is_reported_at_load_time(tmp_path, closed_address):
    message = load_error(write(tmp_path, [entry(address=closed_address)]))
    assert "schedule 'nightly'" in message and "address:" in message and closed_address in message
    assert load_schedules(write(tmp_path, [entry(address=closed_address)]), check_clusters=False)


def cli():
    app = typer.Typer()
    app.add_typer(schedule_app, name="schedule")
    return app


def test_the_cli_refuses_a_bad_file_and_starts_nothing(tmp_path, closed_address):
    path = write(tmp_path, [entry(address=closed_address)], state="state.db")
    result = CliRunner().invoke(cli(), ["schedule", str(path), "--once"])
    assert result.exit_code == 2 and "address:" in result.output
    assert not (tmp_path / "state.db").exists()
    result = CliRunner().invoke(cli(), ["schedule", "check", str(path)])
    assert result.exit_code == 2


def test_check_shows_the_next_runs(tmp_path):
    result = CliRunner().invoke(cli(), ["schedule", "check", str(write(tmp_path, [entry()]))])
    assert result.exit_code == 0, result.output
    assert "nightly" in result.output and "Europe/Paris" in result.output and "local" in result.output


def test_history_shows_recorded_runs(tmp_path):
    from datetime import datetime

    from jobs.history import History, Run

    path = write(tmp_path, [entry()])
    config = load_schedules(path)
    history = History(config.state)
    when = datetime(2025, 1, 15, 1, 0, tzinfo=UTC)
    history.claim(
        Run(
            "nightly",
            when,
            "succeeded",
            "nightly-20250115T010000Z",
            started_at=when,
            ended_at=when,
            succeeded=3,
            failed=0,
            skipped=5,
        )
    )
    result = CliRunner().invoke(cli(), ["schedule", "history", "nightly", "--file", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "nightly-20250115T010000Z" in result.output and "succeeded" in result.output
    result = CliRunner().invoke(cli(), ["schedule", "history", "other", "--state", str(config.state)])
    assert result.exit_code == 1


def test_once_records_a_failing_run_with_its_error_and_exits_1(tmp_path):
    from datetime import datetime

    from jobs.history import History

    # Due now (the current hour, first seen within its deadline); the real `gemma-unified run` fails fast.
    job = {"input": {"url": str(tmp_path / "missing")}, "output": {"url": str(tmp_path / "out")}}
    path = write(tmp_path, [entry(name="hourly", cron="0 * * * *", timezone="UTC", job=job)], state="state.db")
    hour = datetime.now(UTC).hour
    result = CliRunner().invoke(cli(), ["schedule", str(path), "--once", "--poll-s", "0.2"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    [run] = History(tmp_path / "state.db").runs("hourly")
    assert run.state == "failed" and "exit code 2" in run.error and "nothing found at" in run.error
    again = CliRunner().invoke(cli(), ["schedule", str(path), "--once"])
    if datetime.now(UTC).hour == hour:
        assert again.exit_code == 0 and "nothing due" in again.output  # the same time never runs twice
