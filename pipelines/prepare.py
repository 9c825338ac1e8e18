"""One input item plus a task -> prepared requests (one per audio window or document page window).

This is the CPU half of the pipeline: the batch Prepare stage, the endpoint and `inspect` all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pipelines.engines.base import PreparedRequest, SamplingParams
from pipelines.errors import UnsupportedInput
from pipelines.media import audio as audio_media
from pipelines.media import document as document_media
from pipelines.media import image as image_media
from pipelines.prompts import Task, TaskOptions, build_prompt

IMAGE, AUDIO, DOCUMENT, TEXT = "image", "audio", "document", "text"

_EXTENSIONS = {
    IMAGE: {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif"},
    AUDIO: {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".webm"},
    DOCUMENT: {".pdf"},
    TEXT: {".txt", ".md", ".markdown"},
}

# Which modalities each task takes.
_TASK_MODALITIES = {
    Task.caption: {IMAGE},
    Task.transcribe: {AUDIO},
    Task.translate: {AUDIO},
    Task.answer: {IMAGE, DOCUMENT, TEXT},
    Task.prompt: {IMAGE, AUDIO, DOCUMENT, TEXT},
}


@dataclass(frozen=True)
class MediaLimits:
    max_soft_tokens: int = image_media.DEFAULT_SOFT_TOKENS
    max_pixels: int = image_media.DEFAULT_MAX_PIXELS
    max_audio_s: float = 4 * 3600.0
    window_s: float = 30.0
    overlap_s: float = 0.0
    max_pages: int = 8
    max_document_pages: int = 500
    dpi: float = document_media.DEFAULT_DPI


@dataclass
class Segment:
    """Where a request sits inside its item, so that windows can be stitched back in order."""

    index: int = 0
    count: int = 1
    start_s: float | None = None
    end_s: float | None = None
    pages: list[int] = field(default_factory=list)


@dataclass
class PreparedItem:
    item_id: str
    modality: str
    requests: list[PreparedRequest]
    segments: list[Segment]
    detail: dict = field(default_factory=dict)  # what `inspect` shows: sizes, durations, page counts


def detect_modality(data: bytes, name: str | None = None) -> str:
    """By file extension when there is one we know, else by magic bytes; unknown bytes are tried as images."""
    suffix = PurePosixPath(name or "").suffix.lower()
    for modality, suffixes in _EXTENSIONS.items():
        if suffix in suffixes:
            return modality
    head = data[:16]
    if document_media.is_pdf(data):
        return DOCUMENT
    if head[:4] in (b"fLaC", b"OggS") or head[:3] == b"ID3" or (head[:4] == b"RIFF" and head[8:12] == b"WAVE"):
        return AUDIO
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[:3] != b"\xff\xd8\xff":
        return AUDIO  # MPEG audio frame sync
    return IMAGE


def prepare_item(
    data: bytes,
    *,
    item_id: str,
    tokenizer,
    options: TaskOptions,
    name: str | None = None,
    limits: MediaLimits = MediaLimits(),
    sampling: SamplingParams = SamplingParams(),
    modality: str | None = None,
) -> PreparedItem:
    """Decode, tokenize and build the prompt(s) for one item. Raises ItemError subclasses on bad input."""
    label = name or item_id
    options.validate(label)
    modality = modality or detect_modality(data, name)
    if modality not in _TASK_MODALITIES[options.task]:
        raise UnsupportedInput(f"task {options.task.value!r} does not take {modality} input", item=label)

    def request(suffix: str, media: list[tuple[str, int]], **arrays) -> PreparedRequest:
        prompt = build_prompt(tokenizer, options, media)
        return PreparedRequest(
            id=item_id + suffix,
            prompt_token_ids=prompt.ids,
            mm_token_type_ids=prompt.mm_token_type_ids,
            sampling=sampling,
            **arrays,
        )

    if modality == IMAGE:
        image = image_media.prepare_image(
            data, max_soft_tokens=limits.max_soft_tokens, item=label, max_pixels=limits.max_pixels
        )
        req = request("", [(IMAGE, image.tokens)], image_patches=[image.patches], image_positions=[image.positions])
        detail = {"size_decoded": list(image.decoded_size), "size": list(image.size), "grid": list(image.grid)}
        return PreparedItem(item_id, IMAGE, [req], [Segment()], detail)

    if modality == AUDIO:
        clip = audio_media.prepare_audio(
            data, item=label, window_s=limits.window_s, overlap_s=limits.overlap_s, max_duration_s=limits.max_audio_s
        )
        count = len(clip.windows)
        requests, segments = [], []
        for window in clip.windows:
            suffix = "" if count == 1 else f"#{window.index}"
            requests.append(request(suffix, [(AUDIO, window.tokens)], audio_frames=[window.frames]))
            segments.append(Segment(window.index, count, window.start_s, window.end_s))
        detail = {"duration_s": clip.duration_s, "sample_rate": clip.sample_rate_in, "channels": clip.channels_in}
        return PreparedItem(item_id, AUDIO, requests, segments, detail)

    if modality == DOCUMENT:
        document = document_media.prepare_pdf(
            data,
            item=label,
            max_soft_tokens=limits.max_soft_tokens,
            max_pages=limits.max_pages,
            dpi=limits.dpi,
            max_document_pages=limits.max_document_pages,
            max_pixels=limits.max_pixels,
        )
        count = len(document.windows)
        requests, segments = [], []
        for window in document.windows:
            suffix = "" if count == 1 else f"#{window.index}"
            requests.append(
                request(
                    suffix,
                    [(IMAGE, page.tokens) for page in window.images],
                    image_patches=[page.patches for page in window.images],
                    image_positions=[page.positions for page in window.images],
                )
            )
            segments.append(Segment(window.index, count, pages=list(window.pages)))
        detail = {"pages": document.page_count}
        return PreparedItem(item_id, DOCUMENT, requests, segments, detail)

    text = document_media.decode_text_document(data, item=label)
    text_options = _with_document_text(options, text)
    prompt = build_prompt(tokenizer, text_options, [])
    req = PreparedRequest(
        id=item_id, prompt_token_ids=prompt.ids, mm_token_type_ids=prompt.mm_token_type_ids, sampling=sampling
    )
    return PreparedItem(item_id, TEXT, [req], [Segment()], {"chars": len(text)})


def _with_document_text(options: TaskOptions, text: str) -> TaskOptions:
    from dataclasses import replace

    if options.task is Task.answer:
        return replace(options, question=f"{text}\n\n{options.question}")
    return replace(options, prompt=f"{text}\n\n{options.prompt}")
