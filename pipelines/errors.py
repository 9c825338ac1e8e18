"""One small exception tree for everything that can go wrong with an item.

Batch jobs turn these into error rows; the endpoint maps them to HTTP status codes.
"""

from __future__ import annotations


class GemmaUnifiedError(Exception):
    """Base of every error this project raises on purpose."""


class ItemError(GemmaUnifiedError):
    """A single input item cannot be processed. Carries the item, the stage and a clear message."""

    http_status = 400

    def __init__(self, message: str, *, item: str | None = None, stage: str = "prepare") -> None:
        self.item = item
        self.stage = stage
        self.message = message
        where = f"{item}: " if item else ""
        super().__init__(f"{where}{message}")

    def with_item(self, item: str) -> "ItemError":
        """Return the same error naming `item`, for layers that learn the item's name late."""
        if self.item:
            return self
        return type(self)(self.message, item=item, stage=self.stage)


class DecodeError(ItemError):
    """The bytes are not a readable image, audio clip or document."""


class UnsupportedInput(ItemError):
    """The item is of a kind this task cannot take (a PDF for transcription, say)."""


class LimitExceeded(ItemError):
    """The item is over a configured size limit (pixels, duration, pages, bytes)."""

    http_status = 413


class InvalidRequest(ItemError):
    """The request's own fields are wrong (unknown task, bad budget, missing question)."""


class GenerationFailed(ItemError):
    """The engine failed this request itself (vLLM's retryable internal error, still failing after a retry).

    Not the input's fault: a server error online (5xx), an error row in batch jobs.
    """

    http_status = 502
    code = "model_error"


class ModelSourceError(GemmaUnifiedError):
    """A model cannot be resolved or loaded (missing files, unreachable storage)."""


class StorageError(GemmaUnifiedError):
    """Object storage is unreachable or refuses the credentials."""
