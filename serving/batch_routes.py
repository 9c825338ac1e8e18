"""The HTTP layer of /v1/files and /v1/batches over BatchService: parse, call, shape. The handlers are plain
functions: FastAPI runs them in its thread pool, so storage and the cluster's API never block the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from serving.batch_protocol import BatchCreateRequest
from serving.batches import MAX_LISTED_BATCHES, MAX_LISTED_FILES, BatchService

# Multipart framing around an upload of max_file_bytes: the body limit of /v1/files is this much larger.
UPLOAD_ENVELOPE_BYTES = 64 * 1024
FILES_PATH = "/v1/files"


def batch_routes(service: BatchService, owner: Callable[..., str]) -> APIRouter:
    """`owner` is the dependency that checks the API key and names who calls (serving/auth.py Authenticator.owner)."""
    router = APIRouter()

    @router.post(FILES_PATH)
    def upload_file(file: UploadFile = File(...), purpose: str = Form(...), who: str = Depends(owner)):
        return service.upload(who, file.filename or "", purpose, file.file).model_dump()

    @router.get(FILES_PATH)
    def list_files(
        purpose: str | None = Query(None),
        after: str | None = Query(None),
        limit: int = Query(MAX_LISTED_FILES, ge=1, le=MAX_LISTED_FILES),
        order: Literal["asc", "desc"] = Query("desc"),
        who: str = Depends(owner),
    ):
        return service.list_files(who, purpose=purpose, after=after, limit=limit, order=order).model_dump()

    @router.get(FILES_PATH + "/{file_id}")
    def retrieve_file(file_id: str, who: str = Depends(owner)):
        return service.retrieve_file(who, file_id).model_dump()

    @router.get(FILES_PATH + "/{file_id}/content")
    def file_content(file_id: str, who: str = Depends(owner)):
        record, chunks = service.content(who, file_id)
        # Chunked, without Content-Length: the record's `bytes` is the size when the record was made.
        disposition = {"Content-Disposition": f'attachment; filename="{record.filename}"'}
        return StreamingResponse(chunks, media_type="application/octet-stream", headers=disposition)

    @router.delete(FILES_PATH + "/{file_id}")
    def delete_file(file_id: str, who: str = Depends(owner)):
        return service.delete_file(who, file_id).model_dump()

    @router.post("/v1/batches")
    def create_batch(body: BatchCreateRequest, who: str = Depends(owner)):
        return service.create_batch(who, body).model_dump()

    @router.get("/v1/batches")
    def list_batches(
        after: str | None = Query(None),
        limit: int = Query(20, ge=1, le=MAX_LISTED_BATCHES),
        who: str = Depends(owner),
    ):
        return service.list_batches(who, after=after, limit=limit).model_dump()

    @router.get("/v1/batches/{batch_id}")
    def retrieve_batch(batch_id: str, who: str = Depends(owner)):
        return service.retrieve_batch(who, batch_id).model_dump()

    @router.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, who: str = Depends(owner)):
        return service.cancel_batch(who, batch_id).model_dump()

    return router
