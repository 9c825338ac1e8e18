"""The `gemma-unified` command line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Batch and online inference for Gemma 4 12B Unified: images, audio and documents in, text out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


def _parse_storage_options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        options[key] = value
    return options


@app.command()
def inspect(
    files: List[str] = typer.Argument(..., help="Local paths or fsspec URLs (s3://, gs://, ...)."),
    task: str = typer.Option("prompt", help="caption, transcribe, translate, answer or prompt."),
    max_soft_tokens: int = typer.Option(280, help="Image token budget: 70, 140, 280, 560 or 1120."),
    model: str = typer.Option("tiny", help="Model whose tokenizer counts prompt tokens."),
    window_s: float = typer.Option(30.0, help="Audio window length in seconds (at most 30)."),
    overlap_s: float = typer.Option(0.0, help="Overlap between audio windows in seconds."),
    max_pages: int = typer.Option(8, help="Document pages per request window."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    storage_option: Optional[List[str]] = typer.Option(None, help="fsspec storage option KEY=VALUE (repeatable)."),
) -> None:
    """Show what the model will see of each file: modality, sizes, patch grid, audio windows, token counts."""
    from jobs.inspect import describe, inspect_file
    from pipelines.models import load_tokenizer
    from pipelines.prepare import MediaLimits
    from pipelines.prompts import Task, TaskOptions

    options = TaskOptions(
        task=Task(task),
        question="What does this show?",
        prompt="Describe this.",
        source_language="English",
        target_language="French",
    )
    limits = MediaLimits(max_soft_tokens=max_soft_tokens, window_s=window_s, overlap_s=overlap_s, max_pages=max_pages)
    tokenizer = load_tokenizer(model)
    storage = _parse_storage_options(storage_option)
    records = [inspect_file(f, tokenizer=tokenizer, options=options, limits=limits, storage_options=storage) for f in files]
    if as_json:
        for record in records:
            typer.echo(json.dumps(record))
    else:
        table = Table("file", "modality", "tokens", "details")
        for record in records:
            table.add_row(record["file"], record["modality"] or "-", str(record["tokens"] or "-"), describe(record))
        console.print(table)
    if any(record["error"] for record in records):
        raise typer.Exit(code=1)


@app.command()
def demo(
    directory: Optional[Path] = typer.Option(None, help="Where to write the sample media (a temp dir by default)."),
) -> None:
    """Make sample images, a spoken clip and a PDF, and show what the model will see of them."""
    from jobs.samples import make_samples

    directory = directory or Path(tempfile.mkdtemp(prefix="gemma-unified-demo-"))
    files = make_samples(directory)
    console.print(f"Sample media in {directory}")
    inspect([str(f) for f in files], task="prompt", max_soft_tokens=280, model="tiny", window_s=30.0,
            overlap_s=0.0, max_pages=8, as_json=False, storage_option=None)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
