"""Task -> chat messages -> token ids, and generated text -> the task's columns.

The chat template renders one placeholder per media item; placeholders are then expanded at the id level to
`begin + soft token x N + end`, which gives exactly the ids transformers' processor produces by expanding the
text and re-tokenizing (special tokens never merge with their neighbours), without tokenizing thousands of them.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np

from pipelines.errors import InvalidRequest

# mm_token_type_ids values used by Gemma4UnifiedForConditionalGeneration.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE, AUDIO_TYPE = 0, 1, 2, 3


class Task(str, Enum):
    caption = "caption"
    transcribe = "transcribe"
    translate = "translate"
    answer = "answer"
    prompt = "prompt"


@dataclass(frozen=True)
class TaskOptions:
    """What a task needs beyond its media. Unused fields are ignored by tasks that don't take them."""

    task: Task = Task.caption
    language: str | None = None  # transcribe: spoken language, if known
    source_language: str | None = None  # translate
    target_language: str | None = None  # translate
    question: str | None = None  # answer
    prompt: str | None = None  # prompt (free-form); for caption, replaces the default instruction
    system: str | None = None
    thinking: bool = False

    def validate(self, item: str | None = None) -> TaskOptions:
        if self.task is Task.translate and not (self.source_language and self.target_language):
            raise InvalidRequest("translate needs source_language and target_language", item=item)
        if self.task is Task.answer and not self.question:
            raise InvalidRequest("answer needs a question", item=item)
        if self.task is Task.prompt and not self.prompt:
            raise InvalidRequest("prompt needs a prompt text", item=item)
        return self


_ASR_FORMAT = (
    "Follow these specific instructions for formatting the answer:\n"
    "* Only output the transcription, with no newlines.\n"
    "* When transcribing numbers, write the digits, i.e. write 1.7 and not one point seven, "
    "and write 3 instead of three."
)


def instruction(options: TaskOptions) -> str:
    """The user's text for a task (Google's recommended wording for speech tasks)."""
    match options.task:
        case Task.caption:
            return options.prompt or "Write a one-sentence caption for this image."
        case Task.transcribe:
            if options.language:
                lang = options.language
                return f"Transcribe the following speech segment in {lang} into {lang} text.\n\n{_ASR_FORMAT}"
            return f"Transcribe the following speech segment in its original language.\n\n{_ASR_FORMAT}"
        case Task.translate:
            src, tgt = options.source_language, options.target_language
            return (
                f"Transcribe the following speech segment in {src}, then translate it into {tgt}.\n"
                f"When formatting the answer, first output the transcription in {src}, then one newline, "
                f"then output the string '{tgt}: ', then the translation in {tgt}."
            )
        case Task.answer:
            return options.question or ""
        case Task.prompt:
            return options.prompt or ""
    raise InvalidRequest(f"unknown task {options.task!r}")


def build_messages(options: TaskOptions, media: list[str]) -> list[dict]:
    """Chat messages: media parts ('image' / 'audio') first, then the task's instruction."""
    content = [{"type": kind} for kind in media]
    content.append({"type": "text", "text": instruction(options)})
    messages = [{"role": "user", "content": content}]
    if options.system:
        messages.insert(0, {"role": "system", "content": options.system})
    return messages


@dataclass(frozen=True)
class PromptTokens:
    ids: np.ndarray  # int32 [L]
    mm_token_type_ids: np.ndarray  # int8 [L]

    @property
    def image_tokens(self) -> int:
        return int((self.mm_token_type_ids == IMAGE_TYPE).sum())

    @property
    def audio_tokens(self) -> int:
        return int((self.mm_token_type_ids == AUDIO_TYPE).sum())


@dataclass(frozen=True)
class MediaMarkers:
    """Ids of the soft-token placeholders and their begin/end markers, read from the model's tokenizer."""

    image: int
    boi: int
    eoi: int
    audio: int
    boa: int
    eoa: int


@lru_cache(maxsize=8)
def media_markers(tokenizer) -> MediaMarkers:
    return MediaMarkers(
        image=tokenizer.image_token_id,
        boi=tokenizer.boi_token_id,
        eoi=tokenizer.eoi_token_id,
        audio=tokenizer.audio_token_id,
        boa=tokenizer.boa_token_id,
        eoa=tokenizer.eoa_token_id,
    )


def render(tokenizer, messages: list[dict], *, thinking: bool = False, continue_final: bool = False) -> str:
    """The chat as text, ending with the model's turn opened, or with the last (model) message left open to be
    continued."""
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
        enable_thinking=thinking,
    )


def _with_slots(messages: list[dict], nonce: str) -> tuple[list[dict], list[str]]:
    """Messages whose texts are replaced by numbered slots, and the texts in slot order."""
    texts: list[str] = []

    def slot(text: str) -> str:
        texts.append(text)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    slotted = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = slot(content)
        elif isinstance(content, list):
            content = [{**part, "text": slot(part["text"])} if part.get("type") == "text" else part for part in content]
        slotted.append({**message, "content": content})
    return slotted, texts


def text_ids(tokenizer, messages: list[dict], *, thinking: bool = False, continue_final: bool = False) -> list[int]:
    """Token ids of the rendered chat, where only the template's own markup can become special tokens.

    Message texts come from users, manifests and tools: a `<turn|>` or `<|image|>` inside them must stay text, or a
    user could forge a system or model turn. Each text is rendered as a slot, the template around the slots is
    tokenized with its special tokens, and each text with special tokens split into ordinary pieces.
    """
    nonce = uuid.uuid4().hex
    slotted, texts = _with_slots(messages, nonce)
    pieces = re.split(
        f"\ue000{nonce}:(\\d+)\ue001", render(tokenizer, slotted, thinking=thinking, continue_final=continue_final)
    )
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if index % 2:
            ids += tokenizer(texts[int(piece)], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def tokenize(
    tokenizer,
    messages: list[dict],
    media_tokens: list[int],
    *,
    thinking: bool = False,
    continue_final: bool = False,
) -> PromptTokens:
    """Render, tokenize (the template writes <bos> itself) and expand the i-th placeholder to media_tokens[i]."""
    ids = text_ids(tokenizer, messages, thinking=thinking, continue_final=continue_final)
    special = media_markers(tokenizer)
    out_ids: list[int] = []
    out_types: list[int] = []
    media = iter(media_tokens)
    for token in ids:
        if token == special.image:
            begin, body, end, kind = special.boi, special.image, special.eoi, IMAGE_TYPE
        elif token == special.audio:
            begin, body, end, kind = special.boa, special.audio, special.eoa, AUDIO_TYPE
        else:
            out_ids.append(token)
            out_types.append(TEXT_TYPE)
            continue
        count = next(media, None)
        if count is None:
            raise InvalidRequest("the prompt has more media placeholders than media items")
        out_ids += [begin] + [body] * count + [end]
        out_types += [TEXT_TYPE] + [kind] * count + [TEXT_TYPE]
    if next(media, None) is not None:
        raise InvalidRequest("more media items than placeholders in the prompt")
    return PromptTokens(np.asarray(out_ids, dtype=np.int32), np.asarray(out_types, dtype=np.int8))


def build_prompt(tokenizer, options: TaskOptions, media: list[tuple[str, int]]) -> PromptTokens:
    """Task options plus [(kind, soft tokens), ...] -> prompt ids with expanded placeholders."""
    messages = build_messages(options, [kind for kind, _ in media])
    return tokenize(tokenizer, messages, [count for _, count in media], thinking=options.thinking)


# ---- generated text -> columns ----

_THOUGHT = re.compile(r"<\|channel>.*?(<channel\|>|$)", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove `<|channel>thought ... <channel|>` blocks (and an unterminated one at the end)."""
    return _THOUGHT.sub("", text).strip()


def parse_translation(text: str, target_language: str) -> tuple[str, str]:
    """Split 'transcript\\n{TGT}: translation' into (transcript, translation); best effort otherwise."""
    marker = f"{target_language}:"
    lines = text.strip().splitlines()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].strip().startswith(marker):
            transcript = " ".join(line.strip() for line in lines[:index]).strip()
            translation = lines[index].strip()[len(marker) :].strip()
            rest = " ".join(line.strip() for line in lines[index + 1 :]).strip()
            return transcript, f"{translation} {rest}".strip()
    if len(lines) >= 2:
        return lines[0].strip(), " ".join(line.strip() for line in lines[1:]).strip()
    return text.strip(), ""
