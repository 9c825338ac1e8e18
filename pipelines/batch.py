"""Build and run the Ray Data graph of a batch job: list -> prepare (CPU) -> generate (actors) -> write."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipelines.cluster import connect as join_or_start
from pipelines.config import JobSpec
from pipelines.errors import FatalEngineError, explain
from pipelines.listing_pages import BATCH_LISTING_COLUMNS, LISTING_COLUMNS, read_listing, remove_listing, write_listing
from pipelines.output import ERRORS, RESULTS, OutputDir
from pipelines.preflight import check_local_model, cluster_address
from pipelines.replica import REPLICA_STATS, aggregate
from pipelines.sources import check_reachable, detect_format, iter_listing
from pipelines.stitch import stitch_windows

DRIVER_MALLOC_ARENAS = 2  # glibc malloc arenas of the driver process, see `limit_malloc_arenas`

logger = logging.getLogger(__name__)


@dataclass
class JobSummary:
    output: str
    fingerprint: str
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    run_succeeded: int = 0
    run_failed: int = 0
    skipped: int = 0
    skipped_unsupported: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0
    wall_s: float = 0.0
    timings: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # the replica runtime's statistics, see pipelines.replica.aggregate
    openai_batch: bool = False  # the input was an OpenAI batch file: output.jsonl and errors.jsonl were written

    @property
    def items_per_s(self) -> float:
        return (self.run_succeeded + self.run_failed) / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.spec_accepted / self.spec_drafted if self.spec_drafted else None

    @property
    def busy_fraction(self) -> float | None:
        return self.engine.get("busy_fraction")

    @property
    def mean_batch_size(self) -> float | None:
        return self.engine.get("mean_batch_size")


def limit_malloc_arenas(arenas: int = DRIVER_MALLOC_ARENAS) -> bool:
    """Cap the driver's glibc malloc arenas (as MALLOC_ARENA_MAX does), unless MALLOC_ARENA_MAX is set.

    Ray Data's threads in the driver allocate and free a few KB per task and block; with glibc's default of 8 arenas
    per core, the freed memory stays spread over many fragmented arenas and the driver's RSS grows with the number
    of tasks (about a third of the driver's per-object growth, measured). The driver does no heavy allocation of its
    own, so fewer arenas cost it nothing. Only this process: Ray's workers keep the default. Returns whether the cap
    was applied (False off glibc)."""
    import ctypes
    import ctypes.util

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    m_arena_max = -8  # M_ARENA_MAX in glibc's malloc.h
    return bool(mallopt(ctypes.c_int(m_arena_max), ctypes.c_int(arenas)))


def connect(job: JobSpec) -> None:
    """Join the job's cluster (or RAY_ADDRESS), else start a local instance sized by the job."""
    join_or_start(
        job.resources.address,
        num_cpus=job.resources.num_cpus or os.cpu_count(),
        object_store_bytes=job.resources.object_store_mb * 1024 * 1024,
    )


def _batch_file_rows(job: JobSpec):
    """The lines of an OpenAI batch file as listing rows; repeated custom_ids refuse the job before it runs."""
    import fsspec

    from pipelines.chat.batch_file import BatchFileError, describe_duplicates, iter_batch_lines
    from pipelines.chat.batch_output import NO_CUSTOM_ID

    lines_of: dict[str, list[int]] = {}
    with fsspec.open(job.input.url, "rb", **job.input.storage_options) as handle:
        # Only custom_ids here: each line is checked in full by the CPU task that prepares it.
        for line in iter_batch_lines(handle, validate=False):
            row_id = line.custom_id if line.custom_id is not None else f"{NO_CUSTOM_ID}{line.number}"
            lines_of.setdefault(row_id, []).append(line.number)
            yield {
                "id": row_id,
                "uri": job.input.url,
                "container": "openai-batch",
                "offset": line.offset,
                "length": line.length,
                "line": line.number,
            }
    duplicates = {custom_id: numbers for custom_id, numbers in lines_of.items() if len(numbers) > 1}
    if duplicates:
        raise BatchFileError(f"{job.input.url}: {describe_duplicates(duplicates)}")


def _read_input(job: JobSpec, input_format: str, out: OutputDir, run_id: str, skipped: list[str]):
    """The input as a dataset of listing rows, and how many rows it has (None where that would take a read)."""
    if input_format == "manifest":
        return _read_manifest(job)
    if input_format == "openai-batch":
        pages, listed = write_listing(out, run_id, _batch_file_rows(job), BATCH_LISTING_COLUMNS)
    else:
        pages, listed = write_listing(out, run_id, iter_listing(job.input, skipped), LISTING_COLUMNS)
    return read_listing(out, pages), listed


def _read_manifest(job: JobSpec):
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from pipelines.sources import filesystem

    fs, path = filesystem(job.input.url, job.input.storage_options)
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    lower = path.lower()
    rows = None
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows  # the footer: no row is read
        dataset = ray.data.read_parquet(path, filesystem=arrow_fs)
    elif lower.endswith(".csv"):
        dataset = ray.data.read_csv(path, filesystem=arrow_fs)
    else:  # JSON Lines: Arrow's reader takes newline-delimited JSON as is (Ray's lines=True path takes no filesystem)
        dataset = ray.data.read_json(path, filesystem=arrow_fs)
    return dataset.map_batches(_normalise_manifest, batch_format="pyarrow"), rows


def _normalise_manifest(table):
    """Manifest rows -> listing rows: id, uri (or inline data), container, and the per-row task fields."""
    import base64

    import pyarrow as pa

    from pipelines.sources import LISTING_SCHEMA_FIELDS, ROW_FIELDS, stable_id

    n = table.num_rows
    names = set(table.column_names)

    def column(name: str) -> list:  # an empty CSV cell reads as "": it means "not set", like a JSON null
        values = table.column(name).to_pylist() if name in names else [None] * n
        return [None if v == "" else v for v in values]

    # Text manifests (JSON Lines, CSV) carry inline bytes as base64.
    data = [base64.b64decode(d) if isinstance(d, str) else d for d in column("data")]
    uris = column("uri")
    ids = column("id")
    ids = [str(i) if i is not None else (u or (stable_id(d) if d else None)) for i, u, d in zip(ids, uris, data)]
    columns = {
        "id": pa.array(ids, pa.string()),
        "uri": pa.array(uris, pa.string()),
        "container": pa.array(["inline" if d is not None else "file" for d in data], pa.string()),
        "data": pa.array(data, pa.binary()),
    }
    for name in ROW_FIELDS:
        columns[name] = pa.array([None if v is None else str(v) for v in column(name)], pa.string())
    budgets = column("max_soft_tokens")
    columns["max_soft_tokens"] = pa.array([None if b is None else int(b) for b in budgets], pa.int64())
    assert tuple(columns) == LISTING_SCHEMA_FIELDS
    return pa.table(columns)


def build(job: JobSpec, dataset, done_ref, generate_stage=None, items: int | None = None):
    """The graph itself, separate from I/O set-up so tests and benchmarks can run it on any dataset (and a
    `Generate` subclass, e.g. one whose engine injects faults). `items`: the listed objects, when known, for
    `items_per_prepare_task: auto`.

    Two operators: Prepare (CPU tasks) and Generate (the actor pool, which also writes the output parts and returns
    one stats row per batch)."""
    import ray

    from pipelines.stages import Generate, Prepare, map_batches

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    per_task = prepare_task_items(job.resources.items_per_prepare_task, items, cpus)
    logger.info("%s listed objects, %d per prepare task", "unknown" if items is None else items, per_task)
    # Small input blocks let many CPU tasks prepare in parallel and hand units to the model as they are ready.
    dataset = dataset.repartition(target_num_rows_per_block=per_task)
    prepared = map_batches(dataset, Prepare(job, done_ref), Prepare.resources(job))
    generate = (generate_stage or Generate).for_job(job)
    return map_batches(prepared, generate, generate.resources(job))


# `items_per_prepare_task: auto`: small tasks while a job is small (the model is fed early), then a roughly constant
# number of tasks up to the largest size. Every Ray Data task and block costs the driver a few KB for the rest of the
# run, so a job of millions of objects must not split into millions / 16 tasks.
AUTO_TASK_ITEMS = (16, 256)  # the least and the most items per prepare task
AUTO_TASKS_PER_CPU = 4  # at least this many tasks per cluster CPU, so large clusters stay busy
AUTO_MIN_TASKS = 128


def prepare_task_items(setting: int | str, items: int | None, cpus: int = 1) -> int:
    """Items per prepare task: the setting, or for `auto` the listed objects spread over
    max(128, 4 x cluster CPUs) tasks, between 16 and 256 items each (16 when the count is unknown)."""
    if setting != "auto":
        return int(setting)
    least, most = AUTO_TASK_ITEMS
    if not items:
        return least
    tasks = max(AUTO_MIN_TASKS, AUTO_TASKS_PER_CPU * cpus)
    return max(least, min(most, -(-items // tasks)))


def run(job: JobSpec, *, progress: bool = True, generate_stage=None) -> JobSummary:
    """Run (or resume) a batch job to completion and write `_job.json`. `generate_stage`: a `Generate` subclass
    (fault-injection tests).

    `_job.json` always ends in a terminal state: `succeeded` (every item of the output), `partial` (some items
    failed), or, when the run itself could not finish, `failed` or `stopped` with the reason.
    """
    started_at = datetime.now(UTC)
    out = OutputDir(job.output.url, job.output.storage_options)
    fingerprint = job.fingerprint()
    check_reachable(job.input.url, job.input.storage_options)
    out.check_fingerprint(fingerprint)
    previous = out.read_manifest() or {}
    header = {**previous, "fingerprint": fingerprint, "spec": _redacted(job), "started_at": started_at.isoformat()}
    header.pop("reason", None)
    out.write_manifest({**header, "status": "running"})
    try:
        return _run(job, out, previous, header, progress, generate_stage)
    except BaseException as exc:
        stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
        reason = "interrupted" if stopped else explain(exc)
        out.write_manifest(
            {
                **header,
                "status": "stopped" if stopped else "failed",
                "reason": reason,
                "finished_at": datetime.now(UTC).isoformat(),
            }
        )
        raise


def _run(job: JobSpec, out: OutputDir, previous: dict, header: dict, progress: bool, generate_stage) -> JobSummary:
    import numpy as np
    import ray

    started = time.perf_counter()
    limit_malloc_arenas()  # before Ray's threads start in this process
    if not cluster_address(job.resources.address):  # on a cluster the model and engine live on the workers
        check_local_model(job.model, job.engine)
    done = out.done_ids(job.output.retry_failed)
    if job.output.retry_failed:
        out.drop_errors()
    connect(job)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not progress:  # quiet runs (demo, tests, scripts) keep only Ray Data's warnings
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    run_id = uuid.uuid4().hex[:12]
    unsupported: list[str] = []
    # Decided once: telling an OpenAI batch file from a manifest reads the input's first line.
    input_format = detect_format(job.input)
    dataset, listed = _read_input(job, input_format, out, run_id, unsupported)
    done_ref = ray.put(done) if len(done) else None
    if len(done):
        logger.info("resuming %s: %d units already in the output are skipped", out.url, len(done))
    timings = {"setup_s": time.perf_counter() - started}
    summary = JobSummary(output=out.url, fingerprint=header["fingerprint"], skipped=len(done))
    out.clear_replica_failures()
    replicas: dict[str, dict] = {}  # the latest statistics of each model replica
    try:
        results = build(job, dataset, done_ref, generate_stage, listed)
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            for snapshots in batch[REPLICA_STATS]:
                for snapshot in json.loads(snapshots):
                    seen = replicas.get(snapshot["replica"])
                    if seen is None or snapshot["span_s"] >= seen["span_s"]:
                        replicas[snapshot["replica"]] = snapshot
            timings.setdefault("first_result_s", time.perf_counter() - started)  # start-up, model load included
            summary.run_succeeded += int(np.sum(batch["succeeded"]))
            summary.run_failed += int(np.sum(batch["failed"]))
            summary.output_tokens += int(np.sum(batch["output_tokens"]))
            summary.prompt_tokens += int(np.sum(batch["prompt_tokens"]))
            summary.spec_drafted += int(np.sum(batch["spec_drafted"]))
            summary.spec_accepted += int(np.sum(batch["spec_accepted"]))
    except Exception as exc:
        causes = out.replica_failures()
        if not causes:
            raise
        raise FatalEngineError(
            f"the model replica failed {len(causes)} times (resources.max_replica_restarts="
            f"{job.resources.max_replica_restarts}); last cause: {causes[-1]}. Finished items are kept in "
            f"{out.url}: rerun the same job to resume once the cause is fixed."
        ) from exc
    if out.replica_failures():
        logger.warning("model replicas were replaced after fatal engine errors: %s", "; ".join(out.replica_failures()))
    clips = stitch_windows(out)
    summary.run_succeeded += clips.succeeded
    summary.run_failed += clips.failed
    summary.skipped_unsupported = len(unsupported)
    summary.engine = aggregate(list(replicas.values()))
    summary.wall_s = time.perf_counter() - started
    timings["run_s"] = summary.wall_s - timings["setup_s"]
    summary.timings = timings
    # Counted in a worker: reading the ids of thousands of parts leaves the reading process megabytes of allocator
    # pages, which the driver would keep for the rest of its life.
    summary.succeeded, summary.failed = ray.get(
        ray.remote(num_cpus=0)(count_output).remote(job.output.url, job.output.storage_options)
    )
    summary.total = summary.succeeded + summary.failed
    if input_format == "openai-batch":
        from pipelines.chat.batch_output import write_batch_output

        write_batch_output(out, job_key=header["fingerprint"], model_id=job.chat.served_model_name or job.model.name)
        summary.openai_batch = True
    remove_listing(out, run_id)
    out.write_manifest(
        {
            **header,
            "status": "partial" if summary.failed else "succeeded",
            "finished_at": datetime.now(UTC).isoformat(),
            "counts": {"total": summary.total, "succeeded": summary.succeeded, "failed": summary.failed},
            "this_run": {
                "succeeded": summary.run_succeeded,
                "failed": summary.run_failed,
                "skipped_already_done": summary.skipped,
                "skipped_unsupported": summary.skipped_unsupported,
            },
            "skipped_unsupported": unsupported[:100],  # the first ids, so a person can see what was left out
            "throughput": {
                "items_per_s": summary.items_per_s,
                "output_tokens_per_s": summary.tokens_per_s,
                "speculative_acceptance": summary.acceptance,
            },
            "tokens": {
                "prompt": summary.prompt_tokens,
                "output": summary.output_tokens,
                "spec_drafted": summary.spec_drafted,
                "spec_accepted": summary.spec_accepted,
            },
            "engine": summary.engine,
            "timings": timings,
            "runs": previous.get("runs", 0) + 1,
        }
    )
    return summary


def count_output(url: str, storage_options: dict) -> tuple[int, int]:
    """Distinct ids in the output's results/ and errors/."""
    out = OutputDir(url, storage_options)
    return out.count_ids(RESULTS), out.count_ids(ERRORS)


def _redacted(job: JobSpec) -> dict:
    """The spec without secrets: storage options keep their keys, lose their values."""
    spec = job.model_dump()
    for section in ("input", "output", "model", "remote_media"):
        spec[section]["storage_options"] = {k: "***" for k in spec[section]["storage_options"]}
    return spec
