"""Validate answers against OpenAI's published response schemas (the trimmed copy in data/openai_schemas.json)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator

_FILE = Path(__file__).with_name("data") / "openai_schemas.json"


def _nullable(node):
    """OpenAI's document still marks some schemas with OpenAPI 3.0's `nullable`; JSON Schema spells it `null`."""
    if isinstance(node, list):
        return [_nullable(value) for value in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _validator(name: str) -> Draft202012Validator:
    schemas = _nullable(json.loads(_FILE.read_text())["components"]["schemas"])
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}})


def check(name: str, instance) -> None:
    """Raise with every violation listed when `instance` does not match OpenAI's schema `name`."""
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        raise AssertionError(
            f"not a valid {name}: "
            + "; ".join(f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:5])
        )


def _route_schema(path: str, body) -> str | None:
    if path.endswith("/v1/chat/completions"):
        return "CreateChatCompletionResponse"
    if path.endswith(("/v1/audio/transcriptions", "/v1/audio/translations")):
        kind = "Transcription" if path.endswith("transcriptions") else "Translation"
        return f"Create{kind}Response{'VerboseJson' if 'segments' in body else 'Json'}"
    if path.endswith("/v1/models"):
        return "ListModelsResponse"
    if "/v1/models/" in path:
        return "Model"
    return None


def check_http(path: str, status: int, content_type: str, content: bytes) -> None:
    """Check one answer of this endpoint: errors, chat completions, every stream chunk, speech, models."""
    if content_type.startswith("text/event-stream"):
        for line in content.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                check("ErrorResponse" if "error" in event else "CreateChatCompletionStreamResponse", event)
        return
    if not content_type.startswith("application/json") or "/v1/" not in path:
        return
    body = json.loads(content)
    name = "ErrorResponse" if status >= 400 else _route_schema(path, body)
    if name:
        check(name, body)


def response_hook(response) -> None:
    """An httpx response hook that validates every answer (it reads streams in full first)."""
    response.read()
    check_http(
        response.request.url.path, response.status_code, response.headers.get("content-type", ""), response.content
    )


async def async_response_hook(response) -> None:
    await response.aread()
    check_http(
        response.request.url.path, response.status_code, response.headers.get("content-type", ""), response.content
    )
