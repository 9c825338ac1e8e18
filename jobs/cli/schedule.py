"""`gemma-unified schedule FILE [--once]`, `schedule check FILE`, `schedule history NAME`.

Exit codes: 0 fine, 1 a run started by --once failed, 2 the schedules file (or the cluster it names) is unusable.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from pipelines.errors import GemmaUnifiedError

console = Console()
err_console = Console(stderr=True)


class _RunByDefault(TyperGroup):
    """`schedule FILE ...` means `schedule run FILE ...`; the named subcommands still work."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


schedule_app = typer.Typer(
    cls=_RunByDefault,
    help="Scheduled pipelines: `schedule FILE` runs the scheduler daemon (--once: what is due now, then exit).",
    no_args_is_help=True,
)


def _load(path: Path, check_clusters: bool = True):
    from jobs.schedules import load_schedules

    try:
        return load_schedules(path, check_clusters=check_clusters)
    except GemmaUnifiedError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2)


@schedule_app.command()
def run(
    schedules_file: Path = typer.Argument(..., help="The schedules YAML."),
    once: bool = typer.Option(
        False, "--once", help="Run what is due now, wait for it, and exit (for a system cron or a Kubernetes CronJob)."
    ),
    poll_s: float = typer.Option(30.0, min=0.1, help="How often active runs are checked."),
) -> None:
    """Run the scheduler daemon (or one pass of it with --once)."""
    from jobs.history import History
    from jobs.scheduler import Scheduler, default_runners

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = _load(schedules_file)
    history = History(config.state)
    scheduler = Scheduler(config.schedules, history, default_runners(config))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Stop between ticks; local runs live in their own sessions and are adopted by the next scheduler.
        signal.signal(signum, lambda *_: stop.set())
    console.print(f"{len(config.schedules)} schedule(s) from {schedules_file}; history in {config.state}")
    if not once:
        scheduler.serve(stop, poll_s=poll_s)
        return
    started = scheduler.tick()
    if not started:
        console.print("nothing due")
    finished = scheduler.wait_for(started, poll_s=min(poll_s, 2.0), stop=stop)
    _print_runs(finished, title="this pass")
    if any(r.state != "succeeded" for r in finished):
        raise typer.Exit(code=1)


@schedule_app.command()
def check(schedules_file: Path = typer.Argument(..., help="The schedules YAML.")) -> None:
    """Validate a schedules file (cron, time zone, names, job specs, cluster addresses) and show the next runs."""
    from jobs.scheduler import utc_now

    config = _load(schedules_file)
    now = utc_now()
    table = Table("schedule", "cron", "timezone", "next run (UTC)", "where", "concurrency")
    for schedule in config.schedules:
        entry = schedule.entry
        table.add_row(
            entry.name,
            entry.cron,
            entry.timezone,
            f"{schedule.next_due(now):%Y-%m-%d %H:%M:%S}",
            entry.address or "local",
            entry.concurrency,
        )
    console.print(table)


@schedule_app.command()
def history(
    name: str = typer.Argument(..., help="Schedule name."),
    schedules_file: Path = typer.Option(Path("schedules.yaml"), "--file", "-f", help="The schedules YAML."),
    state: Path | None = typer.Option(None, help="The history database (default: the file's `state`)."),
    limit: int = typer.Option(20, min=1, help="Runs to show, newest first."),
) -> None:
    """Show a schedule's runs: scheduled time, state, start, end, counts, job id, error."""
    from jobs.history import History

    path = state or _load(schedules_file, check_clusters=False).state
    if not path.exists():
        err_console.print(f"[red]error:[/red] no history at {path}")
        raise typer.Exit(code=2)
    runs = History(path).runs(name, limit)
    if not runs:
        err_console.print(f"no runs recorded for {name!r} in {path}")
        raise typer.Exit(code=1)
    _print_runs(runs, title=f"{name}: last {len(runs)} run(s)")


def _print_runs(runs, title: str) -> None:
    if not runs:
        return
    table = Table(title=title)
    table.add_column("scheduled (UTC)", no_wrap=True)
    table.add_column("state")
    table.add_column("took", justify="right")
    table.add_column("ok/failed/skipped", justify="right")
    table.add_column("job id", no_wrap=True)
    table.add_column("error", overflow="fold")

    def count(value):
        return "-" if value is None else str(value)

    for run in runs:
        took = "-"
        if run.started_at and run.ended_at:
            took = f"{(run.ended_at - run.started_at).total_seconds():.0f}s"
        table.add_row(
            f"{run.scheduled_for:%Y-%m-%d %H:%M}",
            run.state,
            took,
            f"{count(run.succeeded)}/{count(run.failed)}/{count(run.skipped)}",
            run.job_id,
            (run.error or "")[:300],
        )
    console.print(table)
