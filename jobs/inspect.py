"""`gemma-unified inspect`: what the model will see of each file, before any GPU is involved."""

from __future__ import annotations

import fsspec

from pipelines.errors import GemmaUnifiedError
from pipelines.prepare import AUDIO, DOCUMENT, IMAGE, MediaLimits, prepare_item
from pipelines.prompts import TaskOptions


def inspect_file(url: str, *, tokenizer, options: TaskOptions, limits: MediaLimits, storage_options=None) -> dict:
    """One JSON-ready record per file; a bad file gives a record with `error` set, never an exception."""
    record: dict = {
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
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            data = handle.read()
        item = prepare_item(data, item_id=url, name=url, tokenizer=tokenizer, options=options, limits=limits)
    except (GemmaUnifiedError, OSError) as exc:
        record["error"] = str(exc)
        return record
    record["modality"] = item.modality
    record["requests"] = len(item.requests)
    record["tokens"] = sum(r.image_tokens + r.audio_tokens for r in item.requests)
    record["prompt_tokens"] = [r.prompt_tokens for r in item.requests]
    if item.modality == IMAGE:
        record["size_decoded"] = item.detail["size_decoded"]
        record["size"] = item.detail["size"]
        record["grid"] = item.detail["grid"]
    elif item.modality == AUDIO:
        record["duration_s"] = round(item.detail["duration_s"], 3)
        record["sample_rate"] = item.detail["sample_rate"]
        record["channels"] = item.detail["channels"]
        record["windows"] = [
            [round(seg.start_s, 3), round(seg.end_s, 3), req.audio_tokens]
            for seg, req in zip(item.segments, item.requests)
        ]
    elif item.modality == DOCUMENT:
        record["pages"] = item.detail["pages"]
        record["windows"] = [[seg.pages[0], seg.pages[-1], req.image_tokens] for seg, req in zip(item.segments, item.requests)]
    return record


def describe(record: dict) -> str:
    """A one-line human summary of an inspect record."""
    if record["error"]:
        return f"error: {record['error']}"
    modality = record["modality"]
    prompt = "+".join(str(n) for n in record["prompt_tokens"])
    if modality == IMAGE:
        (dh, dw), (h, w), (rows, cols) = record["size_decoded"], record["size"], record["grid"]
        return f"image {dw}x{dh} -> {w}x{h}, grid {rows}x{cols} = {record['tokens']} image tokens; prompt {prompt} tokens"
    if modality == AUDIO:
        windows = ", ".join(f"{s:.2f}-{e:.2f}s:{n}" for s, e, n in record["windows"])
        return (
            f"audio {record['duration_s']:.2f}s ({record['sample_rate']} Hz, {record['channels']} ch), "
            f"{len(record['windows'])} window(s) [{windows}] = {record['tokens']} audio tokens; prompt {prompt} tokens"
        )
    if modality == DOCUMENT:
        windows = ", ".join(f"pages {a}-{b}:{n}" for a, b, n in record["windows"])
        return f"document {record['pages']} page(s), {len(record['windows'])} window(s) [{windows}]; prompt {prompt} tokens"
    return f"text; prompt {prompt} tokens"
