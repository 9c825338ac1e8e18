"""The reference engine: transformers' Gemma4UnifiedForConditionalGeneration on CPU or GPU.

It consumes prepared rows directly (uint8 patches are rescaled on the device), batches requests of equal sampling
settings sorted by length to limit padding, and runs speculative decoding with the MTP assistant one request at a
time (transformers' assisted generation takes batch size 1). With `speculative: auto` a group of one request
speculates and a larger group is batched without the assistant; greedy output is the same either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from pipelines.config import EngineSpec
from pipelines.engines.base import GenerationResult, PreparedRequest, SamplingParams, StreamEnd, Watch, check_fits
from pipelines.errors import ModelSourceError
from pipelines.model_sources import ResolvedModel
from pipelines.prompts import strip_thinking

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@dataclass
class _SpecCounter:
    drafted: int = 0
    accepted: int = 0


class TransformersEngine:
    def __init__(self, model: ResolvedModel, engine: EngineSpec = EngineSpec()) -> None:
        import torch
        from transformers import AutoTokenizer, Gemma4UnifiedForConditionalGeneration

        from pipelines.engines import mtp_fix

        mtp_fix.apply()
        self.spec = engine
        self.model_name = model.name
        self.device = torch.device(
            "cuda"
            if engine.device == "auto" and torch.cuda.is_available()
            else ("cpu" if engine.device == "auto" else engine.device)
        )
        if engine.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, _DTYPES[engine.dtype])
        started = time.perf_counter()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model.path)
            self.model = (
                Gemma4UnifiedForConditionalGeneration.from_pretrained(
                    model.path, dtype=self.dtype, **self._quantization()
                )
                .to(self.device)
                .eval()
            )
            self.assistant = None
            logger.info("loaded %s on %s (%s)", model.path, self.device, str(self.dtype).removeprefix("torch."))
            if engine.speculates and model.assistant_path is not None:
                from transformers import Gemma4UnifiedAssistantForCausalLM

                self.assistant = (
                    Gemma4UnifiedAssistantForCausalLM.from_pretrained(model.assistant_path, dtype=self.dtype)
                    .to(self.device)
                    .eval()
                )
                # transformers reads the draft length from the assistant's generation config only.
                self.assistant.generation_config.num_assistant_tokens = engine.num_speculative_tokens
        except OSError as exc:
            raise ModelSourceError(f"cannot load {model.name!r} from {model.path}: {exc}") from None
        self.load_s = time.perf_counter() - started
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.convert_tokens_to_ids("<turn|>")}
        self.stop_ids.discard(None)
        self._channel_open = self.tokenizer.convert_tokens_to_ids("<|channel>")
        self._channel_close = self.tokenizer.convert_tokens_to_ids("<channel|>")
        self._special_ids = set(self.tokenizer.all_special_ids)
        self._lock = threading.Lock()  # one generate() at a time per replica

    def _quantization(self) -> dict:
        kind = self.spec.quantization
        if kind == "none":
            return {}
        if kind == "fp8":
            from transformers import FineGrainedFP8Config

            return {"quantization_config": FineGrainedFP8Config()}
        if kind in ("bnb-8bit", "bnb-4bit"):
            from transformers import BitsAndBytesConfig

            return {
                "quantization_config": BitsAndBytesConfig(
                    load_in_8bit=kind == "bnb-8bit", load_in_4bit=kind == "bnb-4bit"
                )
            }
        return {}  # compressed-tensors: the checkpoint's own config says how to load it

    # ---- batch generation ----

    def generate(
        self, requests: list[PreparedRequest], watches: list[Watch | None] | None = None
    ) -> list[GenerationResult]:
        """Results in request order. Each watch's request stops at the next step once cancelled, and a streaming
        watch receives that request's new token ids at every step."""
        results: dict[int, GenerationResult] = {}
        for request in requests:
            check_fits(request, self.spec.max_model_len)
        watched = list(zip(requests, watches or [None] * len(requests), strict=True))
        order = sorted(
            range(len(requests)), key=lambda i: (_sampling_key(requests[i].sampling), requests[i].prompt_tokens)
        )
        with self._lock:
            for _, group in groupby(order, key=lambda i: _sampling_key(requests[i].sampling)):
                group = list(group)
                speculative = self.speculates(len(group))
                size = 1 if speculative else self.spec.max_batch_size
                for start in range(0, len(group), size):
                    chunk = group[start : start + size]
                    batch = [watched[i] for i in chunk]
                    for index, result in zip(chunk, self._generate_batch(batch, speculative)):
                        results[index] = result
        return [results[i] for i in range(len(requests))]

    def speculates(self, waiting: int) -> bool:
        """Whether `waiting` requests of one sampling setting run speculatively (one at a time) or as a batch."""
        if self.assistant is None:
            return False
        return self.spec.speculative == "on" or waiting == 1

    def _generation_kwargs(self, sampling: SamplingParams, inputs: dict) -> dict:
        """`generate` arguments for one sampling setting, the same for batches and streams (stop strings apart)."""
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.stop_ids),
        )
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        if sampling.penalized:
            from transformers import LogitsProcessorList

            from pipelines.engines.penalties import CountPenalties

            penalties = CountPenalties(
                inputs["input_ids"].shape[1], sampling.frequency_penalty, sampling.presence_penalty
            )
            kwargs.update(logits_processor=LogitsProcessorList([penalties]))
        if sampling.logit_bias:
            kwargs.update(sequence_bias={(token,): bias for token, bias in sampling.logit_bias})
        return kwargs

    def _generate_batch(
        self, watched: list[tuple[PreparedRequest, Watch | None]], speculative: bool
    ) -> list[GenerationResult]:
        import torch
        from transformers import StoppingCriteriaList

        batch = [request for request, _ in watched]
        watches = [watch for _, watch in watched]
        sampling = batch[0].sampling
        inputs = self._collate(batch)
        kwargs = self._generation_kwargs(sampling, inputs)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        if any(watches):
            kwargs.update(stopping_criteria=StoppingCriteriaList([_RowsCancelled(watches)]))
        if any(watch is not None and watch.streams for watch in watches):
            kwargs.update(streamer=_RowsSink(watches))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        counter = _SpecCounter()
        started = time.perf_counter()
        with torch.inference_mode():
            if speculative:
                with _count_speculation(self.model, counter):
                    output = self.model.generate(**inputs, **kwargs, assistant_model=self.assistant)
            else:
                output = self.model.generate(**inputs, **kwargs)
        latency = time.perf_counter() - started
        prompt_length = inputs["input_ids"].shape[1]
        results = []
        for row, request in enumerate(batch):
            new_ids = output[row, prompt_length:].tolist()
            results.append(self._result(request, new_ids, latency, counter if speculative else None))
        return results

    def _collate(self, batch: list[PreparedRequest]) -> dict:
        """Left-pad prompts; stack all images (and audio clips) of the batch in prompt order, padded."""
        import torch

        length = max(r.prompt_tokens for r in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        types = torch.zeros((len(batch), length), dtype=torch.long)
        for row, request in enumerate(batch):
            n = request.prompt_tokens
            input_ids[row, length - n :] = torch.from_numpy(request.prompt_token_ids.astype(np.int64))
            types[row, length - n :] = torch.from_numpy(request.mm_token_type_ids.astype(np.int64))
            attention[row, length - n :] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": types}
        patches = [p for r in batch for p in r.image_patches]
        if patches:
            most = max(p.shape[0] for p in patches)
            pixels = torch.zeros((len(patches), most, patches[0].shape[1]), dtype=torch.uint8)
            positions = torch.full((len(patches), most, 2), -1, dtype=torch.long)
            for index, (p, pos) in enumerate(zip(patches, [q for r in batch for q in r.image_positions])):
                pixels[index, : p.shape[0]] = torch.from_numpy(p)
                positions[index, : p.shape[0]] = torch.from_numpy(pos.astype(np.int64))
            # uint8 crosses to the device; the rescale to [0, 1] happens there, as the processor computes it.
            inputs["pixel_values"] = pixels.to(self.device) * (1 / 255)
            inputs["image_position_ids"] = positions
        frames = [f for r in batch for f in r.audio_frames]
        if frames:
            most = max(f.shape[0] for f in frames)
            features = torch.zeros((len(frames), most, frames[0].shape[1]), dtype=torch.float32)
            mask = torch.zeros((len(frames), most), dtype=torch.bool)
            for index, f in enumerate(frames):
                features[index, : f.shape[0]] = torch.from_numpy(f)
                mask[index, : f.shape[0]] = True
            inputs["input_features"] = features
            inputs["input_features_mask"] = mask
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _result(self, request: PreparedRequest, new_ids: list[int], latency: float, counter) -> GenerationResult:
        # Rows that finished early are padded after their stop token; everything from the stop token on goes.
        generated, finish, output_tokens = new_ids, "length", len(new_ids)
        for index, token in enumerate(new_ids):
            if token in self.stop_ids:
                generated, finish, output_tokens = new_ids[:index], "stop", index + 1
                break
        text = self.decode(generated)
        if request.sampling.stop:
            for stop in request.sampling.stop:
                if stop in text:
                    text, finish = text[: text.index(stop)], "stop"
        return GenerationResult(
            id=request.id,
            text=text,
            finish_reason=finish,
            prompt_tokens=request.prompt_tokens,
            image_tokens=request.image_tokens,
            audio_tokens=request.audio_tokens,
            output_tokens=output_tokens,
            latency_s=latency,
            output_token_ids=generated,
            spec_drafted=counter.drafted if counter else None,
            spec_accepted=counter.accepted if counter else None,
        )

    def decode(self, ids: list[int]) -> str:
        """Text without thinking blocks and without special tokens."""
        kept, thinking = [], False
        for token in ids:
            if token == self._channel_open:
                thinking = True
            elif token == self._channel_close:
                thinking = False
            elif not thinking and token not in self._special_ids:
                kept.append(token)
        return strip_thinking(self.tokenizer.decode(kept, skip_special_tokens=True))

    # ---- streaming ----

    async def stream(self, request: PreparedRequest) -> AsyncIterator[str | StreamEnd]:
        """This request alone, streamed (`follow` on a generation of its own). The replica runtime streams through
        its scheduler instead, so that concurrent streams share engine batches."""
        watch = Watch.streaming()

        def run() -> None:
            try:
                watch.put(self.generate([request], [watch])[0])
            except BaseException as exc:  # handed to the reader, which raises it
                watch.put(exc)

        check_fits(request, self.spec.max_model_len)
        threading.Thread(target=run, daemon=True, name=f"stream-{request.id}").start()
        async with aclosing(self.follow(request, watch)) as items:
            async for item in items:
                yield item

    async def follow(self, request: PreparedRequest, watch: Watch) -> AsyncIterator[str | StreamEnd]:
        """Text deltas from a streaming watch's token ids (thinking blocks hidden, stop strings honoured), then a
        StreamEnd with the engine's own token count. Leaving early (a stop string, a client that left) cancels the
        request, which stops its generation within one decoding step and frees its place in the batch."""
        from pipelines.engines.vllm_inputs import TextStream

        sampling = request.sampling
        decoder = TextStream(self.tokenizer, sampling.stop)
        produced, finish = 0, "length"
        try:
            while True:
                item = await watch.items.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationResult):  # the generation ended before its end showed in the stream
                    produced, finish = item.output_tokens, item.finish_reason
                    break
                visible = []
                for token in item:
                    produced += 1
                    if token in self.stop_ids:
                        finish = "stop"
                        break
                    visible.append(token)
                delta = decoder.push(visible)
                if delta:
                    yield delta
                if finish == "stop" or decoder.stopped or produced >= sampling.max_new_tokens:
                    break
            tail = decoder.push([], final=True)
            if tail:
                yield tail
            yield StreamEnd("stop" if decoder.stopped else finish, produced)
        finally:
            watch.cancel()  # the generation stops at its next step, whoever ended the stream

    def health(self) -> bool:
        return self.model is not None

    def close(self) -> None:
        self.model = None
        self.assistant = None


def _sampling_key(sampling: SamplingParams) -> tuple:
    return (
        sampling.max_new_tokens,
        sampling.temperature,
        sampling.top_p,
        sampling.top_k,
        sampling.seed,
        sampling.stop,
        sampling.frequency_penalty,
        sampling.presence_penalty,
        sampling.logit_bias,
    )


class _RowsSink:
    """A transformers streamer handing each row's new token ids to its streaming watch (the prompt, sent first, is
    skipped). A step's value is one token per row, or [1, n] accepted tokens under speculative decoding."""

    def __init__(self, watches: list[Watch | None]) -> None:
        self.watches = watches
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        rows = value.reshape(len(self.watches), -1).tolist()
        for watch, ids in zip(self.watches, rows):
            if watch is not None and watch.streams and not watch.cancelled.is_set():
                watch.put([int(t) for t in ids])

    def end(self) -> None:
        pass


class _RowsCancelled:
    """A stopping criterion: True for each row whose watch was cancelled, so that row ends at this step."""

    def __init__(self, watches: list[Watch | None]) -> None:
        self.events = [watch.cancelled if watch is not None else None for watch in watches]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        flags = [event is not None and event.is_set() for event in self.events]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


@contextmanager
def _count_speculation(model, counter: _SpecCounter):
    """Count drafted and accepted tokens by wrapping the candidate generator transformers builds per call."""
    build = model._get_candidate_generator

    def counting(*args, **kwargs):
        generator = build(*args, **kwargs)
        get_candidates, update = generator.get_candidates, generator.update_candidate_strategy

        def counted_get(input_ids, *a, **k):
            candidates, logits = get_candidates(input_ids, *a, **k)
            counter.drafted += candidates.shape[1] - input_ids.shape[1]
            return candidates, logits

        def counted_update(input_ids, scores, n_matches):
            counter.accepted += int(n_matches)
            return update(input_ids, scores, n_matches)

        generator.get_candidates, generator.update_candidate_strategy = counted_get, counted_update
        return generator

    model._get_candidate_generator = counting
    try:
        yield
    finally:
        del model._get_candidate_generator
