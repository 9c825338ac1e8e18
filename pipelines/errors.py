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

    def with_item(self, item: str) -> ItemError:
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


class RefusedRequest(InvalidRequest):
    """An OpenAI request that cannot be served as sent: names the field (`param`), a code clients branch on, and
    the HTTP status the endpoint answers with (404 for an unknown model, else 400)."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str = "invalid_request",
        status: int = 400,
        item: str | None = None,
    ) -> None:
        super().__init__(message, item=item)
        self.param, self.code, self.http_status = param, code, status

    def with_item(self, item: str) -> RefusedRequest:
        if self.item:
            return self
        return RefusedRequest(self.message, param=self.param, code=self.code, status=self.http_status, item=item)


class GenerationFailed(ItemError):
    """The engine failed this request itself (vLLM's retryable internal error, still failing after a retry).

    Not the input's fault: a server error online (5xx), an error row in batch jobs.
    """

    http_status = 502
    code = "model_error"


def error_code(exc: BaseException) -> str:
    """The code an error row and an OpenAI error body carry for an error: clients branch on it."""
    if isinstance(exc, LimitExceeded):
        return "limit_exceeded"
    if isinstance(exc, DecodeError):
        return "invalid_media"
    if isinstance(exc, UnsupportedInput):
        return "unsupported_media"
    if isinstance(exc, ItemError):
        return getattr(exc, "code", "invalid_request")
    return "internal_error"


class ModelSourceError(GemmaUnifiedError):
    """A model cannot be resolved or loaded (missing files, unreachable storage)."""


class StorageError(GemmaUnifiedError):
    """Object storage is unreachable or refuses the credentials."""


class FatalEngineError(GemmaUnifiedError):
    """The model replica cannot go on (out of memory, a dead engine): Ray replaces it; no item is to blame."""


# What a CUDA or engine failure says when it leaves the replica unusable; a bad request never says these.
_FATAL_TYPES = {"OutOfMemoryError", "EngineDeadError", "FatalEngineError"}
_FATAL_MESSAGES = (
    "CUDA out of memory",
    "CUDA error",
    "CUBLAS_STATUS_",
    "cuDNN error",
    "NCCL error",
    "device-side assert",
    "illegal memory access",
)


def is_fatal(exc: BaseException) -> bool:
    """Whether an engine error means the replica must be replaced rather than one request failed."""
    if isinstance(exc, MemoryError) or _FATAL_TYPES & {cls.__name__ for cls in type(exc).__mro__}:
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _FATAL_MESSAGES)


class ClusterError(GemmaUnifiedError):
    """The Ray cluster cannot be reached or refuses this client."""


class EngineUnavailable(GemmaUnifiedError):
    """The chosen engine cannot run here (its optional dependency is not installed)."""


def root_cause(exc: BaseException) -> BaseException:
    """The exception that started it all, through Ray's wrappers (`cause`) and Python's chaining."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GemmaUnifiedError):
            return exc
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException):
            inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            return exc
        exc = inner
    return exc


def explain(exc: BaseException) -> str:
    """One line for a person: what failed and what to try, whatever layer raised it."""
    cause = root_cause(exc)
    if isinstance(cause, GemmaUnifiedError):
        return str(cause)
    if isinstance(cause, ImportError):
        package = (cause.name or "").split(".")[0]
        if package == "vllm":
            return (
                "the vLLM engine is not installed here: pip install -c constraints.txt '.[vllm]' on a GPU "
                "machine, or use the transformers engine (--engine transformers)"
            )
        return f"a required package is missing ({cause}): reinstall with pip install -c constraints.txt -e ."
    text = str(cause).strip()
    if any(marker in text for marker in ("InvalidAuthToken", "Unauthenticated", "UNAUTHENTICATED")):
        return (
            "the Ray cluster refused this client's authentication token: give it the cluster's token "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH to its file, or ~/.ray/auth_token)"
        )
    first = text.splitlines()[0] if text else ""
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__
