"""OpenAI batch input files: one `{"custom_id", "method", "url", "body"}` request per line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CHAT_URL = "/v1/chat/completions"


@dataclass(frozen=True)
class BatchLineInfo:
    number: int  # 1-based
    offset: int
    length: int
    custom_id: str | None
    problem: str | None


def _problem(line: dict) -> str | None:
    if not isinstance(line, dict):
        return "a batch line is a JSON object"
    if not isinstance(line.get("custom_id"), str) or not line["custom_id"]:
        return "custom_id is missing"
    if line.get("method") != "POST":
        return "method must be POST"
    if line.get("url") != CHAT_URL:
        return f"url must be {CHAT_URL}"
    body = line.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return "body is not a chat completion request"
    return None


def iter_batch_lines(handle) -> Iterator[BatchLineInfo]:
    offset = 0
    for number, raw in enumerate(handle, start=1):
        length = len(raw)
        if raw.strip():
            try:
                line = json.loads(raw)
            except ValueError as exc:
                yield BatchLineInfo(number, offset, length, None, f"not JSON: {exc}")
            else:
                custom_id = line.get("custom_id") if isinstance(line, dict) else None
                yield BatchLineInfo(
                    number, offset, length, custom_id if isinstance(custom_id, str) else None, _problem(line)
                )
        offset += length


def duplicate_custom_ids(infos: Iterable[BatchLineInfo]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for info in infos:
        if info.custom_id is not None:
            seen.setdefault(info.custom_id, []).append(info.number)
    return {custom_id: numbers for custom_id, numbers in seen.items() if len(numbers) > 1}
