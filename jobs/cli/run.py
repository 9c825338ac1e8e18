"""`gemma-unified run`: a batch job on this machine (or the Ray cluster it joins), and the table read at its end."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from jobs.cli.failures import EXIT_ITEMS_FAILED, quiet_library_logs
from jobs.cli.options import parse_storage_options

if TYPE_CHECKING:
    from pipelines.batch import JobSummary

console = Console()


def run(
    job_file: Path | None = typer.Argument(None, help="A job YAML (JobSpec); flags override its fields."),
    task: str | None = typer.Option(None, help="caption, transcribe, translate, answer or prompt."),
    input: str | None = typer.Option(None, "--input", help="Directory, glob, tar shards or manifest (fsspec URL)."),
    output: str | None = typer.Option(None, help="Output URL: results/, errors/ and _job.json go here."),
    model: str | None = typer.Option(None, help="tiny, gemma-4-12b-it, a directory, an HF id or an s3:// URL."),
    engine: str | None = typer.Option(None, help="transformers or vllm."),
    max_new_tokens: int | None = typer.Option(None, help="Output tokens per request."),
    language: str | None = typer.Option(None, help="transcribe: the spoken language."),
    source_language: str | None = typer.Option(None, help="translate: the spoken language."),
    target_language: str | None = typer.Option(None, help="translate: the target language."),
    question: str | None = typer.Option(None, help="answer: the question for every item."),
    prompt: str | None = typer.Option(None, help="prompt: the instruction for every item."),
    max_soft_tokens: int | None = typer.Option(None, help="Image token budget: 70, 140, 280, 560 or 1120."),
    replicas: int | None = typer.Option(None, help="Model actors (one replica each)."),
    batch_size: int | None = typer.Option(None, help="Units per Ray Data batch handed to a model actor."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)."),
    speculative: bool | None = typer.Option(
        None, "--speculative/--no-speculative", help="engine.speculative on / off (unset: the file's, default auto)."
    ),
    retry_failed: bool | None = typer.Option(
        None, "--retry-failed/--no-retry-failed", help="On rerun, retry items in errors/ (default) or keep them."
    ),
    storage_option: list[str] | None = typer.Option(None, help="fsspec option KEY=VALUE for input and output."),
    skip_unsupported: bool | None = typer.Option(
        None,
        "--skip-unsupported/--no-skip-unsupported",
        help="Leave out (and count) files this project cannot read, instead of one error row each.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show Ray Data progress bars."),
) -> None:
    """Run (or resume) a batch job: media in, Parquet results out."""
    from jobs.job_files import load_job
    from pipelines.batch import run as run_job

    storage = parse_storage_options(storage_option) or None
    overrides = {
        "input": {"url": input, "storage_options": storage, "skip_unsupported": skip_unsupported},
        "output": {"url": output, "storage_options": storage, "retry_failed": retry_failed},
        "task": {
            "task": task,
            "max_new_tokens": max_new_tokens,
            "language": language,
            "source_language": source_language,
            "target_language": target_language,
            "question": question,
            "prompt": prompt,
        },
        "model": {"name": model},
        "engine": {"kind": engine, "speculative": speculative},
        "media": {"max_soft_tokens": max_soft_tokens},
        "resources": {"replicas": replicas, "batch_size": batch_size, "address": address},
    }
    job = load_job(job_file, overrides)
    quiet_library_logs()
    summary = run_job(job, progress=progress)  # a failure that stops the job: one message and exit 2 (failures.py)
    print_summary(summary, console)
    if summary.failed:  # this run's failures, and earlier ones kept by --no-retry-failed
        raise typer.Exit(code=EXIT_ITEMS_FAILED)


def print_summary(summary: JobSummary, console: Console) -> None:
    """The table a person reads at the end of a job, and where to look next."""
    table = Table(title=f"Job summary: {summary.output}", show_header=True)
    for column in (
        "items",
        "succeeded",
        "failed",
        "skipped (done before)",
        "items/s",
        "output tokens/s",
        "speculative acceptance",
        "engine busy",
        "mean batch",
    ):
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
    console.print(
        f"results: {output}/results/  errors: {output}/errors/  job record: {output}/_job.json", soft_wrap=True
    )
    if summary.openai_batch:
        console.print(
            f"OpenAI batch output: {output}/output.jsonl  failed lines: {output}/errors.jsonl", soft_wrap=True
        )
    look = f"gemma-unified show {output}" + (f"  |  gemma-unified show {output} --errors" if summary.failed else "")
    console.print(f"look at them: {look}", soft_wrap=True)
