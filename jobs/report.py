"""Tables a person reads at the end of a job."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pipelines.batch import JobSummary


def print_summary(summary: JobSummary, console: Console) -> None:
    table = Table(title=f"Job summary: {summary.output}", show_header=True)
    for column in ("items", "succeeded", "failed", "skipped (done before)", "items/s", "output tokens/s",
                   "speculative acceptance"):
        table.add_column(column, justify="right")
    acceptance = "-" if summary.acceptance is None else f"{summary.acceptance:.1%}"
    table.add_row(
        str(summary.total),
        str(summary.succeeded),
        str(summary.failed),
        str(summary.skipped),
        f"{summary.items_per_s:.2f}",
        f"{summary.tokens_per_s:.1f}",
        acceptance,
    )
    console.print(table)
    console.print(f"this run: {summary.run_succeeded} succeeded, {summary.run_failed} failed in {summary.wall_s:.1f}s")
