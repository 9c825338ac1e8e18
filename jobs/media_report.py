"""`gemma-unified inspect`: what the model will see of each file, before any GPU is involved.

Records stream: each file's record is yielded as soon as that file is done, and audio is decoded window by window
from the open file, so neither a long list of files nor a four-hour recording is held in memory.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator

import fsspec

from pipelines.config import MediaSpec
from pipelines.errors import GemmaUnifiedError
from pipelines.prepare import (
    AUDIO,
    DOCUMENT,
    IMAGE,
    AudioRequests,
    check_modality,
    detect_modality,
    prepare_item,
)
from pipelines.prompts import TaskOptions

logger = logging.getLogger(__name__)


def _empty_record(url: str) -> dict:
    return {
        "file": url,
        "modality": None,
        "tokens": None,
        "prompt_tokens": None,
        "grid": None,
        "size": None,
        "duration_s": None,
        "windows": None,
        "pages": None,
        "requests": None,
        "error": None,
    }


def inspect_files(
    urls: Iterable[str], *, tokenizer, options: TaskOptions, limits: MediaSpec, storage_options=None
) -> Iterator[dict]:
    """One record per file, in order, each as soon as it is ready. Never raises for a file: an unexpected
    exception (a bug, a decoder crash) becomes that file's `error`, and the next file goes on."""
    for url in urls:
        try:
            record = inspect_file(
                url, tokenizer=tokenizer, options=options, limits=limits, storage_options=storage_options
            )
        except Exception as exc:
            logger.debug("inspect %s failed unexpectedly", url, exc_info=True)
            record = {**_empty_record(url), "error": f"{url}: {type(exc).__name__}: {exc}"}
        yield record


def inspect_file(url: str, *, tokenizer, options: TaskOptions, limits: MediaSpec, storage_options=None) -> dict:
    """One JSON-ready record for one file; a bad file gives a record with `error` set."""
    record = _empty_record(url)
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            source = handle if handle.seekable() else io.BytesIO(handle.read())  # a pipe: read it whole
            options.validate(url)
            modality = check_modality(options, detect_modality(source, url), url)
            if modality == AUDIO:
                return _inspect_audio(record, source, url, tokenizer, options, limits)
            item = prepare_item(
                source.read(),
                item_id=url,
                name=url,
                tokenizer=tokenizer,
                options=options,
                limits=limits,
                modality=modality,
            )
    except GemmaUnifiedError as exc:
        record["error"] = str(exc)
        return record
    except OSError as exc:
        record["error"] = str(exc) if url in str(exc) else f"{url}: {exc}"
        return record
    record["modality"] = item.modality
    record["requests"] = len(item.requests)
    record["tokens"] = sum(r.image_tokens + r.audio_tokens for r in item.requests)
    record["prompt_tokens"] = [r.prompt_tokens for r in item.requests]
    if item.modality == IMAGE:
        record["size_decoded"] = item.detail["size_decoded"]
        record["size"] = item.detail["size"]
        record["grid"] = item.detail["grid"]
    elif item.modality == DOCUMENT:
        record["pages"] = item.detail["pages"]
        record["windows"] = [
            [seg.pages[0], seg.pages[-1], req.image_tokens] for seg, req in zip(item.segments, item.requests)
        ]
    return record


def _inspect_audio(record: dict, handle, url: str, tokenizer, options: TaskOptions, limits: MediaSpec) -> dict:
    """Audio straight from the open file, one window at a time: each window's frames are dropped once counted."""
    windows = AudioRequests(handle, item_id=url, tokenizer=tokenizer, options=options, label=url, limits=limits)
    spans, prompt_tokens = [], []
    for request, segment in windows:
        spans.append([round(segment.start_s, 3), round(segment.end_s, 3), request.audio_tokens])
        prompt_tokens.append(request.prompt_tokens)
    record.update(
        modality=AUDIO,
        requests=len(spans),
        tokens=sum(n for *_, n in spans),
        prompt_tokens=prompt_tokens,
        windows=spans,
    )
    detail = windows.detail
    record.update(
        duration_s=round(detail["duration_s"], 3), sample_rate=detail["sample_rate"], channels=detail["channels"]
    )
    return record


def describe(record: dict) -> str:
    """A one-line human summary of an inspect record."""
    if record["error"]:
        return f"error: {record['error']}"
    modality = record["modality"]
    prompt = "+".join(str(n) for n in record["prompt_tokens"])
    if modality == IMAGE:
        (dh, dw), (h, w), (rows, cols) = record["size_decoded"], record["size"], record["grid"]
        return (
            f"image {dw}x{dh} -> {w}x{h}, grid {rows}x{cols} = {record['tokens']} image tokens; prompt {prompt} tokens"
        )
    if modality == AUDIO:
        windows = ", ".join(f"{s:.2f}-{e:.2f}s:{n}" for s, e, n in record["windows"])
        return (
            f"audio {record['duration_s']:.2f}s ({record['sample_rate']} Hz, {record['channels']} ch), "
            f"{len(record['windows'])} window(s) [{windows}] = {record['tokens']} audio tokens; prompt {prompt} tokens"
        )
    if modality == DOCUMENT:
        windows = ", ".join(f"pages {a}-{b}:{n}" for a, b, n in record["windows"])
        return (
            f"document {record['pages']} page(s), {len(record['windows'])} window(s) [{windows}]; "
            f"prompt {prompt} tokens"
        )
    return f"text; prompt {prompt} tokens"
