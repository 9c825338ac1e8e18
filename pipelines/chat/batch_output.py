"""A finished OpenAI batch job's answers in OpenAI's batch output format: `output.jsonl` and `errors.jsonl`.

Written after the run from the result and error parts, one part at a time, so the driver never holds the whole
output. Every line's ids derive from the job and the custom_id: rewriting the files after a resumed run gives the
same ids for the same lines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from pipelines.chat.prepare import chat_completion
from pipelines.output import ERRORS, RESULTS, OutputDir, read_part

logger = logging.getLogger(__name__)

OUTPUT_FILE, ERROR_FILE = "output.jsonl", "errors.jsonl"
# The listing's id for a line whose custom_id cannot be read: such a line is an error line with a null custom_id.
NO_CUSTOM_ID = "(no custom_id) line "

# HTTP status of an error line, as the endpoint answers the same request.
_STATUS = {
    "model_not_found": 404,
    "limit_exceeded": 413,
    "model_error": 502,
    "internal_error": 500,
}


@dataclass
class BatchOutputCounts:
    succeeded: int = 0
    failed: int = 0


def _ident(prefix: str, *parts: str) -> str:
    return prefix + hashlib.sha256("\x00".join((prefix, *parts)).encode()).hexdigest()[:24]


def custom_id_of(row_id: str) -> str | None:
    return None if row_id.startswith(NO_CUSTOM_ID) else row_id


def output_line(job_key: str, model_id: str, row: dict, created: int) -> dict:
    custom_id = row["id"]
    body = chat_completion(
        model_id,
        row["text"] or "",
        row["finish_reason"] or "stop",
        int(row["prompt_tokens"] or 0),
        int(row["output_tokens"] or 0),
        ident=_ident("chatcmpl-", job_key, custom_id),
        created=created,
    )
    return {
        "id": _ident("batch_req_", job_key, custom_id),
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": _ident("req_", job_key, custom_id),
            "body": body.model_dump(),
        },
        "error": None,
    }


def error_line(job_key: str, row: dict) -> dict:
    code = row.get("code") or "invalid_request"
    status = _STATUS.get(code, 400)
    message = row["error"] or "failed"
    return {
        "id": _ident("batch_req_", job_key, row["id"]),
        "custom_id": custom_id_of(row["id"]),
        "response": {
            "status_code": status,
            "request_id": _ident("req_", job_key, row["id"]),
            "body": {
                "error": {
                    "message": message,
                    "type": "server_error" if status >= 500 else "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            },
        },
        "error": {"code": code, "message": message},
    }


def write_batch_output(out: OutputDir, *, job_key: str, model_id: str) -> BatchOutputCounts:
    """results/ -> output.jsonl, errors/ -> errors.jsonl (both always written, possibly empty)."""
    created = int(time.time())
    succeeded = _write_lines(
        out,
        OUTPUT_FILE,
        RESULTS,
        ["id", "text", "finish_reason", "prompt_tokens", "output_tokens"],
        lambda row: output_line(job_key, model_id, row, created),
    )
    failed = _write_lines(out, ERROR_FILE, ERRORS, None, lambda row: error_line(job_key, row))
    logger.info("wrote %d answers and %d errors as OpenAI batch output under %s", succeeded, failed, out.url)
    return BatchOutputCounts(succeeded, failed)


def _write_lines(out: OutputDir, name: str, folder: str, columns: list[str] | None, make) -> int:
    """One JSON line per row of a folder's parts, a part at a time. Written aside and moved into place on local
    disks; object stores publish an object only when it is complete."""
    path = out.path(name)
    local = "file" in (out.fs.protocol if isinstance(out.fs.protocol, (list, tuple)) else [out.fs.protocol])
    target = f"{path}.{uuid.uuid4().hex}.tmp" if local else path
    written = 0
    with out.fs.open(target, "w", encoding="utf-8") as handle:
        for part in out.parts(folder):
            with out.fs.open(part, "rb") as source:
                table = read_part(source, columns)
            for row in table.to_pylist():
                handle.write(json.dumps(make(row), ensure_ascii=False) + "\n")
                written += 1
    if local:
        out.fs.mv(target, path)
    return written
