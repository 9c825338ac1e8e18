"""The `gemma-unified` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from jobs.failures import EXIT_ITEMS_FAILED, ContractGroup, quiet_library_errors, set_verbose

app = typer.Typer(
    cls=ContractGroup,
    help="Batch and online inference for Gemma 4 12B Unified: images, audio and documents in, text out. "
    "Exit codes: 0 all succeeded, 1 some items failed, 2 could not run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", help="Log what happens, and print tracebacks of "
                                       "failures (accepted anywhere on the command line).")) -> None:
    set_verbose(verbose)


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
    from jobs.inspect import describe, inspect_files
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
    failed = False
    for record in inspect_files(files, tokenizer=tokenizer, options=options, limits=limits, storage_options=storage):
        failed = failed or bool(record["error"])  # each record prints as soon as its file is done
        if as_json:
            typer.echo(json.dumps(record))
        else:
            console.print(f"[bold]{escape(record['file'])}[/bold]  {escape(describe(record))}", soft_wrap=True)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def run(
    job_file: Optional[Path] = typer.Argument(None, help="A job YAML (JobSpec); flags override its fields."),
    task: Optional[str] = typer.Option(None, help="caption, transcribe, translate, answer or prompt."),
    input: Optional[str] = typer.Option(None, "--input", help="Directory, glob, tar shards or manifest (fsspec URL)."),
    output: Optional[str] = typer.Option(None, help="Output URL: results/, errors/ and _job.json go here."),
    model: Optional[str] = typer.Option(None, help="tiny, gemma-4-12b-it, a directory, an HF id or an s3:// URL."),
    engine: Optional[str] = typer.Option(None, help="transformers or vllm."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Output tokens per request."),
    language: Optional[str] = typer.Option(None, help="transcribe: the spoken language."),
    source_language: Optional[str] = typer.Option(None, help="translate: the spoken language."),
    target_language: Optional[str] = typer.Option(None, help="translate: the target language."),
    question: Optional[str] = typer.Option(None, help="answer: the question for every item."),
    prompt: Optional[str] = typer.Option(None, help="prompt: the instruction for every item."),
    max_soft_tokens: Optional[int] = typer.Option(None, help="Image token budget: 70, 140, 280, 560 or 1120."),
    replicas: Optional[int] = typer.Option(None, help="Model actors (one replica each)."),
    batch_size: Optional[int] = typer.Option(None, help="Units per Ray Data batch handed to a model actor."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)."),
    speculative: Optional[bool] = typer.Option(None, "--speculative/--no-speculative",
                                               help="engine.speculative on / off (unset: the file's, default auto)."),
    retry_failed: Optional[bool] = typer.Option(None, "--retry-failed/--no-retry-failed",
                                                help="On rerun, retry items in errors/ (default) or keep them."),
    storage_option: Optional[List[str]] = typer.Option(None, help="fsspec option KEY=VALUE for input and output."),
    skip_unsupported: Optional[bool] = typer.Option(None, "--skip-unsupported/--no-skip-unsupported",
                                                    help="Leave out (and count) files this project cannot read, "
                                                    "instead of one error row each."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show Ray Data progress bars."),
) -> None:
    """Run (or resume) a batch job: media in, Parquet results out."""
    from jobs.report import print_summary
    from jobs.spec import load_job
    from pipelines.batch import run as run_job

    storage = _parse_storage_options(storage_option) or None
    overrides = {
        "input": {"url": input, "storage_options": storage, "skip_unsupported": skip_unsupported},
        "output": {"url": output, "storage_options": storage, "retry_failed": retry_failed},
        "task": {"task": task, "max_new_tokens": max_new_tokens, "language": language,
                 "source_language": source_language, "target_language": target_language,
                 "question": question, "prompt": prompt},
        "model": {"name": model},
        "engine": {"kind": engine, "speculative": speculative},
        "media": {"max_soft_tokens": max_soft_tokens},
        "resources": {"replicas": replicas, "batch_size": batch_size, "address": address},
    }
    job = load_job(job_file, overrides)
    quiet_library_errors()
    summary = run_job(job, progress=progress)  # a failure that stops the job: one message and exit 2 (failures.py)
    print_summary(summary, console)
    if summary.failed:  # this run's failures, and earlier ones kept by --no-retry-failed
        raise typer.Exit(code=EXIT_ITEMS_FAILED)


@app.command("make-tiny-model")
def make_tiny_model(
    directory: Path = typer.Argument(..., help="Where to write the checkpoint (created if missing)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same weights."),
) -> None:
    """Write the tiny random Gemma 4 Unified checkpoint (model, MTP assistant, tokenizer, processor) to DIRECTORY."""
    from pipelines.engines.tiny import build_tiny_model

    path = build_tiny_model(directory, seed=seed)
    console.print(f"tiny Gemma 4 Unified written to {path} (assistant in {path / 'assistant'})")


@app.command()
def demo(
    directory: Optional[Path] = typer.Option(None, help="Where to write sample media and outputs (a temp dir by default)."),
    model: str = typer.Option("tiny", help="The model; tiny needs no weights (its words are random)."),
) -> None:
    """Make sample images, speech and a PDF, then caption, transcribe, translate and answer them end to end."""
    from jobs.demo import run_demo

    run_demo(directory, model, console)


from jobs.cluster_cli import jobs_app, submit  # noqa: E402  (sub-commands live beside their logic)
from jobs.plan_cli import plan_command  # noqa: E402
from jobs.render_cli import render_k8s  # noqa: E402
from jobs.schedule_cli import schedule_app  # noqa: E402
from jobs.show import show  # noqa: E402
from serving.cli import serve_command  # noqa: E402

app.command("serve")(serve_command)
app.command("plan")(plan_command)
app.command("render-k8s")(render_k8s)
app.command()(submit)
app.command()(show)
app.add_typer(jobs_app, name="jobs")
app.add_typer(schedule_app, name="schedule")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
