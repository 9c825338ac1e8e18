"""Regenerate openai_schemas.json: the response schemas this endpoint answers with, cut from OpenAI's published
OpenAPI document (github.com/openai/openai-openapi, openapi.json) with everything they reference.

    python tests/serving/data/trim_openai_schemas.py path/to/openapi.json COMMIT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateTranscriptionResponseJson",
    "CreateTranscriptionResponseVerboseJson",
    "CreateTranslationResponseJson",
    "CreateTranslationResponseVerboseJson",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
]


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def trim(document: dict) -> dict:
    schemas = document["components"]["schemas"]
    keep: dict[str, dict] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        found: set[str] = set()
        _refs(schemas[name], found)
        todo += sorted(found - keep.keys())
    return dict(sorted(keep.items()))


def main(source: str, commit: str) -> None:
    document = json.loads(Path(source).read_text())
    out = {
        "x-provenance": {
            "repository": "https://github.com/openai/openai-openapi",
            "path": "openapi.json",
            "commit": commit,
            "openapi": document.get("openapi"),
            "roots": ROOTS,
            "note": "components.schemas entries reachable from the roots, unchanged (OpenAPI 3.0 `nullable`).",
        },
        "components": {"schemas": trim(document)},
    }
    Path(__file__).with_name("openai_schemas.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
