"""OpenAI chat completions without HTTP: a chat request -> one PreparedRequest (media fetched, decoded and tokenized
on this CPU), and a generation result -> the chat.completion object.

The endpoint prepares each request with this, and a batch job each line of an OpenAI batch file, so the same request
gets the same refusals, the same prompt and the same answer object either way.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from pipelines.chat.media_sources import MediaFetcher, decode_base64
from pipelines.chat.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ImagePart,
    TextPart,
    Usage,
    completion_id,
    now,
)
from pipelines.config import ChatSpec, MediaSpec
from pipelines.engines.base import GenerationResult, PreparedRequest, SamplingParams
from pipelines.errors import InvalidRequest, ItemError, LimitExceeded, RefusedRequest
from pipelines.media import audio as audio_media
from pipelines.media import image as image_media
from pipelines.prompts import tokenize

LOW_DETAIL_SOFT_TOKENS = 70
# Request fields accepted only at their neutral value (see ChatCompletionRequest).
_NEUTRAL_ONLY = (
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "verbosity",
    "moderation",
    "store",
    "ignore_eos",
)


@dataclass
class _Media:
    kind: str  # "image" or "audio"
    param: str  # where it sits in the request, for error messages
    source: str  # image: its URL; audio: its base64 text
    soft_tokens: int = image_media.DEFAULT_SOFT_TOKENS
    data: bytes = b""


def _at(error: ItemError, param: str) -> ItemError:
    """The error naming where in the request it sits (kept when a deeper layer already named it)."""
    if getattr(error, "param", None) is None:
        error.param = param
    return error


class ChatPreparer:
    def __init__(
        self,
        chat: ChatSpec,
        media: MediaSpec,
        *,
        model_id: str,
        max_model_len: int,
        tokenizer,
        fetcher: MediaFetcher,
    ) -> None:
        self.chat = chat
        self.media = media
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.fetcher = fetcher

    # ---- request -> prepared request ----

    def check(self, body: ChatCompletionRequest) -> None:
        """Refusals that need no decoding: model name, unsupported options, counts, output tokens."""
        if body.model != self.model_id:
            raise RefusedRequest(
                f"the model {body.model!r} does not exist; this endpoint serves {self.model_id!r}",
                param="model",
                code="model_not_found",
                status=404,
            )
        for name in _NEUTRAL_ONLY:
            value = getattr(body, name)
            if not (value in (None, False, [], {}, "none") or (name == "modalities" and value == ["text"])):
                raise RefusedRequest(f"{name} is not supported by this endpoint", param=name, code="unsupported")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise RefusedRequest("only text responses are supported", param="response_format", code="unsupported")
        vocabulary = len(self.tokenizer)
        for token in body.logit_bias or {}:
            if int(token) >= vocabulary:
                raise RefusedRequest(
                    f"logit_bias names token {token}; this model's ids end at {vocabulary - 1}",
                    param="logit_bias",
                    code="invalid_value",
                )
        limits = self.chat.limits
        if len(body.messages) > limits.max_messages:
            raise RefusedRequest(f"at most {limits.max_messages} messages per request", param="messages")
        images = sum(isinstance(p, ImagePart) for m in body.messages if isinstance(m.content, list) for p in m.content)
        audios = sum(p.type == "input_audio" for m in body.messages if isinstance(m.content, list) for p in m.content)
        if images > limits.max_images_per_request:
            raise RefusedRequest(
                f"{images} images in one request; the limit is {limits.max_images_per_request}",
                param="messages",
                code="too_many_images",
            )
        if audios > limits.max_audio_per_request:
            raise RefusedRequest(
                f"{audios} audio clips in one request; the limit is {limits.max_audio_per_request}",
                param="messages",
                code="too_many_audio_clips",
            )
        wanted = body.output_tokens
        if wanted is not None and wanted > limits.max_output_tokens:
            raise RefusedRequest(
                f"max_tokens {wanted} is over this endpoint's limit of {limits.max_output_tokens}",
                param="max_tokens",
                code="max_tokens_too_large",
            )

    def sampling(self, body: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        limits, defaults = self.chat.limits, self.chat.sampling
        room = self.max_model_len - prompt_tokens  # what the context leaves, as OpenAI and vLLM default
        temperature = defaults.temperature if body.temperature is None else body.temperature
        top_p = defaults.top_p if body.top_p is None else body.top_p
        if top_p == 0:  # only the likeliest token is left: greedy (engines refuse a top_p of 0 itself)
            temperature, top_p = 0.0, 1.0
        return SamplingParams(
            max_new_tokens=body.output_tokens
            or min(limits.default_output_tokens or room, limits.max_output_tokens, max(room, 1)),
            temperature=temperature,
            top_p=top_p,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            # OpenAI takes any int64 seed; the engines' generators take unsigned 64-bit ones.
            seed=None if body.seed is None else body.seed % 2**64,
            stop=body.stop_list,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in (body.logit_bias or {}).items())),
        )

    async def prepare(self, body: ChatCompletionRequest) -> PreparedRequest:
        self.check(body)
        messages, media = self._template_messages(body)
        for item, data in zip(media, await asyncio.gather(*(self._media_bytes(item) for item in media))):
            item.data = data
        # Decoding and resizing images is CPU work: off the event loop, so other requests keep flowing.
        return await asyncio.to_thread(self._tokenize, body, messages, media)

    def _template_messages(self, body: ChatCompletionRequest) -> tuple[list[dict], list[_Media]]:
        """OpenAI messages -> the chat template's (system first, media parts as placeholders) plus media in order."""
        system: list[str] = []
        turns: list[dict] = []
        media: list[_Media] = []
        for index, message in enumerate(body.messages):
            role = "system" if message.role in ("system", "developer") else message.role
            parts = (
                [TextPart(type="text", text=message.content)]
                if isinstance(message.content, str)
                else (message.content or [])
            )
            if role == "system":
                if any(not isinstance(p, TextPart) for p in parts):
                    raise RefusedRequest("system messages take text only", param=f"messages.{index}.content")
                system.append("".join(p.text for p in parts))
                continue
            content = []
            for number, part in enumerate(parts):
                param = f"messages.{index}.content.{number}"
                if isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
                elif role == "assistant":
                    raise RefusedRequest("assistant messages take text only", param=param)
                elif isinstance(part, ImagePart):
                    budget = self.media.max_soft_tokens
                    if part.image_url.detail == "low":
                        budget = min(budget, LOW_DETAIL_SOFT_TOKENS)
                    media.append(_Media("image", param, part.image_url.url, budget))
                    content.append({"type": "image"})
                else:
                    media.append(_Media("audio", param, part.input_audio.data))
                    content.append({"type": "audio"})
            turns.append({"role": role, "content": content})
        if not turns:
            raise RefusedRequest("the conversation needs a user or assistant message", param="messages")
        if turns[-1]["role"] == "assistant" and not any(p["type"] == "text" for p in turns[-1]["content"]):
            turns[-1]["content"].append({"type": "text", "text": ""})  # continue an empty answer
        if system:
            turns.insert(0, {"role": "system", "content": "\n\n".join(system)})
        return turns, media

    async def _media_bytes(self, item: _Media) -> bytes:
        try:
            if item.kind == "image":
                return await self.fetcher.fetch(item.source)
            return decode_base64(item.source, what="input_audio.data", max_bytes=self.chat.limits.max_body_bytes)
        except ItemError as exc:
            raise _at(exc, item.param) from None

    def _tokenize(self, body: ChatCompletionRequest, messages: list[dict], media: list[_Media]) -> PreparedRequest:
        patches, positions, frames, counts = [], [], [], []
        for item in media:
            try:
                if item.kind == "image":
                    image = image_media.prepare_image(
                        item.data,
                        max_soft_tokens=item.soft_tokens,
                        item=item.param,
                        max_pixels=self.media.max_pixels,
                    )
                    patches.append(image.patches)
                    positions.append(image.positions)
                    counts.append(image.tokens)
                else:
                    (window,) = self._audio_window(item)
                    frames.append(window.frames)
                    counts.append(window.tokens)
            except ItemError as exc:
                raise _at(exc, item.param) from None
        try:
            # A conversation that ends with the model's message asks for that message to be continued.
            prompt = tokenize(
                self.tokenizer,
                messages,
                counts,
                thinking=body.thinking,
                continue_final=messages[-1]["role"] == "assistant",
            )
        except InvalidRequest as exc:
            raise _at(exc, "messages") from None
        sampling = self.sampling(body, len(prompt.ids))
        total = len(prompt.ids) + sampling.max_new_tokens
        if total > self.max_model_len:
            raise RefusedRequest(
                f"the prompt ({len(prompt.ids)} tokens) plus max_tokens ({sampling.max_new_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        return PreparedRequest(
            id=f"chat-{uuid.uuid4().hex[:12]}",
            prompt_token_ids=prompt.ids,
            mm_token_type_ids=prompt.mm_token_type_ids,
            image_patches=patches,
            image_positions=positions,
            audio_frames=frames,
            sampling=sampling,
        )

    def _audio_window(self, item: _Media):
        # One clip in a chat turn is one model input, which takes 30 s at most; longer audio goes to
        # /v1/audio/transcriptions, which windows it.
        limit = min(self.media.max_audio_s, audio_media.MAX_WINDOW_S)
        clip = audio_media.prepare_audio(item.data, item=item.param, max_duration_s=limit)
        if len(clip.windows) != 1:
            raise LimitExceeded(f"audio in a chat message is limited to {limit:g} s", item=item.param)
        return clip.windows

    # ---- result -> answer ----

    def completion(self, result: GenerationResult) -> ChatCompletion:
        return chat_completion(
            self.model_id, result.text, result.finish_reason, result.prompt_tokens, result.output_tokens
        )


def chat_completion(
    model_id: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    output_tokens: int,
    *,
    ident: str | None = None,
    created: int | None = None,
) -> ChatCompletion:
    """The chat.completion object for one generated answer (the endpoint's reply, a batch output line's body)."""
    return ChatCompletion(
        id=ident or completion_id(),
        created=now() if created is None else created,
        model=model_id,
        choices=[Choice(message=AssistantMessage(content=text), finish_reason=finish_reason)],
        usage=usage(prompt_tokens, output_tokens),
    )


def usage(prompt_tokens: int, output_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=output_tokens, total_tokens=prompt_tokens + output_tokens
    )
