"""`gemma-unified demo`: sample media through every task, end to end, on the built-in tiny model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jobs.demo.samples import document, make_images, speech
from pipelines.config import InputSpec, JobSpec, OutputSpec, ResourcesSpec, TaskSpec

TASKS = [
    ("caption", "images", TaskSpec(task="caption", max_new_tokens=24)),
    ("transcribe", "audio", TaskSpec(task="transcribe", language="English", max_new_tokens=24)),
    (
        "translate",
        "audio",
        TaskSpec(task="translate", source_language="English", target_language="French", max_new_tokens=24),
    ),
    (
        "answer",
        "documents",
        TaskSpec(task="answer", question="What does the report say about revenue?", max_new_tokens=24),
    ),
]


def run_demo(directory: Path | None, model: str, console: Console) -> Path:
    from pipelines.batch import run

    directory = directory or Path(tempfile.mkdtemp(prefix="gemma-unified-demo-"))
    make_images(directory / "images")
    (directory / "audio").mkdir(parents=True, exist_ok=True)
    speech(directory / "audio" / "speech.wav")
    (directory / "documents").mkdir(parents=True, exist_ok=True)
    document(directory / "documents" / "report.pdf")
    console.print(f"Sample media in {directory}; the tiny model's weights are random, so its words are too.")

    table = Table("task", "id", "text", "tokens in/out", "finish", title="Demo results")
    for name, folder, task in TASKS:
        output = directory / "output" / name
        shutil.rmtree(output, ignore_errors=True)
        job = JobSpec(
            input=InputSpec(url=str(directory / folder)),
            task=task,
            model={"name": model},
            resources=ResourcesSpec(num_cpus=2, object_store_mb=512),
            output=OutputSpec(url=str(output)),
        )
        summary = run(job, progress=False)
        console.print(f"{name}: {summary.succeeded} succeeded, {summary.failed} failed -> {output}")
        for row in _rows(output):
            text = row["text"] if name != "translate" else f"{row['transcript']} | {row['translation']}"
            table.add_row(
                name,
                row["id"],
                (text or "")[:60],
                f"{row['prompt_tokens']}/{row['output_tokens']}",
                row["finish_reason"],
            )
    console.print(table)
    return directory


def _rows(output: Path) -> list[dict]:
    import pyarrow.parquet as pq

    results = output / "results"
    return pq.read_table(results).to_pylist() if results.exists() else []
