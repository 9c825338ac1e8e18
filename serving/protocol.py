"""OpenAI-compatible bodies of the endpoint's own routes: audio transcription and translation, models.

The chat completion bodies, shared with OpenAI batch files, are in pipelines/chat/protocol.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# ---- audio ----


class SpeechRequest(_Request):
    """The form fields of /v1/audio/transcriptions and /v1/audio/translations."""

    model: str = Field(min_length=1, max_length=256)
    language: str | None = Field(None, min_length=1, max_length=64)
    prompt: str | None = Field(None, max_length=4096)
    response_format: Literal["json", "text", "verbose_json"] = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    target_language: str = Field(
        "English", min_length=1, max_length=64, description="Extension for translations (OpenAI's is English)."
    )


class Segment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float = 0.0  # not measured: the engines return no token log-probabilities
    compression_ratio: float
    no_speech_prob: float = 0.0  # not estimated: this model has no no-speech head


class SpeechUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class Transcription(BaseModel):
    text: str
    usage: SpeechUsage | None = None


class TranscriptionVerbose(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[Segment]
    usage: SpeechUsage | None = None


# ---- models ----


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gemma-unified"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
