"""`gemma-unified inspect`: what the model will see of each file, before any GPU is involved."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape

from jobs.cli.options import parse_storage_options

console = Console()


def inspect_command(
    files: list[str] = typer.Argument(..., help="Local paths or fsspec URLs (s3://, gs://, ...)."),
    task: str = typer.Option("prompt", help="caption, transcribe, translate, answer or prompt."),
    max_soft_tokens: int = typer.Option(280, help="Image token budget: 70, 140, 280, 560 or 1120."),
    model: str = typer.Option("tiny", help="Model whose tokenizer counts prompt tokens."),
    window_s: float = typer.Option(30.0, help="Audio window length in seconds (at most 30)."),
    overlap_s: float = typer.Option(0.0, help="Overlap between audio windows in seconds."),
    max_pages: int = typer.Option(8, help="Document pages per request window."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    storage_option: list[str] | None = typer.Option(None, help="fsspec storage option KEY=VALUE (repeatable)."),
) -> None:
    """Show what the model will see of each file: modality, sizes, patch grid, audio windows, token counts."""
    from jobs.media_report import describe, inspect_files
    from pipelines.config import MediaSpec
    from pipelines.model_sources import load_tokenizer
    from pipelines.prompts import Task, TaskOptions

    options = TaskOptions(
        task=Task(task),
        question="What does this show?",
        prompt="Describe this.",
        source_language="English",
        target_language="French",
    )
    limits = MediaSpec(max_soft_tokens=max_soft_tokens, window_s=window_s, overlap_s=overlap_s, max_pages=max_pages)
    tokenizer = load_tokenizer(model)
    storage = parse_storage_options(storage_option)
    failed = False
    for record in inspect_files(files, tokenizer=tokenizer, options=options, limits=limits, storage_options=storage):
        failed = failed or bool(record["error"])  # each record prints as soon as its file is done
        if as_json:
            typer.echo(json.dumps(record))
        else:
            console.print(f"[bold]{escape(record['file'])}[/bold]  {escape(describe(record))}", soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)
