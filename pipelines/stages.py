"""The Ray Data callables: Prepare (CPU tasks), Generate (an actor pool, one model replica each), Write.

Each stage is a small spec plus a runtime: heavy state loads once per actor in `__init__`, `__call__(batch)` stays
cheap. A bad unit never raises out of a stage: it becomes a row with `error` and `error_stage` set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from typing import Iterator

import numpy as np

from pipelines.config import JobSpec, MediaSpec
from pipelines.engines.base import GenerationResult, SamplingParams
from pipelines.errors import DecodeError, ItemError
from pipelines.media.image import PATCH_DIM
from pipelines.output import ERRORS, RESULTS, WINDOWS, OutputDir
from pipelines.prepare import AUDIO, AudioRequests, check_modality, detect_modality, prepare_item
from pipelines.prompts import Task, TaskOptions, parse_translation
from pipelines.replica import REPLICA_STATS
from pipelines.units import FRAME, pack, unpack

RESULT_COLUMNS = {
    "id": "string", "item_id": "string", "source": "string", "task": "string", "text": "string",
    "transcript": "string", "translation": "string", "segments": "string", "pages": "string",
    "prompt_tokens": "int64", "image_tokens": "int64", "audio_tokens": "int64", "output_tokens": "int64",
    "finish_reason": "string", "model": "string", "latency_s": "float64",
    "spec_drafted": "int64", "spec_accepted": "int64",
}  # fmt: skip
ERROR_COLUMNS = {"id": "string", "item_id": "string", "source": "string", "task": "string", "stage": "string",
                 "error": "string"}  # fmt: skip
# `window_total` is null for a whole unit; for one window of a long audio clip it is 0, or the clip's window count on
# its last window. Window rows are staged and stitched into one row per clip after the run (pipelines/stitch.py).
GENERATED_COLUMNS = {**RESULT_COLUMNS, "error": "string", "error_stage": "string", "window_total": "int64"}
WINDOW_COLUMNS = GENERATED_COLUMNS

logger = logging.getLogger(__name__)
# A Prepare task hands its units on once they hold this many bytes of arrays (two 30 s audio windows), so a long
# clip never sits whole in memory.
PREPARE_FLUSH_BYTES = 8 * 2**20


def _result_table(rows: list[dict]):
    import pyarrow as pa

    return pa.table({k: pa.array([r[k] for r in rows], type=pa.type_for_alias(t)) for k, t in GENERATED_COLUMNS.items()})


def _require(batch: dict, keys: tuple[str, ...], stage: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"stage {stage} needs columns {missing}; got {sorted(batch)}")


def _empty_arrays() -> dict:
    return {
        "request_ids": "[]",
        "prompt_token_ids": np.zeros(0, np.int32),
        "prompt_lengths": np.zeros(0, np.int32),
        "mm_token_type_ids": np.zeros(0, np.int8),
        "image_patches": np.zeros((0, PATCH_DIM), np.uint8),
        "image_positions": np.zeros((0, 2), np.int16),
        "image_tokens_each": np.zeros(0, np.int32),
        "images_per_request": np.zeros(0, np.int32),
        "audio_frames": np.zeros((0, FRAME), np.float32),
        "audio_tokens_each": np.zeros(0, np.int32),
        "audio_per_request": np.zeros(0, np.int32),
        "sampling": "{}",
    }


def _columns(rows: list[dict]) -> dict:
    """Rows -> columns; array-valued columns become lists of arrays (Ray stores them as ragged tensors)."""
    if not rows:
        return {}
    columns = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], np.ndarray):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            columns[key] = column
        else:
            columns[key] = np.asarray(values, dtype=object)
    return columns


class Prepare:
    """listing/manifest rows -> prepared units (CPU). Skips units already in the output (`done` ids)."""

    needs = ("id", "uri", "container")
    # One CPU and a memory reservation per task. Memory is what the model actors never ask for, so the two stages'
    # remote args differ and Ray Data keeps tokenization in its own CPU tasks instead of fusing it into the actors.
    # A worker holds about 430 MiB once torch and the tokenizer are imported; the worst decode measured (a 4-hour
    # MP3) adds about 40 MB in this stage. 1 GiB leaves room for large images and PDF pages.
    remote_args = {"num_cpus": 1, "memory": 1024**3}

    def __init__(self, job: JobSpec, done_ids_ref=None) -> None:
        self.job = job
        self.done_ids_ref = done_ids_ref

    def _is_done(self, unit_id: str) -> bool:
        if self.done_ids_ref is None:
            return False
        done = _done_ids(self.done_ids_ref)
        index = np.searchsorted(done, unit_id)
        return bool(index < len(done) and done[index] == unit_id)

    def tokenizer(self):
        from pipelines.model_sources import load_tokenizer  # cached per worker process

        return load_tokenizer(self.job.model)

    def __call__(self, batch: dict):
        """Yields batches of units as they fill up (Ray Data streams each one on): memory holds a few windows."""
        from pipelines.sources import read_items

        _require(batch, self.needs, "prepare")
        units: list[dict] = []
        held = 0
        for index in range(len(batch["id"])):
            row = {key: _scalar(values[index]) for key, values in batch.items()}
            if row.get("id") and self._is_done(row["id"]):
                continue
            try:
                items = list(read_items(row, self.job.input.storage_options))
            except Exception as exc:  # unreadable object: one error row for the listing row
                units.append(self._error(row.get("id") or row["uri"], row["uri"], "read", exc))
                continue
            for item in items:
                for unit in self._prepare(item):
                    units.append(unit)
                    held += _array_bytes(unit)
                    if held >= PREPARE_FLUSH_BYTES:
                        yield _columns(units)
                        units, held = [], 0
        if units:
            yield _columns(units)

    def _options(self, item) -> tuple[TaskOptions, MediaSpec, SamplingParams]:
        task = self.job.task
        options = TaskOptions(
            task=Task(task.task),
            language=item.fields.get("language", task.language),
            source_language=item.fields.get("source_language", task.source_language),
            target_language=item.fields.get("target_language", task.target_language),
            question=item.fields.get("question", task.question),
            prompt=item.fields.get("prompt", task.prompt),
            system=task.system,
            thinking=task.thinking,
        )
        media = self.job.media
        limits = MediaSpec(**{**media.model_dump(), **(
            {"max_soft_tokens": int(item.fields["max_soft_tokens"])} if item.fields.get("max_soft_tokens") else {}
        )})
        sampling = SamplingParams(
            max_new_tokens=task.max_new_tokens, temperature=task.temperature, top_p=task.top_p,
            top_k=task.top_k, seed=task.seed, stop=tuple(task.stop),
        )
        return options, limits, sampling

    def _prepare(self, item) -> Iterator[dict]:
        if self._is_done(item.id):
            return
        if "_missing" in item.fields:
            yield self._error(item.id, item.source, "read", ItemError(item.fields["_missing"]))
            return
        options, limits, sampling = self._options(item)
        base = {"item_id": item.id, "source": item.source, "task": self.job.task.task, "error": None,
                "error_stage": None, "window_total": None}
        try:
            handle = item.open()
        except Exception as exc:  # unreadable object (gone, permissions): one error row
            yield self._error(item.id, item.source, "read", exc)
            return
        try:
            with handle:
                options.validate(item.source)
                modality = check_modality(options, detect_modality(handle, item.source), item.source)
                if modality == AUDIO:  # decoded from the open file: a long recording is never read whole
                    yield from self._audio_units(item, handle, base, options, limits, sampling)
                    return
                prepared = prepare_item(
                    handle.read(), item_id=item.id, name=item.source, tokenizer=self.tokenizer(),
                    options=options, limits=limits, sampling=sampling, modality=modality,
                )
        except Exception as exc:  # ItemError, or a decoder bug: either way the item becomes an error row
            yield self._error(item.id, item.source, "prepare", exc)
            return
        for request, segment in zip(prepared.requests, prepared.segments):
            if request.id != item.id and self._is_done(request.id):
                continue
            yield {**base, "id": request.id, "segments_in": "[]", "pages": json.dumps(segment.pages),
                   **pack([request])}

    def _audio_units(self, item, handle, base: dict, options, limits, sampling) -> Iterator[dict]:
        """A clip of one window is one unit; a longer clip is one unit per window, `ITEM#wN`, stitched after the run.

        One window is held back until the next decodes, so the last one can carry the window count.
        """
        windows = AudioRequests(handle, item_id=item.id, tokenizer=self.tokenizer(), options=options,
                                label=item.source, limits=limits, sampling=sampling)

        def unit(request, segment, total: int | None) -> dict:
            unit_id = item.id if total is None else f"{item.id}#w{segment.index}"
            return {**base, "id": unit_id, "segments_in": json.dumps([[segment.start_s, segment.end_s]]),
                    "pages": "[]", "window_total": total, **pack([replace(request, id=unit_id)])}

        held = None
        for request, segment in windows:
            if held is not None:
                if not self._is_done(f"{item.id}#w{held[1].index}"):
                    yield unit(*held, 0)
            held = (request, segment)
        if held is None:
            raise DecodeError("no audio samples decoded", item=item.source)
        if held[1].index == 0:
            yield unit(*held, None)
        elif not self._is_done(f"{item.id}#w{held[1].index}"):
            yield unit(*held, held[1].index + 1)

    def _error(self, unit_id: str, source: str, stage: str, exc: Exception) -> dict:
        message = exc.message if isinstance(exc, ItemError) else f"{type(exc).__name__}: {exc}"
        return {"id": unit_id, "item_id": unit_id, "source": source, "task": self.job.task.task,
                "error": message, "error_stage": stage, "segments_in": "[]", "pages": "[]", "window_total": None,
                **_empty_arrays()}


_DONE_CACHE: dict[str, np.ndarray] = {}


def _done_ids(ref) -> np.ndarray:
    """The sorted done ids, fetched once per worker process (a fixed-width string array reads zero-copy)."""
    key = ref.hex()
    if key not in _DONE_CACHE:
        import ray

        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    return _DONE_CACHE[key]


def _array_bytes(unit: dict) -> int:
    return sum(value.nbytes for value in unit.values() if isinstance(value, np.ndarray))


def _scalar(value):
    """A numpy batch cell as a plain Python value; all-null Arrow columns arrive as NaN, which means None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


class Generate:
    """prepared units -> result (or error) rows. One model replica per actor, fed by several batches at once.

    `__call__` is async: Ray Data keeps `resources.max_concurrent_batches` batches in flight on each actor, and the
    replica runtime (pipelines/replica.py) merges their requests into full engine batches.
    """

    needs = ("id", "item_id", "source", "task", "error", "error_stage", "request_ids")

    def __init__(self, job: JobSpec) -> None:
        from pipelines.replica import Replica

        self.job = job
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
        _require(batch, self.needs, "generate")
        rows = [{key: _scalar(values[i]) for key, values in batch.items()} for i in range(len(batch["id"]))]
        outputs: list[dict] = [None] * len(rows)  # type: ignore[list-item]
        live = []
        for index, row in enumerate(rows):
            if row["error"] is not None:
                outputs[index] = _error_row(row, row["error_stage"], row["error"])
            else:
                live.append(index)
        units = {index: unpack(rows[index]) for index in live}
        requests = [r for index in live for r in units[index]]
        outcomes = await self.replica.submit_all(requests)
        results = {r.id: _outcome(o) for r, o in zip(requests, outcomes)}
        for index in live:
            row, requests = rows[index], units[index]
            failed = [results[r.id] for r in requests if isinstance(results[r.id], str)]
            if failed:
                outputs[index] = _error_row(row, "generate", "; ".join(failed))
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
        texts = [r.text.strip() for r in results]
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
            "id": row["id"], "item_id": row["item_id"], "source": row["source"], "task": row["task"],
            "text": " ".join(t for t in texts if t), "transcript": transcript, "translation": translation,
            "segments": segments, "pages": row["pages"] if row["pages"] != "[]" else None,
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "image_tokens": sum(r.image_tokens for r in results),
            "audio_tokens": sum(r.audio_tokens for r in results),
            "output_tokens": sum(r.output_tokens for r in results),
            "finish_reason": "length" if any(r.finish_reason == "length" for r in results) else "stop",
            "model": self.model_name,
            "latency_s": float(sum(r.latency_s for r in results)),
            "spec_drafted": sum(drafted) if drafted else None,
            "spec_accepted": sum(r.spec_accepted or 0 for r in results) if drafted else None,
            "error": None, "error_stage": None, "window_total": _window_total(row),
        }


def _outcome(outcome) -> GenerationResult | str:
    """A result, or the request's error as the message its error row carries."""
    if not isinstance(outcome, BaseException):
        return outcome.result
    message = outcome.message if isinstance(outcome, ItemError) else f"{type(outcome).__name__}: {outcome}"
    return message or type(outcome).__name__


def _strings(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _error_row(row: dict, stage: str, message: str) -> dict:
    empty = {key: None for key in RESULT_COLUMNS}
    return {**empty, "id": row["id"], "item_id": row["item_id"], "source": row["source"], "task": row["task"],
            "error": message, "error_stage": stage, "window_total": _window_total(row)}


def _window_total(row: dict) -> int | None:
    value = row.get("window_total")
    return None if value is None else int(value)


class Write:
    """result/error rows -> Parquet part files under results/ and errors/; returns small stats rows.

    Rows of one audio window go to the staging folder instead, to be stitched into their clip's row after the run.
    """

    needs = ("id", "error", "window_total")

    def __init__(self, output_url: str, storage_options: dict) -> None:
        self.output_url = output_url
        self.storage_options = storage_options

    def __call__(self, table):
        import pyarrow.compute as pc

        _require({name: None for name in table.column_names}, self.needs, "write")
        out = OutputDir(self.output_url, self.storage_options)
        # A deterministic name: a retried write task overwrites its own file instead of adding a duplicate.
        name = hashlib.sha1("\n".join(sorted(table.column("id").to_pylist())).encode()).hexdigest()[:24]
        is_window = pc.is_valid(table.column("window_total"))
        windows = table.filter(is_window)
        if windows.num_rows:
            out.write_part(windows.select(list(WINDOW_COLUMNS)), f"{WINDOWS}/part-{name}.parquet")
        whole = table.filter(pc.invert(is_window))
        failed = pc.is_valid(whole.column("error"))
        ok = whole.filter(pc.invert(failed))
        bad = whole.filter(failed)
        if ok.num_rows:
            out.write_part(ok.select(list(RESULT_COLUMNS)), f"{RESULTS}/part-{name}.parquet")
        if bad.num_rows:
            errors = bad.select(["id", "item_id", "source", "task", "error_stage", "error"])
            out.write_part(errors.rename_columns(list(ERROR_COLUMNS)), f"{ERRORS}/part-{name}.parquet")
        generated = table.filter(pc.is_null(table.column("error")))  # windows included: their tokens were made now

        def total(column: str) -> int:
            return int(pc.sum(generated.column(column)).as_py() or 0)

        replica_stats = []
        if REPLICA_STATS in table.column_names:
            replica_stats = [json.loads(v) for v in pc.unique(table.column(REPLICA_STATS)).to_pylist() if v]

        return {
            "succeeded": np.array([ok.num_rows]),
            "failed": np.array([bad.num_rows]),
            "output_tokens": np.array([total("output_tokens")]),
            "prompt_tokens": np.array([total("prompt_tokens")]),
            "spec_drafted": np.array([total("spec_drafted")]),
            "spec_accepted": np.array([total("spec_accepted")]),
            REPLICA_STATS: np.array([json.dumps(replica_stats)]),
        }
