"""Generate: prepared units -> result or error rows, in an actor pool with one model replica per actor."""

from __future__ import annotations

import json
import logging
import os

from pipelines.config import JobSpec
from pipelines.engines.base import GenerationResult
from pipelines.errors import ItemError, error_code
from pipelines.output import GENERATED_COLUMNS, RESULT_COLUMNS, OutputDir
from pipelines.prompts import Task, parse_translation
from pipelines.replica import REPLICA_STATS
from pipelines.stages.base import Stage, StageResources, require_columns, scalar, window_total
from pipelines.units import CHAT_TASK, unpack

logger = logging.getLogger(__name__)


def _result_table(rows: list[dict]):
    import pyarrow as pa

    return pa.table(
        {k: pa.array([r[k] for r in rows], type=pa.type_for_alias(t)) for k, t in GENERATED_COLUMNS.items()}
    )


class Generate(Stage):
    """prepared units -> result (or error) rows. One model replica per actor, fed by several batches at once.

    `__call__` is async: Ray Data keeps `resources.max_concurrent_batches` batches in flight on each actor, and the
    replica runtime (pipelines/replica.py) merges their requests into full engine batches.
    """

    name = "generate"
    needs = ("id", "item_id", "source", "task", "error", "error_stage", "request_ids")
    produces = (*GENERATED_COLUMNS, REPLICA_STATS)
    job: JobSpec | None = None  # bound into the class for the actor pool (see `for_job`)

    @classmethod
    def for_job(cls, job: JobSpec) -> type[Generate]:
        """This class with the job bound in: Ray ships the class with the actor's definition, so a replacement actor
        never depends on constructor arguments held in the object store (which may be gone by then)."""
        return type(cls.__name__, (cls,), {"job": job, "__module__": cls.__module__, "__qualname__": cls.__qualname__})

    @classmethod
    def resources(cls, job: JobSpec) -> StageResources:
        import ray

        settings = job.resources
        gpus = settings.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        # A fatal engine error ends the actor's process: Ray Data starts a replacement (up to max_replica_restarts)
        # and retries the batches that were in flight on it. __call__ is async: each actor runs
        # max_concurrent_batches batches at once, as ray.data.llm's engine stage does.
        return StageResources(
            num_cpus=settings.cpus_per_replica,
            num_gpus=gpus,
            custom=settings.replica_resources or {},
            batch_size=settings.batch_size,
            actors=settings.replicas,
            concurrent_batches=settings.max_concurrent_batches,
            max_restarts=settings.max_replica_restarts,
        )

    def __init__(self, job: JobSpec | None = None) -> None:
        from pipelines.replica import Replica

        job = self.job = job or type(self).job
        self.task = Task(job.task.task)
        threads = max(1, int(job.resources.cpus_per_replica))
        import torch

        torch.set_num_threads(threads)
        self.engine = self.make_engine(job.model)
        self.replica = Replica(self.engine, job.engine, on_fatal=self._replace_replica)
        self.model_name = job.model.name

    def make_engine(self, model):
        from pipelines.replica import open_engine

        return open_engine(model, self.job.engine)

    async def __call__(self, batch: dict) -> dict:
        require_columns(batch, self.needs, self.name)
        rows = [{key: scalar(values[i]) for key, values in batch.items()} for i in range(len(batch["id"]))]
        outputs: list[dict] = [None] * len(rows)  # type: ignore[list-item]
        live = []
        for index, row in enumerate(rows):
            if row["error"] is not None:
                outputs[index] = _error_row(row, row["error_stage"], row["error"], row.get("error_code"))
            else:
                live.append(index)
        units = {index: unpack(rows[index]) for index in live}
        requests = [r for index in live for r in units[index]]
        outcomes = await self.replica.submit_all(requests)
        results = {r.id: _outcome(o) for r, o in zip(requests, outcomes)}
        for index in live:
            row, requests = rows[index], units[index]
            failed = [results[r.id] for r in requests if isinstance(results[r.id], tuple)]
            if failed:
                message = "; ".join(message for message, _ in failed)
                outputs[index] = _error_row(row, "generate", message, failed[0][1])
            else:
                outputs[index] = self._result_row(row, [results[r.id] for r in requests])
        table = _result_table(outputs)
        stats = json.dumps(self.replica.stats().as_dict())
        return table.append_column(REPLICA_STATS, _strings([stats] * table.num_rows))

    def _replace_replica(self, exc: BaseException) -> None:
        """Exit the actor process: Ray starts a replacement (up to `max_replica_restarts`) and retries its units."""
        cause = f"{type(exc).__name__}: {exc}"
        logger.error("fatal engine error, this model replica exits to be replaced: %s", cause)
        try:
            OutputDir(self.job.output.url, self.job.output.storage_options).record_replica_failure(cause)
        finally:
            os._exit(1)

    def _result_row(self, row: dict, results: list[GenerationResult]) -> dict:
        spans = json.loads(row["segments_in"])
        # A chat answer is the model's text as the endpoint returns it; task outputs are trimmed for reading.
        texts = [r.text if row["task"] == CHAT_TASK else r.text.strip() for r in results]
        transcript = translation = None
        if self.task is Task.translate:
            pairs = [parse_translation(t, self.job.task.target_language or "") for t in texts]
            transcript = " ".join(p[0] for p in pairs if p[0])
            translation = " ".join(p[1] for p in pairs if p[1])
        segments = None
        if spans:
            segments = json.dumps([{"start_s": s, "end_s": e, "text": t} for (s, e), t in zip(spans, texts)])
        drafted = [r.spec_drafted for r in results if r.spec_drafted is not None]
        return {
            "id": row["id"],
            "item_id": row["item_id"],
            "source": row["source"],
            "task": row["task"],
            "text": " ".join(t for t in texts if t),
            "transcript": transcript,
            "translation": translation,
            "segments": segments,
            "pages": row["pages"] if row["pages"] != "[]" else None,
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "image_tokens": sum(r.image_tokens for r in results),
            "audio_tokens": sum(r.audio_tokens for r in results),
            "output_tokens": sum(r.output_tokens for r in results),
            "finish_reason": "length" if any(r.finish_reason == "length" for r in results) else "stop",
            "model": self.model_name,
            "latency_s": float(sum(r.latency_s for r in results)),
            "spec_drafted": sum(drafted) if drafted else None,
            "spec_accepted": sum(r.spec_accepted or 0 for r in results) if drafted else None,
            "error": None,
            "error_stage": None,
            "error_code": None,
            "window_total": window_total(row),
        }


def _outcome(outcome) -> GenerationResult | tuple[str, str]:
    """A result, or the request's error as the message and code its error row carries."""
    if not isinstance(outcome, BaseException):
        return outcome.result
    message = outcome.message if isinstance(outcome, ItemError) else f"{type(outcome).__name__}: {outcome}"
    return message or type(outcome).__name__, error_code(outcome)


def _strings(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _error_row(row: dict, stage: str, message: str, code: str | None) -> dict:
    empty = {key: None for key in RESULT_COLUMNS}
    return {
        **empty,
        "id": row["id"],
        "item_id": row["item_id"],
        "source": row["source"],
        "task": row["task"],
        "error": message,
        "error_stage": stage,
        "error_code": code,
        "window_total": window_total(row),
    }
