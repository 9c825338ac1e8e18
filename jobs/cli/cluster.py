"""`gemma-unified submit` and `gemma-unified jobs ...`: batch jobs on a Ray cluster.

Exit codes, for scripts: 0 succeeded (or submitted, without --wait), 1 the job failed or was stopped, 2 bad input or
an unreachable cluster (nothing submitted), 3 the job is still pending or running (`jobs status`).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipelines.errors import GemmaUnifiedError

console = Console()
err_console = Console(stderr=True)

ADDRESS_HELP = "Ray dashboard address, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)."
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_ACTIVE = 1, 2, 3

jobs_app = typer.Typer(help="Batch jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)


def _address_option():
    return typer.Option(None, "--address", envvar="RAY_API_SERVER_ADDRESS", help=ADDRESS_HELP)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=code)


def _client(address: str | None):
    from pipelines.submission import client

    if not address:
        raise _fail("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    try:
        return client(address)
    except GemmaUnifiedError as exc:
        raise _fail(str(exc))


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--env")
        env[key] = value
    return env


def _status(ray_client, job_id: str) -> str:
    from pipelines.submission import call

    status = call(ray_client, "get_job_status", job_id)
    return str(getattr(status, "value", status))


def _exit_for(status: str) -> int:
    from pipelines.submission import TERMINAL

    if status == "SUCCEEDED":
        return 0
    return EXIT_FAILED if status in TERMINAL else EXIT_ACTIVE


def _follow(ray_client, job_id: str) -> int:
    from jobs.submit import follow_logs

    for chunk in follow_logs(ray_client, job_id):
        typer.echo(chunk, nl=False)
    status = _status(ray_client, job_id)
    err_console.print(f"job {job_id}: {status}")
    return _exit_for(status)


def submit(
    job_file: Path = typer.Argument(..., help="A job YAML (JobSpec), validated here before anything is submitted."),
    address: str | None = _address_option(),
    wait: bool = typer.Option(False, "--wait", help="Stream the job's logs until it ends; exit 0 only on success."),
    submission_id: str | None = typer.Option(None, help="Your own job id (Ray refuses a duplicate)."),
    env: list[str] | None = typer.Option(None, help="Environment variable KEY=VALUE for the job (repeatable)."),
) -> None:
    """Submit a batch job to a Ray cluster; it runs `gemma-unified run` there on the same spec. Prints the job id."""
    from jobs.job_files import load_job
    from pipelines.submission import submit as submit_job

    try:
        job = load_job(job_file)
    except GemmaUnifiedError as exc:
        raise _fail(str(exc))
    ray_client = _client(address)
    try:
        job_id = submit_job(ray_client, job, submission_id=submission_id, env=_parse_env(env))
    except GemmaUnifiedError as exc:
        raise _fail(str(exc))
    typer.echo(job_id)
    if wait:
        try:
            raise typer.Exit(code=_follow(ray_client, job_id))
        except GemmaUnifiedError as exc:
            raise _fail(str(exc), EXIT_FAILED)


def _when(milliseconds: int | None) -> str:
    return "-" if not milliseconds else datetime.fromtimestamp(milliseconds / 1000).strftime("%Y-%m-%d %H:%M:%S")


@jobs_app.command("list")
def list_jobs(address: str | None = _address_option()) -> None:
    """Submitted jobs, newest first: id, status, start, end, output."""
    from pipelines.submission import METADATA_KEY

    ray_client = _client(address)
    try:
        details = ray_client.list_jobs()
    except Exception as exc:
        raise _fail(f"cannot list jobs: {exc}")
    table = Table("job id", "status", "started", "ended", "output", "message")
    for job in sorted(details, key=lambda d: d.start_time or 0, reverse=True):
        if not job.submission_id:
            continue  # drivers that connected directly, not submitted jobs
        table.add_row(
            job.submission_id,
            str(getattr(job.status, "value", job.status)),
            _when(job.start_time),
            _when(job.end_time),
            (job.metadata or {}).get(METADATA_KEY, "-"),
            (job.message or "")[:80],
        )
    console.print(table)


@jobs_app.command()
def status(job_id: str = typer.Argument(...), address: str | None = _address_option()) -> None:
    """Print a job's status; exit 0 succeeded, 1 failed or stopped, 3 still pending or running."""
    from pipelines.submission import call

    ray_client = _client(address)
    try:
        info = call(ray_client, "get_job_info", job_id)
    except GemmaUnifiedError as exc:
        raise _fail(str(exc))
    state = str(getattr(info.status, "value", info.status))
    typer.echo(f"{job_id}: {state}" + (f" ({info.message})" if info.message else ""))
    raise typer.Exit(code=_exit_for(state))


@jobs_app.command()
def logs(
    job_id: str = typer.Argument(...),
    address: str | None = _address_option(),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
) -> None:
    """Print a job's driver log; with --follow, stream it and exit with the job's outcome."""
    from pipelines.submission import call

    ray_client = _client(address)
    try:
        if follow:
            raise typer.Exit(code=_follow(ray_client, job_id))
        typer.echo(call(ray_client, "get_job_logs", job_id), nl=False)
    except GemmaUnifiedError as exc:
        raise _fail(str(exc))


@jobs_app.command()
def stop(job_id: str = typer.Argument(...), address: str | None = _address_option()) -> None:
    """Ask a job to stop; exit 0 when it was running, 1 when it had already ended."""
    from pipelines.submission import call

    ray_client = _client(address)
    try:
        stopped = call(ray_client, "stop_job", job_id)
    except GemmaUnifiedError as exc:
        raise _fail(str(exc))
    typer.echo(f"{job_id}: {'stopping' if stopped else 'not running'}")
    if not stopped:
        raise typer.Exit(code=EXIT_FAILED)
