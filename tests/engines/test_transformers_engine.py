"""The transformers engine on the tiny model: parity with transformers' own path, lossless speculation, batching."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from pipelines.engines.base import SamplingParams
from pipelines.errors import InvalidRequest
from pipelines.prepare import prepare_item
from pipelines.prompts import Task, TaskOptions, build_messages, render

GREEDY = SamplingParams(max_new_tokens=12)


def _requests(tokenizer, data, options, sampling=GREEDY, item_id="x", name="note.txt"):
    return prepare_item(
        data, item_id=item_id, name=name, tokenizer=tokenizer, options=options, sampling=sampling
    ).requests


def _text_bytes(text: str) -> bytes:
    return text.encode()


@pytest.fixture(scope="module")
def cases(tokenizer, png_bytes, wav_bytes):
    return {
        "text": (
            _text_bytes("A short note about foxes."),
            TaskOptions(task=Task.prompt, prompt="Summarise."),
            "doc.txt",
        ),
        "image": (png_bytes, TaskOptions(task=Task.caption), "a.png"),
        "audio": (wav_bytes, TaskOptions(task=Task.transcribe, language="English"), "a.wav"),
    }


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_greedy_output_equals_model_generate_on_the_processors_inputs(
    plain_engine, hf_processor, tokenizer, cases, kind
):
    data, options, name = cases[kind]
    (request,) = prepare_item(
        data, item_id=kind, name=name, tokenizer=tokenizer, options=options, sampling=GREEDY
    ).requests
    ours = plain_engine.generate([request])[0]

    text = render(tokenizer, build_messages(options, [kind]))
    if kind == "image":
        inputs = hf_processor(
            text=text, images=[Image.open(io.BytesIO(data))], add_special_tokens=False, return_tensors="pt"
        )
    else:
        wave, _ = sf.read(io.BytesIO(data), dtype="float32")
        inputs = hf_processor(text=text, audio=[wave], add_special_tokens=False, return_tensors="pt")
    inputs.pop("num_soft_tokens_per_image", None)
    with torch.inference_mode():
        reference = plain_engine.model.generate(
            **inputs,
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(plain_engine.stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
    expected = reference[0, inputs["input_ids"].shape[1] :].tolist()
    cut = next((i for i, t in enumerate(expected) if t in plain_engine.stop_ids), len(expected))
    assert ours.output_token_ids == expected[:cut]
    assert ours.prompt_tokens == inputs["input_ids"].shape[1]
    assert (ours.image_tokens if kind == "image" else ours.audio_tokens) > 0


@pytest.mark.parametrize("kind", ["text", "image", "audio"])
def test_speculative_decoding_is_lossless(plain_engine, speculative_engine, tokenizer, cases, kind):
    data, options, name = cases[kind]
    sampling = SamplingParams(max_new_tokens=24)
    (request,) = prepare_item(
        data, item_id=kind, name=name, tokenizer=tokenizer, options=options, sampling=sampling
    ).requests
    plain = plain_engine.generate([request])[0]
    spec = speculative_engine.generate([request])[0]
    assert spec.output_token_ids == plain.output_token_ids
    assert spec.text == plain.text
    assert plain.spec_drafted is None
    # Every round drafts up to num_speculative_tokens; accepted tokens are a subset of drafted ones.
    assert spec.spec_drafted >= 1
    assert 0 <= spec.spec_accepted <= spec.spec_drafted
    assert spec.spec_drafted <= 4 * max(1, spec.output_tokens)


def test_the_mtp_fix_is_what_makes_the_assistant_load(tiny_model):
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from pipelines.engines import mtp_fix

    if not mtp_fix.needs_fix():
        # A transformers without the bug (5.20, constraints-gpu.txt's, has no kv_sharing_modes at all): the guard
        # leaves it alone and the assistant loads as released.
        assert not mtp_fix.apply()
        Gemma4UnifiedAssistantForCausalLM.from_pretrained(tiny_model.assistant_path)
        return
    assert mtp_fix.apply()
    mtp_fix.remove()
    try:
        with pytest.raises(ValueError, match="producing a cache"):
            Gemma4UnifiedAssistantForCausalLM.from_pretrained(tiny_model.assistant_path)
    finally:
        assert mtp_fix.apply()
    Gemma4UnifiedAssistantForCausalLM.from_pretrained(tiny_model.assistant_path)


def test_output_does_not_depend_on_the_batch(plain_engine, tokenizer, cases, png_bytes):
    prompts = ["Hi.", "Tell me a long story about a fox and a dog in a lake.", "Why?", "Name three colours of the sea."]
    requests = []
    for index, prompt in enumerate(prompts):
        requests += _requests(tokenizer, b"context", TaskOptions(task=Task.prompt, prompt=prompt), item_id=f"t{index}")
    requests += _requests(tokenizer, png_bytes, TaskOptions(task=Task.caption), item_id="img", name="a.png")
    together = plain_engine.generate(requests)
    alone = [plain_engine.generate([r])[0] for r in requests]
    assert [r.id for r in together] == [r.id for r in requests]
    for batched, single in zip(together, alone):
        assert batched.output_token_ids == single.output_token_ids, batched.id


def test_auto_speculation_gives_the_same_greedy_output_on_either_path(tiny_model, plain_engine, tokenizer, png_bytes):
    """`auto` speculates a lone request and batches several without the assistant; the tokens are the same."""
    import asyncio

    from pipelines.config import EngineSpec
    from pipelines.engines.transformers import TransformersEngine
    from pipelines.replica import Replica

    auto = TransformersEngine(tiny_model, EngineSpec(speculative="auto", num_speculative_tokens=4, max_batch_size=8))
    assert auto.assistant is not None and auto.speculates(1) and not auto.speculates(2)
    sampling = SamplingParams(max_new_tokens=16)
    requests = []
    for index, prompt in enumerate(["Hi.", "Tell me a story about a fox.", "Why?"]):
        requests += _requests(
            tokenizer, b"context", TaskOptions(task=Task.prompt, prompt=prompt), sampling=sampling, item_id=f"t{index}"
        )
    requests += _requests(
        tokenizer, png_bytes, TaskOptions(task=Task.caption), sampling=sampling, item_id="img", name="a.png"
    )
    reference = {r.id: r.output_token_ids for r in plain_engine.generate(requests)}
    alone = [auto.generate([r])[0] for r in requests]
    batched = auto.generate(requests)
    assert {r.id: r.output_token_ids for r in alone} == reference
    assert {r.id: r.output_token_ids for r in batched} == reference
    assert all(r.spec_drafted is not None and r.spec_drafted >= 1 for r in alone)  # the speculative path ran
    assert all(r.spec_drafted is None for r in batched)  # the batched path ran

    # Through the replica runtime: a lone request speculates, concurrent ones are batched; same tokens.
    replica = Replica(auto, auto.spec)

    async def scenario():
        lone = await replica.submit(requests[0])
        together = await replica.submit_all(requests)
        return lone, together

    lone, together = asyncio.run(scenario())
    assert lone.result.output_token_ids == reference[requests[0].id] and lone.result.spec_drafted
    assert {s.result.id: s.result.output_token_ids for s in together} == reference
    assert replica.stats().spec_drafted >= lone.result.spec_drafted


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(plain_engine, tokenizer):
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=64, seed=7)
    (request,) = _requests(tokenizer, b"x", TaskOptions(task=Task.prompt, prompt="Write."), sampling=sampled)
    first = plain_engine.generate([request])[0]
    second = plain_engine.generate([request])[0]
    assert first.output_token_ids == second.output_token_ids
    (greedy,) = _requests(
        tokenizer, b"x", TaskOptions(task=Task.prompt, prompt="Write."), sampling=SamplingParams(max_new_tokens=16)
    )
    assert plain_engine.generate([greedy])[0].output_token_ids != first.output_token_ids


def test_length_finish_and_stop_strings(plain_engine, tokenizer):
    (request,) = _requests(
        tokenizer, b"x", TaskOptions(task=Task.prompt, prompt="Go."), sampling=SamplingParams(max_new_tokens=30)
    )
    full = plain_engine.generate([request])[0]
    assert full.finish_reason == "length" and full.output_tokens == 30
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    (stopped,) = _requests(
        tokenizer,
        b"x",
        TaskOptions(task=Task.prompt, prompt="Go."),
        sampling=SamplingParams(max_new_tokens=30, stop=(stop,)),
    )
    result = plain_engine.generate([stopped])[0]
    assert result.finish_reason == "stop"
    assert stop not in result.text and full.text.startswith(result.text)


def test_oversize_request_is_refused_with_its_id(plain_engine, tokenizer):
    (request,) = _requests(
        tokenizer,
        b"x",
        TaskOptions(task=Task.prompt, prompt="Go."),
        sampling=SamplingParams(max_new_tokens=9000),
        item_id="too-long",
    )
    with pytest.raises(InvalidRequest, match="too-long.*max_model_len"):
        plain_engine.generate([request])


def test_decode_strips_thinking_blocks(plain_engine, tokenizer):
    ids = tokenizer.encode("<|channel>thought\nhidden<channel|>Visible answer", add_special_tokens=False)
    assert plain_engine.decode(ids) == "Visible answer"


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    from safetensors.numpy import load_file

    from pipelines.engines.tiny_checkpoint import build_tiny_model

    a = load_file(build_tiny_model(tmp_path / "a", seed=5) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", seed=5) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", seed=6) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_stream_matches_generate_text_count_and_finish(plain_engine, tokenizer):
    import asyncio

    from pipelines.engines.base import StreamEnd

    for prompt, budget in (("Stream a few words.", 20), ("Say hi.", 3), ("Tell me a long story.", 64)):
        (request,) = _requests(
            tokenizer,
            b"x",
            TaskOptions(task=Task.prompt, prompt=prompt),
            sampling=SamplingParams(max_new_tokens=budget),
        )
        result = plain_engine.generate([request])[0]

        async def collect(request=request):
            return [chunk async for chunk in plain_engine.stream(request)]

        *deltas, end = asyncio.run(collect())
        assert isinstance(end, StreamEnd) and all(isinstance(d, str) for d in deltas)
        # The engine's own accounting: the same greedy tokens as the non-stream answer, never above max_tokens.
        assert (end.output_tokens, end.finish_reason) == (result.output_tokens, result.finish_reason), prompt
        assert end.output_tokens <= budget

        # The text is TextStream's piecewise decoding of those tokens (tested on its own in test_vllm_inputs.py);
        # the random tiny model's stray byte tokens decode differently piecewise and whole, so it is not compared.
        assert "".join(deltas).strip()


def test_closing_a_stream_stops_its_generation_and_frees_the_engine(plain_engine, tokenizer, monkeypatch):
    import asyncio
    import threading

    from pipelines.engines import transformers as engine_module

    budget = 600
    (request,) = _requests(
        tokenizer,
        b"x",
        TaskOptions(task=Task.prompt, prompt="Go on and on."),
        # End of turn banned: left alone, the generation runs its whole budget.
        sampling=SamplingParams(max_new_tokens=budget, logit_bias=tuple((t, -100.0) for t in plain_engine.stop_ids)),
    )
    assert plain_engine.generate([request])[0].finish_reason == "length"

    steps = []
    put = engine_module._RowsSink.put
    monkeypatch.setattr(engine_module._RowsSink, "put", lambda sink, value: (steps.append(1), put(sink, value)))

    async def leave_after_first_delta():
        stream = plain_engine.stream(request)
        async for _ in stream:
            break
        await stream.aclose()  # what a client that disconnects, or a stop string, does

    asyncio.run(leave_after_first_delta())
    for thread in threading.enumerate():
        if thread.name == f"stream-{request.id}":
            thread.join(timeout=120)
    assert plain_engine._lock.acquire(timeout=1), "the engine is still busy with the closed stream"
    plain_engine._lock.release()
    assert len(steps) < budget, "the closed stream kept generating to its budget"
