"""Errors as the endpoint answers them: OpenAI's `{"error": {"message", "type", "param", "code"}}` bodies.

Pipeline errors (ItemError and subclasses) carry their own HTTP status; everything else the endpoint refuses on
purpose is an APIError. Neither depends on the web framework.
"""

from __future__ import annotations

from pydantic import ValidationError

from pipelines.errors import ItemError, error_code

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER = "server_error"
OVERLOADED = "overloaded_error"


# The `code` of errors raised without a more specific one: clients branch on it, so it is never null.
DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    499: "client_closed_request",
    500: "internal_error",
    503: "overloaded",
    504: "timeout",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def overloaded(retry_after_s: int, message: str = "the model is overloaded; retry later") -> APIError:
    return APIError(503, message, type=OVERLOADED, code="overloaded", headers={"Retry-After": str(retry_after_s)})


def from_item_error(error: ItemError, param: str | None = None) -> APIError:
    param = param or getattr(error, "param", None)
    return APIError(error.http_status, str(error), param=param, code=error_code(error))


_UNION_BRANCHES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _location(loc: tuple) -> str | None:
    """The field's path as the client wrote it: without FastAPI's source and pydantic's union-branch names
    (`list[tagged-union[...]]`, `str`, `function-after[...]`)."""
    parts, tag_next = [], False
    for p in loc:
        if isinstance(p, str) and "tagged-union[" in p:
            tag_next = True  # a list of tagged unions: after the index comes the tag, which is no field
        elif tag_next and isinstance(p, str):
            tag_next = False
        elif not (
            isinstance(p, str) and (p in _UNION_BRANCHES or "[" in p or p in ("body", "query", "path", "header"))
        ):
            parts.append(str(p))
    return ".".join(parts) or None


def _message(error: dict) -> str:
    message = error["msg"]
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def from_validation_errors(errors: list[dict]) -> APIError:
    """FastAPI's / pydantic's error list -> one 400 naming the first bad field (malformed JSON included)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        return APIError(
            400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", code="invalid_json"
        )
    # For a union (`content` as text or parts) pydantic reports every branch; the deepest error is the one meant.
    errors = sorted(errors, key=lambda e: -len((_location(tuple(e.get("loc", ()))) or "").split(".")))
    param = _location(tuple(errors[0].get("loc", ())))
    lines = dict.fromkeys(f"{_location(tuple(e.get('loc', ()))) or 'body'}: {_message(e)}" for e in errors)
    message = "; ".join(list(lines)[:5])
    return APIError(400, message, param=param, code="invalid_value")


def from_pydantic(error: ValidationError) -> APIError:
    return from_validation_errors(error.errors(include_url=False))
