"""The Ray Data callables: Prepare (CPU tasks), Generate (an actor pool, one model replica each), Write.

Each stage is a small spec plus a runtime: heavy state loads once per actor in `__init__`, `__call__(batch)` stays
cheap. A bad unit never raises out of a stage: it becomes a row with `error` and `error_stage` set.
"""

from __future__ import annotations

import hashlib
import json
import traceback
import uuid

import numpy as np

from pipelines.config import JobSpec
from pipelines.engines.base import GenerationResult, SamplingParams
from pipelines.errors import GemmaUnifiedError, ItemError
from pipelines.prepare import AUDIO, MediaLimits, prepare_item
from pipelines.prompts import Task, TaskOptions, parse_translation
from pipelines.rows import FRAME, pack, unpack
from pipelines.media.image import PATCH_DIM

RESULT_COLUMNS = {
    "id": "string", "item_id": "string", "source": "string", "task": "string", "text": "string",
    "transcript": "string", "translation": "string", "segments": "string", "pages": "string",
    "prompt_tokens": "int64", "image_tokens": "int64", "audio_tokens": "int64", "output_tokens": "int64",
    "finish_reason": "string", "model": "string", "latency_s": "float64",
    "spec_drafted": "int64", "spec_accepted": "int64",
}  # fmt: skip
ERROR_COLUMNS = {"id": "string", "item_id": "string", "source": "string", "task": "string", "stage": "string",
                 "error": "string"}  # fmt: skip
GENERATED_COLUMNS = {**RESULT_COLUMNS, "error": "string", "error_stage": "string"}


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

    needs = ("id", "uri", "kind")

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
        from pipelines.models import load_tokenizer  # cached per worker process

        return load_tokenizer(self.job.model)

    def __call__(self, batch: dict) -> dict:
        from pipelines.sources import read_items

        _require(batch, self.needs, "prepare")
        units: list[dict] = []
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
                units.extend(self._prepare(item))
        return _columns(units)

    def _prepare(self, item) -> list[dict]:
        if self._is_done(item.id):
            return []
        if "_missing" in item.fields:
            return [self._error(item.id, item.source, "read", ItemError(item.fields["_missing"]))]
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
        limits = MediaLimits(**{**media.model_dump(), **(
            {"max_soft_tokens": int(item.fields["max_soft_tokens"])} if item.fields.get("max_soft_tokens") else {}
        )})
        sampling = SamplingParams(
            max_new_tokens=task.max_new_tokens, temperature=task.temperature, top_p=task.top_p,
            top_k=task.top_k, seed=task.seed, stop=tuple(task.stop),
        )
        try:
            prepared = prepare_item(
                item.data, item_id=item.id, name=item.source, tokenizer=self.tokenizer(),
                options=options, limits=limits, sampling=sampling,
            )
        except GemmaUnifiedError as exc:
            return [self._error(item.id, item.source, "prepare", exc)]
        except Exception as exc:  # a decoder bug must not take the job down: the item becomes an error row
            return [self._error(item.id, item.source, "prepare", exc)]

        base = {"item_id": item.id, "source": item.source, "task": task.task, "error": None, "error_stage": None}
        if prepared.modality == AUDIO:
            # All windows of a clip form one unit, so the transcript is stitched inside the model actor.
            spans = [[s.start_s, s.end_s] for s in prepared.segments]
            return [{**base, "id": item.id, "segments_in": json.dumps(spans), "pages": "[]", **pack(prepared.requests)}]
        units = []
        for request, segment in zip(prepared.requests, prepared.segments):
            if request.id != item.id and self._is_done(request.id):
                continue
            units.append({**base, "id": request.id, "segments_in": "[]", "pages": json.dumps(segment.pages),
                          **pack([request])})
        return units

    def _error(self, unit_id: str, source: str, stage: str, exc: Exception) -> dict:
        message = exc.message if isinstance(exc, ItemError) else f"{type(exc).__name__}: {exc}"
        return {"id": unit_id, "item_id": unit_id, "source": source, "task": self.job.task.task,
                "error": message, "error_stage": stage, "segments_in": "[]", "pages": "[]", **_empty_arrays()}


_DONE_CACHE: dict[str, np.ndarray] = {}


def _done_ids(ref) -> np.ndarray:
    """The sorted done ids, fetched once per worker process (a fixed-width string array reads zero-copy)."""
    key = ref.hex()
    if key not in _DONE_CACHE:
        import ray

        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    return _DONE_CACHE[key]


def _scalar(value):
    """A numpy batch cell as a plain Python value; all-null Arrow columns arrive as NaN, which means None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


class Generate:
    """prepared units -> result (or error) rows. One model replica per actor."""

    needs = ("id", "item_id", "source", "task", "error", "error_stage", "request_ids")

    def __init__(self, job: JobSpec) -> None:
        from pipelines.models import resolve

        self.job = job
        self.task = Task(job.task.task)
        threads = max(1, int(job.resources.cpus_per_replica))
        import torch

        torch.set_num_threads(threads)
        model = resolve(job.model)
        if job.engine.kind == "vllm":
            from pipelines.engines.vllm import VLLMEngine

            self.engine = VLLMEngine(model, job.engine)
        else:
            from pipelines.engines.transformers import TransformersEngine

            self.engine = TransformersEngine(model, job.engine)
        self.model_name = job.model.name

    def __call__(self, batch: dict) -> dict:
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
        results = self._generate_all([r for index in live for r in units[index]])
        for index in live:
            row, requests = rows[index], units[index]
            failed = [results[r.id] for r in requests if isinstance(results[r.id], str)]
            if failed:
                outputs[index] = _error_row(row, "generate", "; ".join(failed))
            else:
                outputs[index] = self._result_row(row, [results[r.id] for r in requests])
        return _result_table(outputs)

    def _generate_all(self, requests) -> dict:
        """Generate a whole batch at once; if that fails, one request at a time, so one bad request fails alone."""
        try:
            return {r.id: r for r in self.engine.generate(requests)}
        except Exception:
            outcome: dict = {}
            for request in requests:
                try:
                    outcome[request.id] = self.engine.generate([request])[0]
                except Exception as exc:
                    message = exc.message if isinstance(exc, ItemError) else f"{type(exc).__name__}: {exc}"
                    outcome[request.id] = message or traceback.format_exc(limit=1)
            return outcome

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
            "error": None, "error_stage": None,
        }


def _error_row(row: dict, stage: str, message: str) -> dict:
    empty = {key: None for key in RESULT_COLUMNS}
    return {**empty, "id": row["id"], "item_id": row["item_id"], "source": row["source"], "task": row["task"],
            "error": message, "error_stage": stage}


class Write:
    """result/error rows -> Parquet part files under results/ and errors/; returns small stats rows."""

    needs = ("id", "error")

    def __init__(self, output_url: str, storage_options: dict) -> None:
        self.output_url = output_url.rstrip("/")
        self.storage_options = storage_options

    def __call__(self, table):
        import pyarrow.compute as pc

        _require({name: None for name in table.column_names}, self.needs, "write")
        failed = pc.is_valid(table.column("error"))
        ok = table.filter(pc.invert(failed))
        bad = table.filter(failed)
        # A deterministic name: a retried write task overwrites its own file instead of adding a duplicate.
        name = hashlib.sha1("\n".join(sorted(table.column("id").to_pylist())).encode()).hexdigest()[:24]
        if ok.num_rows:
            self._write(ok.select(list(RESULT_COLUMNS)), f"results/part-{name}.parquet")
        if bad.num_rows:
            errors = bad.select(["id", "item_id", "source", "task", "error_stage", "error"])
            self._write(errors.rename_columns(list(ERROR_COLUMNS)), f"errors/part-{name}.parquet")

        def total(column: str) -> int:
            return int(pc.sum(ok.column(column)).as_py() or 0)

        return {
            "succeeded": np.array([ok.num_rows]),
            "failed": np.array([bad.num_rows]),
            "output_tokens": np.array([total("output_tokens")]),
            "prompt_tokens": np.array([total("prompt_tokens")]),
            "spec_drafted": np.array([total("spec_drafted")]),
            "spec_accepted": np.array([total("spec_accepted")]),
        }

    def _write(self, table, relative: str) -> None:
        import fsspec
        import pyarrow.parquet as pq

        fs, root = fsspec.core.url_to_fs(self.output_url, **self.storage_options)
        path = f"{root}/{relative}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if "file" in (fs.protocol if isinstance(fs.protocol, (list, tuple)) else [fs.protocol]):
            # Local disks: write aside, then rename, so a killed job never leaves half a file behind.
            temporary = f"{path}.{uuid.uuid4().hex}.tmp"
            pq.write_table(table, temporary, filesystem=_arrow_fs(fs))
            fs.mv(temporary, path)
        else:
            with fs.open(path, "wb") as handle:  # object stores publish an object only when it is complete
                pq.write_table(table, handle)


def _arrow_fs(fs):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
