"""The reference engine: transformers' Gemma4UnifiedForConditionalGeneration on CPU or GPU.

It consumes prepared rows directly (uint8 patches are rescaled on the device), batches requests of equal sampling
settings sorted by length to limit padding, and runs speculative decoding with the MTP assistant one request at a
time (transformers' assisted generation takes batch size 1). With `speculative: auto` a group of one request
speculates and a larger group is batched without the assistant; greedy output is the same either way.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby

import numpy as np

from pipelines.config import EngineSpec
from pipelines.engines.base import GenerationResult, PreparedRequest, SamplingParams, StreamEnd, check_fits
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

    def generate(self, requests: list[PreparedRequest]) -> list[GenerationResult]:
        results: dict[str, GenerationResult] = {}
        for request in requests:
            check_fits(request, self.spec.max_model_len)
        ordered = sorted(requests, key=lambda r: (_sampling_key(r.sampling), r.prompt_tokens))
        with self._lock:
            for _, group in groupby(ordered, key=lambda r: _sampling_key(r.sampling)):
                group = list(group)
                speculative = self.speculates(len(group))
                size = 1 if speculative else self.spec.max_batch_size
                for start in range(0, len(group), size):
                    for result in self._generate_batch(group[start : start + size], speculative):
                        results[result.id] = result
        return [results[r.id] for r in requests]

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

    def _generate_batch(self, batch: list[PreparedRequest], speculative: bool) -> list[GenerationResult]:
        import torch

        sampling = batch[0].sampling
        inputs = self._collate(batch)
        kwargs = self._generation_kwargs(sampling, inputs)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
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
        """Text deltas as tokens are generated (thinking blocks hidden, stop strings honoured), then a StreamEnd with
        the engine's own token count. Closing the stream early (a stop string, a client that left) stops the
        generation within one decoding step, which frees the engine for the next request."""
        import queue

        import torch
        from transformers import StoppingCriteriaList

        from pipelines.engines.vllm_inputs import TextStream

        check_fits(request, self.spec.max_model_len)
        sampling = request.sampling
        inputs = self._collate([request])
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        cancelled = threading.Event()
        kwargs = self._generation_kwargs(sampling, inputs)
        kwargs.update(streamer=_TokenSink(tokens), stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]))

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    self.model.generate(**inputs, **kwargs)
            except BaseException as exc:  # handed to the consumer, which raises it
                tokens.put(exc)
            finally:
                tokens.put(None)

        threading.Thread(target=run, daemon=True, name=f"stream-{request.id}").start()
        decoder = TextStream(self.tokenizer, sampling.stop)
        produced, finish = 0, "length"
        try:
            while True:
                new_ids = await asyncio.to_thread(tokens.get)
                if new_ids is None:
                    break
                if isinstance(new_ids, BaseException):
                    raise new_ids
                visible = []
                for token in new_ids:
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
            cancelled.set()  # the generation stops at its next step, whoever ended the stream

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


class _TokenSink:
    """A transformers streamer that hands each step's new token ids to a queue (the prompt, sent first, is skipped)."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.sink.put([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion fed by the stream's cancel state: True for every row once the stream has ended."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
