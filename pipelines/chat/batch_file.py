"""OpenAI batch files: one chat completion request per JSON line, `{"custom_id", "method", "url", "body"}`.

Read as a stream of lines with their byte ranges, so the driver of a batch job holds one line at a time and each
CPU task reads only the lines it prepares; the endpoint checks an upload with the same reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.chat.protocol import ChatCompletionRequest
from pipelines.errors import GemmaUnifiedError, RefusedRequest

CHAT_COMPLETIONS = "/v1/chat/completions"
MAX_CUSTOM_ID_CHARS = 512


class BatchLine(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    custom_id: str = Field(min_length=1, max_length=MAX_CUSTOM_ID_CHARS)
    method: Literal["POST"]
    url: Literal["/v1/chat/completions"]
    body: ChatCompletionRequest


@dataclass(frozen=True)
class BatchLineInfo:
    number: int  # 1-based line number in the file
    offset: int  # byte offset of the line
    length: int  # bytes, newline excluded
    custom_id: str | None
    problem: str | None  # why this is not a valid batch line; None when it is one


class BatchFileError(GemmaUnifiedError):
    """A batch file that cannot be run at all (repeated custom_ids): names the lines."""


def parse_line(text: bytes | str, number: int) -> BatchLine:
    """One line -> a validated request, or RefusedRequest naming the line and the field."""
    try:
        return BatchLine.model_validate_json(text)
    except ValidationError as exc:
        if _code(exc) == "invalid_json":
            raise RefusedRequest(f"line {number}: not valid JSON ({_message(exc)})", code="invalid_json") from None
        raise RefusedRequest(f"line {number}: {describe(exc)}", param=_param(exc), code="invalid_value") from None


def iter_batch_lines(handle: BinaryIO, *, validate: bool = True) -> Iterator[BatchLineInfo]:
    """Every non-blank line of a batch file with its byte range, its custom_id when one can be read, and, with
    `validate`, whether the whole line is a valid request (a malformed line is reported, never raised)."""
    offset = 0
    for number, raw in enumerate(handle, start=1):
        length = len(raw.rstrip(b"\r\n"))
        if raw.strip():
            custom_id, problem = _read(raw, number, validate)
            yield BatchLineInfo(number, offset, length, custom_id, problem)
        offset += len(raw)


def _read(raw: bytes, number: int, validate: bool) -> tuple[str | None, str | None]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"line {number}: not valid JSON ({exc})"
    if not isinstance(data, dict):
        return None, f"line {number}: a batch line is a JSON object"
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        return None, f"line {number}: custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters"
    if not validate:
        return custom_id, None
    try:
        BatchLine.model_validate_json(raw)  # as the endpoint reads a body: JSON mode, strict types
    except ValidationError as exc:
        return custom_id, f"line {number}: {describe(exc)}"
    return custom_id, None


def duplicate_custom_ids(lines: Iterable[BatchLineInfo]) -> dict[str, list[int]]:
    """custom_id -> the line numbers it appears on, for ids that appear more than once."""
    seen: dict[str, list[int]] = {}
    for line in lines:
        if line.custom_id is not None:
            seen.setdefault(line.custom_id, []).append(line.number)
    return {custom_id: numbers for custom_id, numbers in seen.items() if len(numbers) > 1}


def describe_duplicates(duplicates: dict[str, list[int]], shown: int = 5) -> str:
    parts = [f"{custom_id!r} on lines {', '.join(map(str, numbers))}" for custom_id, numbers in duplicates.items()]
    more = f" and {len(parts) - shown} more" if len(parts) > shown else ""
    return f"custom_id values must be unique in a batch file: {'; '.join(parts[:shown])}{more}"


def describe(error: ValidationError) -> str:
    return f"{_param(error) or 'line'}: {_message(error)}"


def _message(error: ValidationError) -> str:
    return error.errors(include_url=False)[0]["msg"].removeprefix("Value error, ").removeprefix("Invalid JSON: ")


def _param(error: ValidationError) -> str | None:
    first = error.errors(include_url=False)[0]
    return ".".join(str(p) for p in first["loc"] if not _is_branch(p)) or None


def _code(error: ValidationError) -> str:
    return "invalid_json" if error.errors()[0]["type"] == "json_invalid" else "invalid_value"


def _is_branch(part) -> bool:
    # pydantic names union branches (`str`, `list[...]`, `tagged-union[...]`) and tags in its locations
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none", "list", "dict"))
