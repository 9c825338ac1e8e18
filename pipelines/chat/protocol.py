"""OpenAI chat completion request and response bodies (the subset served here), as pydantic models: the endpoint
reads and answers them, and OpenAI batch files carry them line by line.

Requests are strict about types (a string where a number belongs is a 400, not a silent coercion) and lenient
about unknown fields, as OpenAI's own server is for fields it has retired; fields that would change the answer
and are not supported (tools, n > 1, logprobs) are refused explicitly.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

# ---- chat requests ----


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ImageURL(_Request):
    url: str = Field(min_length=1, max_length=64 * 1024 * 1024)
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Request):
    data: str = Field(min_length=0, max_length=64 * 1024 * 1024)
    format: Literal["wav", "mp3", "flac"]


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatTemplateKwargs(_Request):
    enable_thinking: bool = False


class ChatCompletionRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="0 keeps only the likeliest token (greedy).")
    top_k: int | None = Field(None, ge=0, le=1000, description="Extension: top-k sampling, 0 disables it.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)
    user: str | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias, -100 to 100.")
    ignore_eos: bool | None = Field(None, description="vLLM's extension; only false is accepted.")
    # Accepted only at their neutral values (null, false, empty, "none", text only): anything else would change the
    # answer in a way this endpoint cannot, and is refused rather than silently ignored.
    logprobs: bool | None = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: dict | None = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    store: Any = None
    # Accepted, with no effect on the answer: metadata, service_tier, parallel_tool_calls, prompt_cache_key,
    # prompt_cache_retention, prompt_cache_options, safety_identifier (ignored as unknown fields are).

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value is None:
            return value
        if len(value) > 300:
            raise ValueError("at most 300 tokens")
        for token, bias in value.items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids; {token[:20]!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} is {bias}; biases lie in [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("at most 16 stop sequences of 1 to 256 characters")
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def thinking(self) -> bool:
        return bool(self.chat_template_kwargs and self.chat_template_kwargs.enable_thinking)


# ---- chat responses ----


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None  # required (nullable) by OpenAI's schema; this model never refuses through it


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None  # required (nullable); logprobs are refused
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class _DropsNone(BaseModel):
    """Fields left None are omitted from the JSON (OpenAI omits them; `null` is not valid for them)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class Delta(_DropsNone):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None  # null in every chunk but the last


class ChatCompletionChunk(_DropsNone):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only in the usage chunk of `stream_options.include_usage`
