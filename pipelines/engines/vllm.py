"""The vLLM engine (GPU only, the `vllm` extra): prepared rows in, the same GenerationResult as the reference engine.

Two modes over one replica's GPU: `online=False` holds a `vllm.LLM` (`generate()` hands a whole batch to vLLM's
scheduler); `online=True` holds an `AsyncLLM` on a private event loop thread, so `agenerate()`, `generate()` and
`stream()` can be called from any thread or loop. The replica runtime (pipelines/replica.py) opens the online mode
for batch jobs and the endpoint alike and hands it every request as it arrives. Text is decoded from the token ids
exactly as the transformers engine does (no thinking blocks, no special tokens).

A completion that ends with finish_reason "error" (vLLM's retryable internal failure) is run once more; if it fails
again it is a GenerationFailed (an error row in batch jobs, a 5xx online), never returned as text.

Speculative decoding statistics: vLLM keeps draft/accept counts only as engine-wide counters
(`vllm:spec_decode_num_draft_tokens`, `vllm:spec_decode_num_accepted_tokens`), not per request. A result carries
them when they can be attributed to it (offline mode, a batch of one request); `speculation()` gives the totals.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

from pipelines.config import EngineSpec
from pipelines.engines.base import GenerationResult, PreparedRequest, StreamEnd, Watch, check_fits
from pipelines.engines.vllm_inputs import (
    VLLM_EXTRA,
    TextStream,
    engine_kwargs,
    output_text,
    stop_token_ids,
    to_vllm_prompt,
    to_vllm_sampling_kwargs,
)
from pipelines.errors import GenerationFailed, ItemError, ModelSourceError
from pipelines.model_sources import ResolvedModel

log = logging.getLogger(__name__)

_DRAFTED = "vllm:spec_decode_num_draft_tokens"
_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"


class VLLMEngine:
    def __init__(
        self,
        model: ResolvedModel,
        engine: EngineSpec = EngineSpec(),
        *,
        max_soft_tokens: int | None = None,
        online: bool = False,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise ModelSourceError(VLLM_EXTRA) from None
        if engine.device == "cpu":
            raise ModelSourceError("the vllm engine runs on CUDA GPUs only; use engine.kind=transformers on CPU")
        from transformers import AutoTokenizer

        self.spec = engine
        self.model_name = model.name
        self.max_soft_tokens = max_soft_tokens
        self.online = online
        self.speculative = engine.speculates and model.assistant_path is not None
        kwargs = engine_kwargs(engine, model.path, model.assistant_path, max_soft_tokens=max_soft_tokens)
        started = time.perf_counter()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        except OSError as exc:
            raise ModelSourceError(f"cannot load the tokenizer of {model.name!r} from {model.path}: {exc}") from None
        self.stop_ids = stop_token_ids(self.tokenizer)
        self._vllm = vllm
        self._llm = None
        self._async = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if online:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            # AsyncLLM binds its output task to the running loop (at construction, or at the first request):
            # give it a loop of its own, so callers on any thread or loop can use it.
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
            self._thread.start()

            async def start():
                return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

            self._async = self._submit(start()).result()
        else:
            self._llm = vllm.LLM(**kwargs)
        self.load_s = time.perf_counter() - started
        self._lock = threading.Lock()  # offline: one LLM.generate() at a time (it is not re-entrant)

    # ---- inputs ----

    def _inputs(self, request: PreparedRequest, **extra) -> tuple[dict, object]:
        check_fits(request, self.spec.max_model_len)
        prompt = to_vllm_prompt(request, self.tokenizer, self.max_soft_tokens)
        params = self._vllm.SamplingParams(**to_vllm_sampling_kwargs(request.sampling, self.stop_ids), **extra)
        return prompt, params

    # ---- batch generation ----

    def generate(
        self, requests: list[PreparedRequest], watches: list[Watch | None] | None = None
    ) -> list[GenerationResult]:
        """Watches are not needed here: online, a caller that gives up cancels `agenerate`, which aborts its request
        in vLLM (and frees its place in vLLM's batch at once); offline, a batch runs to its end."""
        if not requests:
            return []
        inputs = [self._inputs(r) for r in requests]
        if self.online:
            futures = [self._submit(self._final(prompt, params, r.id)) for r, (prompt, params) in zip(requests, inputs)]
            return [self._result(r, *future.result(), None) for r, future in zip(requests, futures)]
        with self._lock:
            before = self.speculation()
            started = time.perf_counter()
            outputs = self._llm.generate([p for p, _ in inputs], [s for _, s in inputs], use_tqdm=False)
            failed = [i for i, output in enumerate(outputs) if _failed(output)]
            if failed:
                log.warning("vLLM failed %d of %d requests; running them once more", len(failed), len(requests))
                again = self._llm.generate(
                    [inputs[i][0] for i in failed], [inputs[i][1] for i in failed], use_tqdm=False
                )
                for i, output in zip(failed, again):
                    outputs[i] = output
            latency = time.perf_counter() - started
            after = self.speculation()
        # The counters are engine-wide: only a batch of one can own the difference.
        spec = None
        if len(requests) == 1 and before is not None and after is not None:
            spec = (after[0] - before[0], after[1] - before[1])
        return [self._result(r, out, latency, spec) for r, out in zip(requests, outputs)]

    async def agenerate(self, request: PreparedRequest) -> GenerationResult:
        """One request straight into the engine (online mode): vLLM's scheduler batches it with whatever runs."""
        if not self.online:
            return (await asyncio.to_thread(self.generate, [request]))[0]
        prompt, params = self._inputs(request)
        output, latency = await asyncio.wrap_future(self._submit(self._final(prompt, params, request.id)))
        return self._result(request, output, latency, None)

    async def _final(self, prompt: dict, params, request_id: str):
        started = time.perf_counter()
        for attempt in range(2):
            last = None
            async for output in self._async.generate(prompt, params, f"{request_id}-{uuid.uuid4().hex[:8]}"):
                last = output
            if not _failed(last):
                break
            if attempt == 0:
                log.warning("vLLM failed request %s; running it once more", request_id)
        return last, time.perf_counter() - started

    def _submit(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _result(self, request: PreparedRequest, output, latency: float, spec) -> GenerationResult:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        if completion.finish_reason == "abort":
            raise ItemError("vLLM aborted the request", item=request.id, stage="generate")
        if completion.finish_reason == "error":
            raise GenerationFailed(
                "vLLM failed this request twice (finish_reason 'error')", item=request.id, stage="generate"
            )
        finish = "length" if completion.finish_reason == "length" else "stop"
        # vLLM keeps the stop token in token_ids (an int stop_reason, or None for end of sequence);
        # as in the transformers engine it counts as output but is not part of the returned ids.
        generated = ids
        if finish == "stop" and ids and not isinstance(completion.stop_reason, str) and ids[-1] in self.stop_ids:
            generated = ids[:-1]
        text, _ = output_text(self.tokenizer, generated, request.sampling.stop)
        prompt_ids = getattr(output, "prompt_token_ids", None)
        return GenerationResult(
            id=request.id,
            text=text,
            finish_reason=finish,
            prompt_tokens=len(prompt_ids) if prompt_ids is not None else request.prompt_tokens,
            image_tokens=request.image_tokens,
            audio_tokens=request.audio_tokens,
            output_tokens=len(ids),
            latency_s=latency,
            output_token_ids=generated,
            spec_drafted=spec[0] if spec else None,
            spec_accepted=spec[1] if spec else None,
        )

    def speculation(self) -> tuple[int, int] | None:
        """Engine-wide (drafted, accepted) token totals so far; None without speculative decoding."""
        if not self.speculative:
            return None
        try:
            if self._llm is not None:
                metrics = self._llm.get_metrics()
            else:
                from vllm.v1.metrics.reader import get_metrics_snapshot

                metrics = get_metrics_snapshot()
        except Exception:  # metrics are best effort: an older vLLM or disabled stats
            return None
        totals = {_DRAFTED: 0, _ACCEPTED: 0}
        for metric in metrics:
            if metric.name in totals:
                totals[metric.name] += int(getattr(metric, "value", 0))
        return totals[_DRAFTED], totals[_ACCEPTED]

    # ---- streaming ----

    async def stream(self, request: PreparedRequest) -> AsyncIterator[str]:
        """Text deltas as they are generated. An offline engine has no incremental path: it yields the whole text."""
        if not self.online:
            result = (await asyncio.to_thread(self.generate, [request]))[0]
            if result.text:
                yield result.text
            yield StreamEnd(result.finish_reason, result.output_tokens)
            return
        from vllm.sampling_params import RequestOutputKind

        prompt, params = self._inputs(request, output_kind=RequestOutputKind.DELTA)
        for attempt in range(2):
            outputs = self._async.generate(prompt, params, f"{request.id}-{uuid.uuid4().hex[:8]}")
            decoder = TextStream(self.tokenizer, request.sampling.stop)
            sent = retry = False
            produced, finish = 0, "length"
            try:
                while True:
                    output = await asyncio.wrap_future(self._submit(_next(outputs)))
                    if output is None:
                        break
                    if _failed(output):
                        # Nothing sent yet: run it once more; otherwise the client already has part of a text.
                        if attempt == 0 and not sent:
                            log.warning("vLLM failed request %s; running it once more", request.id)
                            retry = True
                            break
                        raise GenerationFailed(
                            "vLLM failed this request (finish_reason 'error')", item=request.id, stage="generate"
                        )
                    completion = output.outputs[0]
                    produced += len(completion.token_ids)
                    delta = decoder.push(completion.token_ids, final=output.finished)
                    if delta:
                        sent = True
                        yield delta
                    if output.finished or decoder.stopped:
                        finish = "stop" if decoder.stopped or completion.finish_reason == "stop" else "length"
                        break
            finally:
                # Closing the generator on its own loop aborts the request in vLLM if it is still running.
                await asyncio.wrap_future(self._submit(_close(outputs)))
            if not retry:
                yield StreamEnd(finish, produced)
                return

    # ---- lifecycle ----

    def health(self) -> bool:
        if self._async is not None:
            return not getattr(self._async, "errored", False)
        return self._llm is not None

    def close(self) -> None:
        if self._async is not None:
            self._async.shutdown()
            self._async = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = None
        if self._llm is not None:
            engine_core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
            if engine_core is not None and hasattr(engine_core, "shutdown"):
                engine_core.shutdown()
            self._llm = None


def _failed(output) -> bool:
    return output is not None and output.outputs[0].finish_reason == "error"


async def _close(outputs) -> None:
    await outputs.aclose()


async def _next(outputs):
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        return None
