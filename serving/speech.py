"""Transcription and translation without HTTP: an uploaded clip -> one prepared request per window of at most
30 s (the model's limit), and the windows' results -> one text plus a segment per window."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from dataclasses import dataclass

from pipelines.engines.base import GenerationResult, SamplingParams
from pipelines.errors import DecodeError, ItemError
from pipelines.prepare import AUDIO, PreparedItem, prepare_item
from pipelines.prompts import Task, TaskOptions, parse_translation
from serving.errors import APIError, from_item_error
from serving.protocol import Segment, SpeechRequest, SpeechUsage, Transcription, TranscriptionVerbose
from serving.spec import ServeSpec

# Output budget per window: about twice the speech 30 s can hold, as Whisper allows (448 tokens).
TOKENS_PER_WINDOW = {Task.transcribe: 448, Task.translate: 896}
UNKNOWN_SOURCE = "its original language"


@dataclass
class SpeechJob:
    task: Task
    form: SpeechRequest
    item: PreparedItem


class SpeechService:
    def __init__(self, spec: ServeSpec, tokenizer) -> None:
        self.spec = spec
        self.tokenizer = tokenizer

    def options(self, task: Task, form: SpeechRequest) -> TaskOptions:
        system = f"Use this context for names, terms and style: {form.prompt}" if form.prompt else None
        if task is Task.translate:
            return TaskOptions(
                task=task,
                source_language=form.language or UNKNOWN_SOURCE,
                target_language=form.target_language,
                system=system,
            )
        return TaskOptions(task=task, language=form.language, system=system)

    async def prepare(self, data: bytes, filename: str | None, form: SpeechRequest, task: Task) -> SpeechJob:
        if form.model != self.spec.model_id:
            raise APIError(
                404,
                f"the model {form.model!r} does not exist; this endpoint serves {self.spec.model_id!r}",
                param="model",
                code="model_not_found",
            )
        sampling = SamplingParams(
            max_new_tokens=min(TOKENS_PER_WINDOW[task], self.spec.limits.max_output_tokens),
            temperature=form.temperature,
        )
        limits = self.spec.media
        try:
            if not data:
                raise DecodeError("the uploaded file is empty (0 bytes)", item="file")
            item = await asyncio.to_thread(
                prepare_item,
                data,
                item_id=f"{task.value}-{uuid.uuid4().hex[:12]}",
                tokenizer=self.tokenizer,
                options=self.options(task, form),
                name=filename,
                limits=limits,
                sampling=sampling,
                modality=AUDIO,
            )
        except ItemError as exc:
            raise from_item_error(exc, "file") from None
        return SpeechJob(task, form, item)

    def answer(self, job: SpeechJob, results: list[GenerationResult]) -> Transcription | TranscriptionVerbose | str:
        texts = [self._window_text(job, r.text) for r in results]
        text = " ".join(t for t in texts if t)
        duration = float(job.item.detail.get("duration_s", 0.0))
        if job.form.response_format == "text":
            return text
        usage = SpeechUsage(seconds=round(duration, 3))
        if job.form.response_format == "json":
            return Transcription(text=text, usage=usage)
        segments = [
            Segment(
                id=index,
                seek=round((segment.start_s or 0.0) * 100),  # Whisper counts seek in 10 ms frames
                start=round(segment.start_s or 0.0, 3),
                end=round(segment.end_s or duration, 3),
                text=window_text,
                tokens=result.output_token_ids,
                temperature=job.form.temperature,
                compression_ratio=compression_ratio(window_text),
            )
            for index, (segment, result, window_text) in enumerate(zip(job.item.segments, results, texts))
        ]
        language = job.form.target_language if job.task is Task.translate else (job.form.language or "unknown")
        return TranscriptionVerbose(
            task=job.task.value,
            language=language.lower(),
            duration=round(duration, 3),
            text=text,
            segments=segments,
            usage=usage,
        )

    def _window_text(self, job: SpeechJob, text: str) -> str:
        if job.task is Task.translate:
            return parse_translation(text, job.form.target_language)[1].strip()
        return text.strip()


def compression_ratio(text: str) -> float:
    """Whisper's repetition signal: raw bytes over zlib-compressed bytes (high means looping output)."""
    raw = text.encode()
    return round(len(raw) / len(zlib.compress(raw)), 3) if raw else 0.0
