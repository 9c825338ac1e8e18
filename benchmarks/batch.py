"""End-to-end batch throughput on the tiny model, beside a bare single-process loop, and driver memory vs input size.

    python benchmarks/batch.py [--items 300] [--new-tokens 16 128] [--repeats 2] [--memory-items 300 3000]
                               [--no-memory | --memory-only]

The bare loop reads, prepares and generates the same items in one process (batches of 8, all cores to torch). The
pipeline runs the real Ray Data job (CPU prepare tasks on one core overlapping one model actor on the others, several
Ray Data batches in flight that the replica runtime re-batches). Each output length is a group of rows: 16 new tokens
(prepare-bound on few cores, goal >= 0.6x of the bare loop on 2 cores) and 128 (generation-bound, goal >= 0.9x).
Both sides run in turn, `--repeats` times each, and each keeps its fastest run. Items/s are reported over the model
replica's span (its first unit to its last result: steady state, like the bare loop, whose model is loaded before its
clock starts), without Ray's start-up and listing (the actor's start and model load included), and for the whole job. Engine busy: time generating / time from the first item to the last
result; mean batch: requests per engine call. Driver memory is the peak RSS growth of a fresh driver process (one per
row) while a job over N objects runs; the marginal KB per object is the growth between the two sizes.
"""

from __future__ import annotations

import os
import sys

# Run as a script, the project imports from this checkout: the repo root goes first on the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from pipelines.config import InputSpec, JobSpec, MediaSpec, OutputSpec, ResourcesSpec, TaskSpec

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRss:
    def __enter__(self):
        self.baseline, self.peak, self._running = rss(), rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


def make_images(directory: Path, count: int, size: tuple[int, int]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img_{index:06d}.jpg", quality=85)


def bare_loop(directory: Path, task: TaskSpec, media: MediaSpec, batch: int) -> tuple[float, int, float]:
    """Seconds, items, and the share of those seconds spent in engine.generate."""
    import torch

    from pipelines.config import EngineSpec
    from pipelines.engines.base import SamplingParams
    from pipelines.engines.transformers import TransformersEngine
    from pipelines.model_sources import resolve
    from pipelines.prepare import prepare_item
    from pipelines.prompts import Task, TaskOptions

    torch.set_num_threads(os.cpu_count() or 1)
    engine = TransformersEngine(resolve("tiny"), EngineSpec(speculative=False, max_batch_size=batch))
    options, sampling = TaskOptions(task=Task(task.task)), SamplingParams(max_new_tokens=task.max_new_tokens)
    files = sorted(directory.iterdir())
    started = time.perf_counter()
    generating = 0.0
    for start in range(0, len(files), batch):
        requests = []
        for path in files[start : start + batch]:
            requests += prepare_item(
                path.read_bytes(),
                item_id=path.name,
                name=path.name,
                tokenizer=engine.tokenizer,
                options=options,
                limits=media,
                sampling=sampling,
            ).requests
        began = time.perf_counter()
        engine.generate(requests)
        generating += time.perf_counter() - began
    wall = time.perf_counter() - started
    return wall, len(files), generating / wall


def pipeline(directory: Path, output: Path, task: TaskSpec, media: MediaSpec, batch: int, per_task="auto"):
    from pipelines.batch import run

    shutil.rmtree(output, ignore_errors=True)
    cores = os.cpu_count() or 1
    # Prepare tasks get one core and the model actor the others (torch threads = its CPUs): prepare then overlaps
    # with generation instead of contending with torch's threads for the same cores.
    job = JobSpec(
        input=InputSpec(url=str(directory)),
        task=task,
        media=media,
        engine={"speculative": False, "max_batch_size": batch},
        resources=ResourcesSpec(
            batch_size=batch,
            num_cpus=cores,
            cpus_per_replica=max(1, cores - 1),
            object_store_mb=1024,
            items_per_prepare_task=per_task,
        ),
        output=OutputSpec(url=str(output)),
    )
    with PeakRss() as memory:
        summary = run(job, progress=False)
    return summary, memory.growth_mb


def _share(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _mean(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--memory-items", type=int, nargs=2, default=[300, 3000])
    parser.add_argument("--no-memory", action="store_true", help="Leave out the driver memory table.")
    parser.add_argument("--memory-only", action="store_true", help="Only the driver memory table.")
    parser.add_argument("--memory-row", nargs=3, help=argparse.SUPPRESS)  # count, input folder, output folder
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=2, help="Runs of each side per row; each keeps its fastest.")
    args = parser.parse_args()
    if args.memory_row:
        count, folder, output = args.memory_row
        memory_row(int(count), Path(folder), Path(output))
        return
    console = Console(width=140)
    root = Path(tempfile.mkdtemp(prefix="gemma-unified-bench-"))
    media = MediaSpec(max_soft_tokens=70)
    try:
        if not args.memory_only:
            throughput(root, args, media, console)
        if not args.no_memory:
            driver_memory(root, args.memory_items, console)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def throughput(root: Path, args, media: MediaSpec, console: Console) -> None:
    make_images(root / "items", args.items, (480, 640))
    table = Table(
        title=f"Batch pipeline vs bare loop: {args.items} JPEG 640x480 captions, tiny model, {os.cpu_count()} cores"
    )
    for column in ("new tokens", "run", "wall s", "items/s", "vs bare loop", "engine busy", "mean batch"):
        table.add_column(column, justify="right")
    import ray

    for new_tokens in args.new_tokens:
        task = TaskSpec(task="caption", max_new_tokens=new_tokens)
        # The bare loop and the pipeline run in turn, `--repeats` times each, and each side keeps its fastest run
        # (the pipeline: by its time without Ray's start-up and listing): on a shared machine a burst of other load
        # can slow one run by a sixth or more, and taking turns gives both sides the same chances.
        bares, pipelines = [], []
        for _ in range(args.repeats):
            bares.append(bare_loop(root / "items", task, media, args.batch))
            pipelines.append(pipeline(root / "items", root / "out", task, media, args.batch, per_task=32)[0])
            ray.shutdown()  # each job starts its own local instance
        bare_s, count, bare_busy = min(bares)
        summary = min(pipelines, key=lambda run: run.timings["run_s"])
        assert summary.succeeded == count, summary
        bare_rate = count / bare_s
        run_s = summary.timings["run_s"]
        busy, batch = _share(summary.busy_fraction), _mean(summary.mean_batch_size)
        table.add_row(
            str(new_tokens),
            f"bare loop (one process, best of {args.repeats})",
            f"{bare_s:.1f}",
            f"{bare_rate:.2f}",
            "1.00x",
            _share(bare_busy),
            f"{args.batch}",
        )
        table.add_row(
            "",
            f"pipeline (best of {args.repeats}), excluding Ray start-up and listing",
            f"{run_s:.1f}",
            f"{count / run_s:.2f}",
            f"{count / run_s / bare_rate:.2f}x",
            busy,
            batch,
        )
        span_s = summary.engine["span_s"]  # one replica: its first unit to its last result
        table.add_row(
            "",
            "pipeline, the model replica's span",
            f"{span_s:.1f}",
            f"{count / span_s:.2f}",
            f"{count / span_s / bare_rate:.2f}x",
            busy,
            batch,
        )
        table.add_row(
            "",
            "pipeline, whole job",
            f"{summary.wall_s:.1f}",
            f"{count / summary.wall_s:.2f}",
            f"{count / summary.wall_s / bare_rate:.2f}x",
            busy,
            batch,
        )
        first = summary.timings.get("first_result_s", 0)
        console.print(
            f"{new_tokens} new tokens: first result after {first:.1f} s "
            "(Ray start-up, listing, worker imports and the model actor's load)"
        )
    console.print(table)


MEMORY_ROW = "memory row: "  # the line a --memory-row process answers with


def driver_memory(root: Path, counts: list[int], console: Console) -> None:
    """Each row runs in a fresh process (imports done, no Ray yet): rows start from the same state, so their
    difference is what the extra objects cost, not what an earlier job left allocated or freed."""
    memory = Table(
        title="Driver memory as the input grows (1 new token, 70-token images, 96x96 JPEGs, batch 64, "
        "items_per_prepare_task auto)"
    )
    for column in ("input objects", "driver peak RSS growth MB", "wall s"):
        memory.add_column(column, justify="right")
    rows = []
    for count in counts:
        folder = root / f"memory-{count}"
        make_images(folder, count, (96, 96))
        command = [sys.executable, __file__, "--memory-row", str(count), str(folder), str(root / f"memory-out-{count}")]
        answer = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        # Ray may print workers' log lines to the same stdout: the row is the line with the marker.
        (row,) = [line for line in answer.splitlines() if line.startswith(MEMORY_ROW)]
        growth, wall = json.loads(row[len(MEMORY_ROW) :])
        rows.append((count, growth))
        memory.add_row(str(count), f"{growth:.0f}", f"{wall:.1f}")
        shutil.rmtree(folder)
    console.print(memory)
    (small, low), (large, high) = rows
    console.print(f"marginal driver memory: {(high - low) * 1024 / (large - small):.2f} KB per object")


def memory_row(count: int, folder: Path, output: Path) -> None:
    """One row of the memory table, in this process: prints [peak RSS growth MB, wall s] as JSON."""
    import pipelines.batch  # noqa: F401  (imported before the baseline: module code is not per-object memory)

    small = TaskSpec(task="caption", max_new_tokens=1)
    result, growth = pipeline(folder, output, small, MediaSpec(max_soft_tokens=70), 64)
    assert result.succeeded == count, result
    print(MEMORY_ROW + json.dumps([growth, result.wall_s]), flush=True)


if __name__ == "__main__":
    main()
