"""The engine contract: prepared requests in, generation results out, for batches and for streams."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 means greedy (the batch default, for reproducible output)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0  # OpenAI's: minus count x this, for each token already generated
    presence_penalty: float = 0.0  # minus this once a token has been generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class PreparedRequest:
    """Everything the model needs for one generation, in compact Arrow-friendly arrays.

    Images are uint8 patches [n, 6912] with int16 (x, y) positions [n, 2] (the model side rescales by 1/255);
    audio is float32 frames [t, 640] at 16 kHz. Media appear in prompt order.
    """

    id: str
    prompt_token_ids: np.ndarray  # int32 [L]
    mm_token_type_ids: np.ndarray  # int8 [L]
    image_patches: list[np.ndarray] = field(default_factory=list)
    image_positions: list[np.ndarray] = field(default_factory=list)
    audio_frames: list[np.ndarray] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_token_ids.shape[0])

    @property
    def image_tokens(self) -> int:
        return sum(int(p.shape[0]) for p in self.image_patches)

    @property
    def audio_tokens(self) -> int:
        return sum(int(f.shape[0]) for f in self.audio_frames)


@dataclass
class GenerationResult:
    id: str
    text: str
    finish_reason: str  # "stop" (end of turn / stop string) or "length"
    prompt_tokens: int
    image_tokens: int
    audio_tokens: int
    output_tokens: int
    latency_s: float
    output_token_ids: list[int] = field(default_factory=list)
    spec_drafted: int | None = None  # speculative decoding: tokens proposed by the assistant
    spec_accepted: int | None = None  # ... and accepted by the target


@dataclass(frozen=True)
class StreamEnd:
    """The last item of an engine's stream: the engine's own count of generated tokens and why it stopped."""

    finish_reason: str  # "stop" (end of turn / stop string) or "length"
    output_tokens: int


class Watch:
    """A caller's hold on one request while an engine generates it.

    `cancel()` stops that request's generation at the engine's next decoding step (a client that left, a stream that
    found its stop string); the rest of its batch goes on. A watch made with `streaming()` also receives each step's
    new token ids, then the request's `GenerationResult` or its exception, on the caller's event loop: an engine's
    threads hand items over with `put`, never blocking on the reader.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.cancelled = threading.Event()
        self.loop = loop
        self.items: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.delivered = False  # whether any token ids were handed over (a retry would repeat them)

    @classmethod
    def streaming(cls) -> Watch:
        return cls(asyncio.get_running_loop())

    @property
    def streams(self) -> bool:
        return self.items is not None

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, item) -> None:
        """From any thread: a list of new token ids, a GenerationResult, or an exception."""
        if self.items is None:
            return
        if isinstance(item, list):
            self.delivered = True
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the caller's loop has closed: nobody reads this stream any more
            self.cancel()


def check_fits(request: PreparedRequest, max_model_len: int) -> None:
    """Refuse a request whose prompt plus output cannot fit the model's context, naming the request."""
    from pipelines.errors import InvalidRequest

    if request.prompt_tokens + request.sampling.max_new_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt ({request.prompt_tokens}) plus max_new_tokens ({request.sampling.max_new_tokens}) "
            f"exceeds max_model_len {max_model_len}",
            item=request.id,
            stage="generate",
        )


class Engine(Protocol):
    def generate(
        self, requests: list[PreparedRequest], watches: list[Watch | None] | None = None
    ) -> list[GenerationResult]:
        """One result per request, in order. An engine that generates step by step honours each watch: a cancelled
        request ends early (its partial result is nobody's answer), a streaming watch receives its tokens."""

    def stream(self, request: PreparedRequest) -> AsyncIterator[str | StreamEnd]:
        """Text deltas, then one StreamEnd. Closing the iterator early stops the generation."""

    def health(self) -> bool: ...

    def close(self) -> None: ...
