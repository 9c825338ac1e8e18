"""Prepare: listing or manifest rows -> prepared units, in stateless CPU tasks (fetch, decode, tokenize)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from pipelines.config import JobSpec, MediaSpec
from pipelines.engines.base import SamplingParams
from pipelines.errors import DecodeError, ItemError, error_code
from pipelines.prepare import AUDIO, AudioRequests, check_modality, detect_modality, prepare_item
from pipelines.prompts import Task, TaskOptions
from pipelines.stages.base import Stage, StageResources, require_columns, scalar
from pipelines.units import CHAT_TASK, UNIT_COLUMNS, array_bytes, empty_arrays, pack, to_columns

logger = logging.getLogger(__name__)

# A Prepare task hands its units on once they hold this many bytes of arrays (two 30 s audio windows), so a long
# clip never sits whole in memory.
PREPARE_FLUSH_BYTES = 8 * 2**20


class Prepare(Stage):
    """listing/manifest rows -> prepared units (CPU). Skips units already in the output (`done` ids)."""

    name = "prepare"
    needs = ("id", "uri", "container")
    produces = UNIT_COLUMNS

    @classmethod
    def resources(cls, job: JobSpec) -> StageResources:
        # One CPU and a memory reservation per task. Memory is what the model actors never ask for, so the two
        # stages' remote args differ and Ray Data keeps tokenization in its own CPU tasks instead of fusing it into
        # the actors. A worker holds about 430 MiB once torch and the tokenizer are imported; the worst decode
        # measured (a 4-hour MP3) adds about 40 MB here. 1 GiB leaves room for large images and PDF pages.
        return StageResources(num_cpus=1, memory_bytes=1024**3, tasks=job.resources.prepare_concurrency)

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

        require_columns(batch, self.needs, self.name)
        units: list[dict] = []
        held = 0
        chat_lines = []
        for index in range(len(batch["id"])):
            row = {key: scalar(values[index]) for key, values in batch.items()}
            if row.get("id") and self._is_done(row["id"]):
                continue
            if row["container"] == "openai-batch":
                chat_lines.append(row)
                continue
            try:
                items = list(read_items(row, self.job.input.storage_options))
            except Exception as exc:  # unreadable object: one error row for the listing row
                units.append(self._error(row.get("id") or row["uri"], row["uri"], "read", exc))
                continue
            for item in items:
                for unit in self._prepare(item):
                    units.append(unit)
                    held += array_bytes(unit)
                    if held >= PREPARE_FLUSH_BYTES:
                        yield to_columns(units)
                        units, held = [], 0
        if chat_lines:
            units.extend(self._chat_units(chat_lines))
        if units:
            yield to_columns(units)

    def _chat_units(self, rows: list[dict]) -> list[dict]:
        """Lines of an OpenAI batch file -> one unit each (or an error row), read by the endpoint's rules; their
        image URLs are fetched concurrently."""
        from pipelines.chat.batch_lines import prepare_lines

        units = []
        for row, outcome in zip(rows, prepare_lines(self.job, self.tokenizer(), rows)):
            source = f"{row['uri']}#L{row['line']}"
            if isinstance(outcome, BaseException):
                error = {**self._error(row["id"], source, "prepare", outcome), "task": CHAT_TASK}
                param = getattr(outcome, "param", None)
                if param and not error["error"].startswith(("line ", param)):
                    error["error"] = f"{param}: {error['error']}"  # where in the request, as the endpoint says it
                units.append(error)
                continue
            base = {"item_id": row["id"], "source": source, "task": CHAT_TASK, "error": None, "error_stage": None}
            units.append(
                {
                    **base,
                    "error_code": None,
                    "window_total": None,
                    "id": row["id"],
                    "segments_in": "[]",
                    "pages": "[]",
                    **pack([replace(outcome, id=row["id"])]),
                }
            )
        return units

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
        limits = MediaSpec(
            **{
                **media.model_dump(),
                **(
                    {"max_soft_tokens": int(item.fields["max_soft_tokens"])}
                    if item.fields.get("max_soft_tokens")
                    else {}
                ),
            }
        )
        sampling = SamplingParams(
            max_new_tokens=task.max_new_tokens,
            temperature=task.temperature,
            top_p=task.top_p,
            top_k=task.top_k,
            seed=task.seed,
            stop=tuple(task.stop),
        )
        return options, limits, sampling

    def _prepare(self, item) -> Iterator[dict]:
        if self._is_done(item.id):
            return
        if "_missing" in item.fields:
            yield self._error(item.id, item.source, "read", ItemError(item.fields["_missing"]))
            return
        options, limits, sampling = self._options(item)
        base = {
            "item_id": item.id,
            "source": item.source,
            "task": self.job.task.task,
            "error": None,
            "error_stage": None,
            "error_code": None,
            "window_total": None,
        }
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
                    handle.read(),
                    item_id=item.id,
                    name=item.source,
                    tokenizer=self.tokenizer(),
                    options=options,
                    limits=limits,
                    sampling=sampling,
                    modality=modality,
                )
        except Exception as exc:  # ItemError, or a decoder bug: either way the item becomes an error row
            yield self._error(item.id, item.source, "prepare", exc)
            return
        for request, segment in zip(prepared.requests, prepared.segments):
            if request.id != item.id and self._is_done(request.id):
                continue
            yield {**base, "id": request.id, "segments_in": "[]", "pages": json.dumps(segment.pages), **pack([request])}

    def _audio_units(self, item, handle, base: dict, options, limits, sampling) -> Iterator[dict]:
        """A clip of one window is one unit; a longer clip is one unit per window, `ITEM#wN`, stitched after the run.

        One window is held back until the next decodes, so the last one can carry the window count.
        """
        windows = AudioRequests(
            handle,
            item_id=item.id,
            tokenizer=self.tokenizer(),
            options=options,
            label=item.source,
            limits=limits,
            sampling=sampling,
        )

        def unit(request, segment, total: int | None) -> dict:
            unit_id = item.id if total is None else f"{item.id}#w{segment.index}"
            return {
                **base,
                "id": unit_id,
                "segments_in": json.dumps([[segment.start_s, segment.end_s]]),
                "pages": "[]",
                "window_total": total,
                **pack([replace(request, id=unit_id)]),
            }

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
        return {
            "id": unit_id,
            "item_id": unit_id,
            "source": source,
            "task": self.job.task.task,
            "error": message,
            "error_stage": stage,
            "error_code": error_code(exc),
            "segments_in": "[]",
            "pages": "[]",
            "window_total": None,
            **empty_arrays(),
        }


_DONE_CACHE: dict[str, np.ndarray] = {}


def _done_ids(ref) -> np.ndarray:
    """The sorted done ids, fetched once per worker process (a fixed-width string array reads zero-copy)."""
    key = ref.hex()
    if key not in _DONE_CACHE:
        import ray

        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    return _DONE_CACHE[key]
