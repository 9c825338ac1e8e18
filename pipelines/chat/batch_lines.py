"""Lines of an OpenAI batch file -> prepared requests, in a batch job's CPU task, by the endpoint's rules."""

from __future__ import annotations

import asyncio
import logging

from pipelines.chat.batch_file import parse_line
from pipelines.chat.media_sources import MediaFetcher
from pipelines.chat.prepare import ChatPreparer
from pipelines.config import JobSpec
from pipelines.engines.base import PreparedRequest
from pipelines.errors import ItemError, LimitExceeded, StorageError

logger = logging.getLogger(__name__)

# Lines prepared at once by one task: their image fetches overlap, their decoding runs in a few threads.
CONCURRENT_LINES = 8


def preparer(job: JobSpec, tokenizer) -> ChatPreparer:
    """The job's reader of chat requests: object-storage image URLs through the input's storage options unless
    remote_media names its own, http(s) only for the allow-list, behind the same guard as the endpoint."""
    remote = job.remote_media
    if not remote.storage_options and job.input.storage_options:
        remote = remote.model_copy(update={"storage_options": dict(job.input.storage_options)})
    return ChatPreparer(
        job.chat,
        job.media,
        model_id=job.chat.served_model_name or job.model.name,
        max_model_len=job.engine.max_model_len,
        tokenizer=tokenizer,
        fetcher=MediaFetcher(remote),
    )


def read_lines(job: JobSpec, rows: list[dict]) -> list[bytes | Exception]:
    """The bytes of each listed line (one open file for all of them)."""
    import fsspec

    texts: list[bytes | Exception] = []
    uri = rows[0]["uri"]
    try:
        with fsspec.open(uri, "rb", **job.input.storage_options) as handle:
            for row in rows:
                handle.seek(int(row["offset"]))
                texts.append(handle.read(int(row["length"])))
    except Exception as exc:  # the file went away mid-job: every line of this task is an error line
        error = StorageError(f"cannot read {uri}: {type(exc).__name__}: {exc}")
        return [error] * len(rows)
    return texts


def prepare_lines(job: JobSpec, tokenizer, rows: list[dict]) -> list[PreparedRequest | Exception]:
    """One outcome per row, in order: the prepared request, or the error its error line reports."""
    texts = read_lines(job, rows)
    chat = preparer(job, tokenizer)

    async def one(row: dict, text, gate: asyncio.Semaphore) -> PreparedRequest | Exception:
        if isinstance(text, Exception):
            return text
        limit = job.chat.limits.max_body_bytes
        if len(text) > limit:  # a line is one request body: the endpoint's body limit applies to it
            return LimitExceeded(f"line {row['line']} is {len(text):,} bytes; a request is limited to {limit:,}")
        try:
            async with gate:
                return await chat.prepare(parse_line(text, int(row["line"])).body)
        except ItemError as exc:
            return exc
        except Exception as exc:  # a decoder bug: still this line's error, never the task's
            logger.warning("line %s of %s failed to prepare: %s: %s", row["line"], row["uri"], type(exc).__name__, exc)
            return exc

    async def all_lines() -> list[PreparedRequest | Exception]:
        gate = asyncio.Semaphore(CONCURRENT_LINES)
        try:
            return await asyncio.gather(*(one(row, text, gate) for row, text in zip(rows, texts)))
        finally:
            await chat.fetcher.close()

    return asyncio.run(all_lines())
