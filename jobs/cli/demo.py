"""`gemma-unified demo` and `make-tiny-model`: everything end to end without downloading weights."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def make_tiny_model(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint (created if missing)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same weights."),
) -> None:
    """Write the tiny random Gemma 4 Unified checkpoint (model, MTP assistant, tokenizer, processor) to DIRECTORY."""
    from pipelines.engines.tiny_checkpoint import build_tiny_model

    path = build_tiny_model(directory, seed=seed)
    console.print(f"tiny Gemma 4 Unified written to {path} (assistant in {path / 'assistant'})")


def demo(
    directory: Path | None = typer.Option(
        None, help="Where to write sample media and outputs (a temp dir by default)."
    ),
    model: str = typer.Option("tiny", help="The model; tiny needs no weights (its words are random)."),
) -> None:
    """Make sample images, speech and a PDF, then caption, transcribe, translate and answer them end to end."""
    from jobs.cli.failures import quiet_library_logs
    from jobs.demo import run_demo

    quiet_library_logs()
    run_demo(directory, model, console)
