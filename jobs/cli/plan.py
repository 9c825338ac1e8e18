"""`gemma-unified plan`: what a replica needs and what fits a GPU, from the model's config alone."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def plan_command(
    model: str = typer.Option(
        "gemma-4-12b-it",
        help="A preset (gemma-4-12b-it, gemma-4-12b, gemma-4-12b-it-qat), "
        "tiny, or a checkpoint directory / id: only its config.json is read.",
    ),
    gpu_memory_gib: float = typer.Option(16.0, min=1.0, max=4096.0, help="Memory of one GPU in GiB."),
    quantization: str | None = typer.Option(
        None, help="none, fp8, bnb-8bit, bnb-4bit or compressed-tensors (default: the checkpoint's own)."
    ),
    max_model_len: int = typer.Option(8192, min=256, max=262_144, help="Prompt plus output tokens per sequence."),
    engine: str = typer.Option("vllm", help="vllm or transformers."),
    speculative: bool = typer.Option(True, "--speculative/--no-speculative", help="Count the MTP assistant."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """What one replica needs (weights, assistant, KV cache per sequence) and how many sequences fit a GPU."""
    from pydantic import ValidationError

    from pipelines.errors import GemmaUnifiedError
    from pipelines.planning import plan

    try:
        result = plan(
            model,
            gpu_memory_gib=gpu_memory_gib,
            quantization=quantization,
            max_model_len=max_model_len,
            engine=engine,
            speculative=speculative,
        )
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        console.print(f"[red]error:[/red] {problems}")
        raise typer.Exit(code=2)
    except (GemmaUnifiedError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    table = Table(title=f"{model} on a {gpu_memory_gib:g} GiB GPU ({engine}, {result.quantization})")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("parameters (target)", f"{result.params / 1e9:.2f} B"),
        ("parameters (assistant)", f"{result.assistant_params / 1e9:.2f} B" if result.assistant_params else "-"),
        ("weights", f"{result.weights_gib:.2f} GiB"),
        ("assistant weights", f"{result.assistant_gib:.2f} GiB"),
        ("engine overhead (estimate)", f"{result.overhead_gib:.2f} GiB"),
        ("usable memory", f"{result.gpu_memory_gib * result.gpu_memory_utilization:.2f} GiB"),
        ("left for the KV cache", f"{result.kv_budget_gib:.2f} GiB"),
        (f"KV per sequence of {max_model_len}", f"{result.kv_bytes_per_sequence / 2**20:.0f} MiB"),
        ("sequences that fit", str(result.max_sequences)),
        ("fits", "yes" if result.fits else "no"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
