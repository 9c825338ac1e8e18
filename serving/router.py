"""The HTTP layer: OpenAI routes, health, readiness and metrics over ChatService / SpeechService / ModelBackend.

Thin on purpose: parse, call the serving logic, shape the answer. Every refusal is an OpenAI-style JSON error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.chat.media_sources import MediaFetcher
from pipelines.chat.prepare import ChatPreparer, usage
from pipelines.chat.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    completion_id,
    now,
)
from pipelines.engines.base import PreparedRequest
from pipelines.errors import ItemError
from pipelines.prompts import Task
from serving.auth import Authenticator
from serving.batch_jobs import RaySubmitter
from serving.batch_routes import FILES_PATH, UPLOAD_ENVELOPE_BYTES, batch_routes
from serving.batch_store import BatchStore
from serving.batches import BatchService
from serving.errors import (
    INVALID_REQUEST,
    NOT_FOUND,
    SERVER,
    APIError,
    from_item_error,
    from_pydantic,
    from_validation_errors,
)
from serving.metrics import CONTENT_TYPE, Metrics
from serving.middleware import BodyLimit, RequestMetrics
from serving.model_client import ModelBackend
from serving.openapi import describe
from serving.protocol import ModelCard, ModelList, SpeechRequest
from serving.spec import ServeSpec
from serving.speech import SpeechService

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _event_error(event: dict) -> APIError:
    error = event["error"]
    return APIError(
        error["status"],
        error["message"],
        type=SERVER if error["status"] >= 500 else INVALID_REQUEST,
        code=error["code"],
    )


def chat_preparer(spec: ServeSpec, tokenizer, fetcher: MediaFetcher | None = None) -> ChatPreparer:
    """Chat requests read by this endpoint's rules (the same class reads OpenAI batch lines in batch jobs)."""
    return ChatPreparer(
        spec.chat,
        spec.media,
        model_id=spec.model_id,
        max_model_len=spec.engine.max_model_len,
        tokenizer=tokenizer,
        fetcher=fetcher or MediaFetcher(spec.remote_media),
    )


def build_api(
    spec: ServeSpec,
    backend: ModelBackend,
    tokenizer,
    *,
    authenticator: Authenticator,
    metrics: Metrics,
    fetcher: MediaFetcher | None = None,
    batches: BatchService | None = None,
) -> FastAPI:
    app = FastAPI(title="gemma-unified", summary="OpenAI-compatible endpoint for Gemma 4 12B Unified")
    chat = chat_preparer(spec, tokenizer, fetcher)
    speech = SpeechService(spec, tokenizer)
    created = now()

    # ---- errors ----

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        if exc.status == 401:
            metrics.rejected.labels("auth").inc()
        return error_response(exc)

    @app.exception_handler(ItemError)
    async def _item_error(_: Request, exc: ItemError):
        return error_response(from_item_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return error_response(from_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = NOT_FOUND if exc.status_code == 404 else "invalid_request_error"
        # Starlette's 405 carries the Allow header; keep it.
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        error = APIError(500, f"internal error: {type(exc).__name__}", type=SERVER, code="internal_error")
        return error_response(error)

    def require_key(authorization: str | None = Header(None)) -> None:
        authenticator.check(authorization)

    def caller(authorization: str | None = Header(None)) -> str:
        return authenticator.owner(authorization)

    # ---- chat ----

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request):
        started = time.perf_counter()
        try:
            body = ChatCompletionRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise from_pydantic(exc) from None
        prepared = await chat.prepare(body)
        prepare_ms = (time.perf_counter() - started) * 1000
        if body.stream:
            return await _stream(body, prepared, started)
        called = time.perf_counter()
        reply = await backend.generate(prepared)
        model_ms = (time.perf_counter() - called) * 1000
        result = reply.result
        metrics.observe_result(result)
        # Where the time went, for clients and benchmarks: prepare (decode, tokenize) and the model call as the
        # ingress sees it, the model replica's part of that, and the engine's part of the replica's.
        timing = ", ".join(
            f"{name};dur={ms:.2f}"
            for name, ms in (
                ("prepare", prepare_ms),
                ("model", model_ms),
                ("replica", reply.replica_s * 1000),
                ("engine", result.latency_s * 1000),
                ("ingress", (time.perf_counter() - started) * 1000),
            )
        )
        return JSONResponse(chat.completion(result).model_dump(), headers={"Server-Timing": timing})

    async def _stream(body: ChatCompletionRequest, prepared: PreparedRequest, started: float) -> StreamingResponse:
        events = backend.stream(prepared).__aiter__()
        # The first event is awaited before answering, so overload and bad requests still get their status.
        first = await anext(events)
        if "error" in first:
            raise _event_error(first)
        return StreamingResponse(
            _sse(body, prepared, first, events, started),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _sse(body, prepared, first: dict, events: AsyncIterator[dict], started: float):
        ident, stamp = completion_id(), now()

        def chunk(delta: Delta, finish=None, use=None) -> str:
            payload = ChatCompletionChunk(
                id=ident,
                created=stamp,
                model=spec.model_id,
                choices=[] if use else [ChunkChoice(delta=delta, finish_reason=finish)],
                usage=use,
            )
            return f"data: {payload.model_dump_json()}\n\n"

        yield chunk(Delta(role="assistant", content=""))
        event, first_text = first, True
        try:
            while event is not None:
                if "delta" in event:
                    if first_text:
                        metrics.first_token.observe(time.perf_counter() - started)
                        first_text = False
                    yield chunk(Delta(content=event["delta"]))
                elif "error" in event:
                    yield f"data: {json.dumps(_event_error(event).body())}\n\n"
                    break
                else:
                    yield chunk(Delta(), finish=event["finish_reason"])
                    metrics.tokens.labels("prompt").inc(prepared.prompt_tokens)
                    metrics.tokens.labels("output").inc(event["output_tokens"])
                    if body.stream_options and body.stream_options.include_usage:
                        yield chunk(Delta(), use=usage(prepared.prompt_tokens, event["output_tokens"]))
                    break
                event = await anext(events, None)
        except Exception as exc:
            if not isinstance(exc, APIError):
                logger.exception("a chat stream failed after its first event")
            error = (
                exc
                if isinstance(exc, APIError)
                else APIError(500, f"the stream failed: {type(exc).__name__}", type=SERVER, code="internal_error")
            )
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"

    # ---- audio ----

    async def _speech(task: Task, file: UploadFile, fields: dict):
        try:
            form = SpeechRequest.model_validate({k: v for k, v in fields.items() if v is not None}, strict=False)
        except ValidationError as exc:
            raise from_pydantic(exc) from None
        job = await speech.prepare(await file.read(), file.filename, form, task)
        results = [reply.result for reply in await asyncio.gather(*(backend.generate(r) for r in job.item.requests))]
        for result in results:
            metrics.observe_result(result)
        answer = speech.answer(job, list(results))
        if isinstance(answer, str):
            return PlainTextResponse(answer)
        return JSONResponse(answer.model_dump(exclude_none=True))

    @app.post("/v1/audio/transcriptions", dependencies=[Depends(require_key)])
    async def transcriptions(
        file: UploadFile = File(...),
        model: str = Form(...),
        language: str | None = Form(None),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
        stream: str | None = Form(None),
        timestamp_granularities: list[str] | None = Form(None, alias="timestamp_granularities[]"),
    ):
        # Refused rather than ignored: no streamed transcription, and segments are the only timestamps.
        if stream is not None and stream.lower() not in ("false", "0"):
            raise APIError(400, "stream is not supported for transcriptions", param="stream", code="unsupported")
        if any(g != "segment" for g in timestamp_granularities or ()):
            raise APIError(
                400, "only segment timestamps are supported", param="timestamp_granularities", code="unsupported"
            )
        return await _speech(
            Task.transcribe,
            file,
            dict(
                model=model, language=language, prompt=prompt, response_format=response_format, temperature=temperature
            ),
        )

    @app.post("/v1/audio/translations", dependencies=[Depends(require_key)])
    async def translations(
        file: UploadFile = File(...),
        model: str = Form(...),
        language: str | None = Form(None, description="Extension: the spoken language, when known."),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float = Form(0.0),
        target_language: str | None = Form(None, description="Extension: translate into this (English)."),
    ):
        return await _speech(
            Task.translate,
            file,
            dict(
                model=model,
                language=language,
                prompt=prompt,
                response_format=response_format,
                temperature=temperature,
                target_language=target_language,
            ),
        )

    # ---- files and batches ----

    if batches is None:
        store = BatchStore(spec.batch.storage_url, spec.batch.storage_options)
        batches = BatchService(spec, store, RaySubmitter(spec.batch.ray_address))
    app.include_router(batch_routes(batches, caller))

    # ---- models, health, metrics ----

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models():
        return ModelList(data=[ModelCard(id=spec.model_id, created=created)]).model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def get_model(model_id: str):
        if model_id != spec.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist", type=NOT_FOUND, code="model_not_found")
        return ModelCard(id=spec.model_id, created=created).model_dump()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        # Never waits on the model: a loading replica answers at once, and no answer within READY_TIMEOUT_S (no
        # model replica up yet, or none free) counts as not ready.
        info = await backend.ready(READY_TIMEOUT_S)
        ready = bool(info) and not info.get("loading") and not info.get("error")
        metrics.model_ready.set(1 if ready else 0)
        if ready:
            return {"status": "ready", **info}
        if info and info.get("error"):  # the model could not load: say why, no Retry-After (waiting will not help)
            error = APIError(503, info["error"], type=SERVER, code="model_not_loaded")
            return JSONResponse({"status": "failed", "model": spec.model_id, **error.body()}, status_code=503)
        if info:
            message = f"the model {spec.model_id!r} is loading ({info.get('elapsed_s', 0):.0f} s so far)"
        else:
            message = f"no model replica answered within {READY_TIMEOUT_S:g} s: the model is starting"
        error = APIError(503, message, type=SERVER, code="model_loading")
        return JSONResponse(
            {
                "status": "loading",
                "model": spec.model_id,
                **({"elapsed_s": info["elapsed_s"]} if info else {}),
                **error.body(),
            },
            status_code=503,
            headers={"Retry-After": str(spec.limits.retry_after_s)},
        )

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    describe(app)
    app.add_middleware(
        BodyLimit,
        max_bytes=spec.limits.max_body_bytes,
        metrics=metrics,
        path_limits={FILES_PATH: spec.batch.max_file_bytes + UPLOAD_ENVELOPE_BYTES},
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
