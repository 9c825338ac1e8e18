"""Tables a person reads at the end of a job."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipelines.batch import JobSummary


def print_summary(summary: JobSummary, console: Console) -> None:
    table = Table(title=f"Job summary: {summary.output}", show_header=True)
    for column in ("items", "succeeded", "failed", "skipped (done before)", "items/s", "output tokens/s",
                   "speculative acceptance", "engine busy", "mean batch"):
        table.add_column(column, justify="right")
    acceptance = "- (off)" if summary.acceptance is None else f"{summary.acceptance:.1%}"
    busy = "-" if summary.busy_fraction is None else f"{summary.busy_fraction:.0%}"
    batch = "-" if summary.mean_batch_size is None else f"{summary.mean_batch_size:.1f}"
    table.add_row(
        str(summary.total),
        str(summary.succeeded),
        str(summary.failed),
        str(summary.skipped),
        f"{summary.items_per_s:.2f}",
        f"{summary.tokens_per_s:.1f}",
        acceptance,
        busy,
        batch,
    )
    console.print(table)
    console.print(f"this run: {summary.run_succeeded} succeeded, {summary.run_failed} failed in {summary.wall_s:.1f}s")
    if summary.skipped_unsupported:
        console.print(f"skipped: {summary.skipped_unsupported} file(s) this project cannot read (listed in _job.json)")
    output = escape(summary.output)
    console.print(f"results: {output}/results/  errors: {output}/errors/  job record: {output}/_job.json",
                  soft_wrap=True)
    look = f"gemma-unified show {output}" + (f"  |  gemma-unified show {output} --errors" if summary.failed else "")
    console.print(f"look at them: {look}", soft_wrap=True)
