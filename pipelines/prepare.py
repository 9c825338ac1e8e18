"""One input item plus a task -> prepared requests (one per audio window or document page window).

This is the CPU half of the pipeline: the batch Prepare stage, the endpoint and `inspect` all call it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from pipelines.config import MediaSpec
from pipelines.engines.base import PreparedRequest, SamplingParams
from pipelines.errors import DecodeError, UnsupportedInput
from pipelines.media import audio as audio_media
from pipelines.media import document as document_media
from pipelines.media import image as image_media
from pipelines.media.sniff import AUDIO, DOCUMENT, IMAGE, TEXT, modality_of
from pipelines.prompts import Task, TaskOptions, build_prompt

# Which modalities each task takes.
_TASK_MODALITIES = {
    Task.caption: {IMAGE},
    Task.transcribe: {AUDIO},
    Task.translate: {AUDIO},
    Task.answer: {IMAGE, DOCUMENT, TEXT},
    Task.prompt: {IMAGE, AUDIO, DOCUMENT, TEXT},
}


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


def detect_modality(source: bytes | BinaryIO, name: str | None = None) -> str | None:
    """By content (magic bytes, then the decoders' own probes), then by extension; None when neither tells."""
    return modality_of(source, name)


def check_modality(options: TaskOptions, modality: str | None, label: str) -> str:
    """The modality to decode an item as, refusing one the task does not take."""
    if modality is None:
        takes = _TASK_MODALITIES[options.task] - {TEXT}
        if len(takes) != 1:
            raise DecodeError(
                "unknown format: not an image, audio file, PDF or UTF-8 text this project reads", item=label
            )
        (modality,) = takes  # a caption gets Pillow's verdict, a transcription the audio decoders'
    if modality not in _TASK_MODALITIES[options.task]:
        raise UnsupportedInput(f"task {options.task.value!r} does not take {modality} input", item=label)
    return modality


def _request(
    tokenizer, options: TaskOptions, sampling: SamplingParams, request_id: str, media: list[tuple[str, int]], **arrays
) -> PreparedRequest:
    prompt = build_prompt(tokenizer, options, media)
    return PreparedRequest(
        id=request_id,
        prompt_token_ids=prompt.ids,
        mm_token_type_ids=prompt.mm_token_type_ids,
        sampling=sampling,
        **arrays,
    )


class AudioRequests:
    """An audio item's requests, one per window, built as the windows decode: memory holds one window at a time.

    Iterating yields (request, segment) with ids `ITEM#i` and `segment.count` unknown (0); `prepare_item`
    collects them and settles both. `clip` is the AudioStream (rate, channels, duration once iterated).
    """

    def __init__(
        self,
        source,
        *,
        item_id: str,
        tokenizer,
        options: TaskOptions,
        label: str,
        limits: MediaSpec = MediaSpec(),
        sampling: SamplingParams = SamplingParams(),
    ) -> None:
        self.item_id, self.tokenizer, self.options, self.sampling = item_id, tokenizer, options, sampling
        self.clip = audio_media.AudioStream(
            source,
            item=label,
            window_s=limits.window_s,
            overlap_s=limits.overlap_s,
            max_duration_s=limits.max_audio_s,
        )

    def __iter__(self) -> Iterator[tuple[PreparedRequest, Segment]]:
        for window in self.clip:
            request = _request(
                self.tokenizer,
                self.options,
                self.sampling,
                f"{self.item_id}#{window.index}",
                [(AUDIO, window.tokens)],
                audio_frames=[window.frames],
            )
            yield request, Segment(window.index, 0, window.start_s, window.end_s)

    @property
    def detail(self) -> dict:
        return {
            "duration_s": self.clip.duration_s,
            "sample_rate": self.clip.sample_rate_in,
            "channels": self.clip.channels_in,
        }


def prepare_item(
    data: bytes,
    *,
    item_id: str,
    tokenizer,
    options: TaskOptions,
    name: str | None = None,
    limits: MediaSpec = MediaSpec(),
    sampling: SamplingParams = SamplingParams(),
    modality: str | None = None,
) -> PreparedItem:
    """Decode, tokenize and build the prompt(s) for one item. Raises ItemError subclasses on bad input."""
    label = name or item_id
    options.validate(label)
    modality = check_modality(options, modality or detect_modality(data, name), label)

    def request(suffix: str, media: list[tuple[str, int]], **arrays) -> PreparedRequest:
        return _request(tokenizer, options, sampling, item_id + suffix, media, **arrays)

    if modality == IMAGE:
        image = image_media.prepare_image(
            data, max_soft_tokens=limits.max_soft_tokens, item=label, max_pixels=limits.max_pixels
        )
        req = request("", [(IMAGE, image.tokens)], image_patches=[image.patches], image_positions=[image.positions])
        detail = {"size_decoded": list(image.decoded_size), "size": list(image.size), "grid": list(image.grid)}
        return PreparedItem(item_id, IMAGE, [req], [Segment()], detail)

    if modality == AUDIO:
        windows = AudioRequests(
            data, item_id=item_id, tokenizer=tokenizer, options=options, label=label, limits=limits, sampling=sampling
        )
        pairs = list(windows)
        count = len(pairs)
        requests = [req if count > 1 else replace(req, id=item_id) for req, _ in pairs]
        segments = [replace(segment, count=count) for _, segment in pairs]
        return PreparedItem(item_id, AUDIO, requests, segments, windows.detail)

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
    if options.task is Task.answer:
        return replace(options, question=f"{text}\n\n{options.question}")
    return replace(options, prompt=f"{text}\n\n{options.prompt}")
