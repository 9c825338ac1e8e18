"""`gemma-unified show OUTPUT [--errors]`: the first rows of a job's results (or errors), as a table."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from jobs.cli.options import parse_storage_options

console = Console()

RESULT_COLUMNS = ("id", "task", "text", "finish_reason", "output_tokens")
ERROR_COLUMNS = ("id", "stage", "error")
CELL_CHARS = 200


def first_rows(url: str, folder: str, limit: int, storage_options: dict | None = None) -> tuple[list[dict], int]:
    """Up to `limit` rows of OUTPUT/folder and the folder's total row count (from the Parquet footers)."""
    import pyarrow.parquet as pq

    from pipelines.output import OutputDir

    out = OutputDir(url, storage_options or {})
    rows, total = [], 0
    for part in out.parts(folder):
        with out.fs.open(part, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            total += parquet.metadata.num_rows
            if len(rows) < limit:
                rows += parquet.read().slice(0, limit - len(rows)).to_pylist()
    return rows, total


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "..."


def show(
    output: str = typer.Argument(..., help="The job's output URL (what --output was)."),
    errors: bool = typer.Option(False, "--errors", help="Show errors/ instead of results/."),
    limit: int = typer.Option(10, min=1, help="Rows to show."),
    column: list[str] | None = typer.Option(None, help="Columns to show (repeatable; default: the main ones)."),
    storage_option: list[str] | None = typer.Option(None, help="fsspec storage option KEY=VALUE (repeatable)."),
) -> None:
    """Print the first rows of a job's results (or, with --errors, its errors) and how many there are."""
    folder = "errors" if errors else "results"
    rows, total = first_rows(output, folder, limit, parse_storage_options(storage_option))
    names = list(column or (ERROR_COLUMNS if errors else RESULT_COLUMNS))
    table = Table(title=f"{output.rstrip('/')}/{folder}/: first {len(rows)} of {total} rows", show_lines=True)
    for name in names:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(name)) for name in names))
    console.print(table)
