"""The app's OpenAPI document as clients see the endpoint: the chat body described (the route parses it itself,
for strict types and OpenAI-style errors) and OpenAI-style 400 errors instead of FastAPI's 422, which never
happens here."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pipelines.chat.protocol import ChatCompletionRequest

_REF = "#/components/schemas/{model}"
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def describe(app: FastAPI, chat_path: str = "/v1/chat/completions") -> None:
    """Install `app.openapi` so /openapi.json is built once, with the chat body and without the phantom 422."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        body = ChatCompletionRequest.model_json_schema(ref_template=_REF)
        schemas.update(body.pop("$defs", {}))
        schemas["ChatCompletionRequest"] = body
        schemas["ErrorResponse"] = _ERROR
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error = {
            "description": "OpenAI-style error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }
        for path, operations in document.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if path.startswith("/v1/"):
                    responses.setdefault("400", error)
        document["paths"][chat_path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        }
        app.openapi_schema = document
        return document

    app.openapi = openapi
