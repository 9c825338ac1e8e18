"""Errors as the endpoint answers them: OpenAI's `{"error": {"message", "type", "param", "code"}}` bodies.

Pipeline errors (ItemError and subclasses) carry their own HTTP status; everything else the endpoint refuses on
purpose is an APIError. Neither depends on the web framework.
"""

from __future__ import annotations

from pydantic import ValidationError

from pipelines.errors import DecodeError, ItemError, LimitExceeded, UnsupportedInput

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER = "server_error"
OVERLOADED = "overloaded_error"


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
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def overloaded(retry_after_s: int, message: str = "the model is overloaded; retry later") -> APIError:
    return APIError(503, message, type=OVERLOADED, code="overloaded", headers={"Retry-After": str(retry_after_s)})


_ITEM_CODES = [
    (LimitExceeded, "limit_exceeded"),
    (DecodeError, "invalid_media"),
    (UnsupportedInput, "unsupported_media"),
]


def from_item_error(error: ItemError, param: str | None = None) -> APIError:
    code = next((c for cls, c in _ITEM_CODES if isinstance(error, cls)), getattr(error, "code", "invalid_request"))
    return APIError(error.http_status, str(error), param=param, code=code)


def _location(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def from_validation_errors(errors: list[dict]) -> APIError:
    """FastAPI's / pydantic's error list -> one 400 naming the first bad field (malformed JSON included)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    param = _location(tuple(first.get("loc", ())))
    message = "; ".join(f"{_location(tuple(e.get('loc', ()))) or 'body'}: {e['msg']}" for e in errors[:5])
    return APIError(400, message, param=param, code="invalid_value")


def from_pydantic(error: ValidationError) -> APIError:
    return from_validation_errors(error.errors(include_url=False))
