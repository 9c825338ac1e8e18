"""Prepared rows -> vLLM inputs, checked on CPU against the processors vLLM itself runs; plus a GPU smoke test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.config import EngineSpec
from pipelines.engines.base import PreparedRequest, SamplingParams
from pipelines.engines.vllm_inputs import (
    MAX_AUDIO_TOKENS,
    TextStream,
    audio_for_vllm,
    collapse_placeholders,
    engine_kwargs,
    image_for_vllm,
    infer_soft_tokens,
    is_fixed_point,
    output_text,
    stable_size_for_vllm,
    stop_token_ids,
    to_vllm_prompt,
    to_vllm_sampling_kwargs,
    unpatchify,
    vllm_audio_tokens,
    vllm_image_size,
)
from pipelines.errors import InvalidRequest, LimitExceeded
from pipelines.media.image import PATCH, SUPPORTED_SOFT_TOKENS, patchify, prepare_image_array, resize, target_size
from pipelines.prepare import prepare_item
from pipelines.prompts import Task, TaskOptions


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x[..., None] / 23.0 + y[..., None] / 37.0 + np.arange(3))
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


# (decoded size, budget): fixed points and non-fixed points of the resize rule, thin and wide.
CASES = [
    ((224, 224), 280),
    ((480, 640), 280),
    ((353, 790), 140),
    ((805, 211), 280),
    ((37, 999), 70),
    ((1080, 1920), 1120),
]


@pytest.fixture(scope="module")
def image_processor():
    from transformers.models.gemma4_unified import Gemma4UnifiedImageProcessor

    return Gemma4UnifiedImageProcessor()


# ---- unpatchify ----


@pytest.mark.parametrize("size,budget", CASES, ids=lambda c: str(c))
def test_unpatchify_inverts_patchify(size, budget):
    rgb = _photo(*size)
    prepared = prepare_image_array(rgb, budget)
    rebuilt = unpatchify(prepared.patches, prepared.positions)
    assert rebuilt.dtype == np.uint8 and rebuilt.shape == (*prepared.size, 3)
    assert np.array_equal(rebuilt, resize(rgb, prepared.size))
    patches, positions = patchify(rebuilt)
    assert np.array_equal(patches, prepared.patches) and np.array_equal(positions, prepared.positions)


def test_unpatchify_places_patches_by_position_not_by_order():
    prepared = prepare_image_array(_photo(300, 500), 140)
    order = np.random.default_rng(0).permutation(prepared.tokens)
    shuffled = unpatchify(prepared.patches[order], prepared.positions[order])
    assert np.array_equal(shuffled, unpatchify(prepared.patches, prepared.positions))


def test_unpatchify_refuses_incomplete_grids_and_padding():
    prepared = prepare_image_array(_photo(300, 500), 140)
    with pytest.raises(InvalidRequest, match="full"):
        unpatchify(prepared.patches[:-1], prepared.positions[:-1])
    duplicated = prepared.positions.copy()
    duplicated[0] = duplicated[1]
    with pytest.raises(InvalidRequest, match="exactly once"):
        unpatchify(prepared.patches, duplicated)
    padded = np.vstack([prepared.positions, [[-1, -1]]]).astype(np.int16)
    with pytest.raises(InvalidRequest, match="non-negative"):
        unpatchify(np.vstack([prepared.patches, np.zeros((1, 6912), np.uint8)]), padded)


# ---- fixed points of the resize rule ----


@settings(max_examples=2000, deadline=None)
@given(height=st.integers(1, 12_000), width=st.integers(1, 12_000), budget=st.sampled_from(SUPPORTED_SOFT_TOKENS))
def test_every_prepared_size_has_a_size_vllm_maps_back_onto_it(height, width, budget):
    try:
        size = target_size(height, width, budget)
    except InvalidRequest:
        return
    stable = stable_size_for_vllm(*size, budget)
    assert stable is not None
    # Both transformers' resize (which makes vLLM's patches) and vLLM's placeholder arithmetic land on `size`.
    assert target_size(*stable, budget) == size
    assert vllm_image_size(*stable, budget) == size
    assert (stable == size) == is_fixed_point(*size, budget)


def test_fixed_point_rate_over_a_sweep_of_sizes_and_budgets():
    """About a third of prepared sizes are not fixed points: a second pass of the rule would grow them."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(16, 4000, size=(4000, 2))
    total = not_fixed = 0
    for budget in SUPPORTED_SOFT_TOKENS:
        for height, width in sizes.tolist():
            size = target_size(height, width, budget)
            total += 1
            not_fixed += not is_fixed_point(*size, budget)
    rate = not_fixed / total
    print(f"not a fixed point: {not_fixed}/{total} = {rate:.1%}")
    assert 0.2 < rate < 0.5


def test_thin_fallback_grids_are_fixed_points():
    for budget in SUPPORTED_SOFT_TOKENS:
        size = target_size(3, 100_000, budget)
        assert size == (PATCH, budget * PATCH)
        assert is_fixed_point(*size, budget)


def test_sizes_no_budget_can_produce_are_refused():
    assert stable_size_for_vllm(48 * 20, 48 * 20, 280) is None  # 400 patches > 280
    assert stable_size_for_vllm(50, 96, 280) is None  # not on the 48-px grid
    with pytest.raises(InvalidRequest, match="budget"):
        infer_soft_tokens([(48 * 40, 48 * 40)])
    with pytest.raises(InvalidRequest, match="max_soft_tokens=70"):
        image_for_vllm(np.zeros((48 * 10, 48 * 10, 3), np.uint8), 70)


@pytest.mark.parametrize("size,budget", CASES, ids=lambda c: str(c))
def test_budget_is_inferred_from_the_grid(size, budget):
    prepared = prepare_image_array(_photo(*size), budget)
    assert infer_soft_tokens([prepared.size]) <= budget
    assert stable_size_for_vllm(*prepared.size, infer_soft_tokens([prepared.size])) is not None


@pytest.mark.parametrize("size,budget", CASES, ids=lambda c: str(c))
def test_vllms_processor_reproduces_the_prepared_grid(image_processor, size, budget):
    """What vLLM runs on an image (transformers' image processor, its own token count) gives our grid back."""
    from PIL import Image

    prepared = prepare_image_array(_photo(*size), budget)
    sent = image_for_vllm(unpatchify(prepared.patches, prepared.positions), budget)
    out = image_processor(images=Image.fromarray(sent), max_soft_tokens=budget, return_tensors="pt")
    count = int(out["num_soft_tokens_per_image"][0])
    assert count == prepared.tokens
    height, width = vllm_image_size(sent.shape[0], sent.shape[1], budget)
    assert (height // PATCH) * (width // PATCH) == count  # vLLM's placeholder count for the same image
    assert torch.equal(out["image_position_ids"][0, :count], torch.from_numpy(prepared.positions).long())
    ours = torch.from_numpy(prepared.patches) * (1 / 255)
    theirs = out["pixel_values"][0, :count]
    if is_fixed_point(*prepared.size, budget):
        assert sent.shape[:2] == prepared.size
        assert torch.equal(theirs, ours)
    else:
        # One extra resample through the pre-image: same grid, a slight blur.
        assert sent.shape[:2] != prepared.size
        assert (theirs - ours).abs().mean().item() < 4 / 255


# ---- audio ----


def test_audio_frames_become_a_whole_number_of_frames():
    frames = np.random.default_rng(0).uniform(-1, 1, (50, 640)).astype(np.float32)
    wave, rate = audio_for_vllm(frames)
    assert rate == 16_000 and wave.dtype == np.float32 and wave.shape == (50 * 640,)
    assert np.array_equal(wave.reshape(50, 640), frames)


def test_vllm_counts_whole_frames_like_transformers():
    for frames in range(1, MAX_AUDIO_TOKENS + 1):
        assert vllm_audio_tokens(frames * 640) == frames
    # The off-by-one the padding avoids: a tail of 1..160 samples is not counted by vLLM.
    for tail in (1, 80, 160):
        assert vllm_audio_tokens(10 * 640 + tail) == 10 != math.ceil((10 * 640 + tail) / 640)
    for tail in (161, 639):
        assert vllm_audio_tokens(10 * 640 + tail) == 11


def test_prepared_audio_matches_vllms_count(tokenizer, wav_bytes):
    (request,) = prepare_item(
        wav_bytes, item_id="a", name="a.wav", tokenizer=tokenizer, options=TaskOptions(task=Task.transcribe)
    ).requests
    wave, _ = audio_for_vllm(request.audio_frames[0])
    assert len(wave) % 640 == 0
    assert vllm_audio_tokens(len(wave)) == request.audio_tokens


def test_audio_over_thirty_seconds_and_bad_shapes_are_refused():
    with pytest.raises(LimitExceeded, match="30 s"):
        audio_for_vllm(np.zeros((MAX_AUDIO_TOKENS + 1, 640), np.float32))
    with pytest.raises(InvalidRequest):
        audio_for_vllm(np.zeros((10, 320), np.float32))
    with pytest.raises(InvalidRequest):
        audio_for_vllm(np.zeros((0, 640), np.float32))


# ---- prompts ----


def _expand(
    ids: list[int], tokenizer, images: list[tuple[int, int]], budget: int, audio_lengths: list[int]
) -> list[int]:
    """vLLM's prompt update: each placeholder -> begin + soft x N + end, N by vLLM's own arithmetic."""
    out, images, audios = [], iter(images), iter(audio_lengths)
    for token in ids:
        if token == tokenizer.image_token_id:
            h, w = vllm_image_size(*next(images), budget)
            out += (
                [tokenizer.boi_token_id] + [token] * min((h // PATCH) * (w // PATCH), budget) + [tokenizer.eoi_token_id]
            )
        elif token == tokenizer.audio_token_id:
            out += [tokenizer.boa_token_id] + [token] * vllm_audio_tokens(next(audios)) + [tokenizer.eoa_token_id]
        else:
            out.append(token)
    return out


def test_image_prompt_collapses_to_one_placeholder(tokenizer, png_bytes):
    (request,) = prepare_item(
        png_bytes, item_id="i", name="i.png", tokenizer=tokenizer, options=TaskOptions(task=Task.caption)
    ).requests
    prompt = to_vllm_prompt(request, tokenizer, 280)
    ids = prompt["prompt_token_ids"]
    assert ids.count(tokenizer.image_token_id) == 1
    assert tokenizer.boi_token_id not in ids and tokenizer.eoi_token_id not in ids
    assert len(ids) == request.prompt_tokens - request.image_tokens - 1
    (image,) = prompt["multi_modal_data"]["image"]
    assert prompt["mm_processor_kwargs"] == {"max_soft_tokens": 280}
    assert "audio" not in prompt["multi_modal_data"]
    expanded = _expand(ids, tokenizer, [(image.height, image.width)], 280, [])
    assert expanded == request.prompt_token_ids.tolist()
    # Without a budget the smallest consistent one is used; the grid still comes back.
    inferred = to_vllm_prompt(request, tokenizer)
    budget = inferred["mm_processor_kwargs"]["max_soft_tokens"]
    (image,) = inferred["multi_modal_data"]["image"]
    assert _expand(inferred["prompt_token_ids"], tokenizer, [(image.height, image.width)], budget, []) == expanded


def test_audio_prompt_collapses_to_one_placeholder(tokenizer, wav_bytes):
    (request,) = prepare_item(
        wav_bytes, item_id="a", name="a.wav", tokenizer=tokenizer, options=TaskOptions(task=Task.transcribe)
    ).requests
    prompt = to_vllm_prompt(request, tokenizer)
    ids = prompt["prompt_token_ids"]
    assert ids.count(tokenizer.audio_token_id) == 1
    assert tokenizer.boa_token_id not in ids and tokenizer.eoa_token_id not in ids
    ((wave, rate),) = prompt["multi_modal_data"]["audio"]
    assert rate == 16_000 and "mm_processor_kwargs" not in prompt
    assert _expand(ids, tokenizer, [], 280, [len(wave)]) == request.prompt_token_ids.tolist()


def test_audio_prompt_matches_the_hf_processor_on_the_vllm_waveform(tokenizer, hf_processor, wav_bytes):
    (request,) = prepare_item(
        wav_bytes, item_id="a", name="a.wav", tokenizer=tokenizer, options=TaskOptions(task=Task.transcribe)
    ).requests
    prompt = to_vllm_prompt(request, tokenizer)
    ((wave, _),) = prompt["multi_modal_data"]["audio"]
    text = tokenizer.decode(prompt["prompt_token_ids"])
    inputs = hf_processor(text=text, audio=[wave], add_special_tokens=False, return_tensors="np")
    assert inputs["input_ids"][0].tolist() == request.prompt_token_ids.tolist()


def test_text_prompt_has_no_media(tokenizer):
    (request,) = prepare_item(
        b"A note.", item_id="t", name="t.txt", tokenizer=tokenizer, options=TaskOptions(task=Task.prompt, prompt="Hi")
    ).requests
    prompt = to_vllm_prompt(request, tokenizer)
    assert prompt == {"prompt_token_ids": request.prompt_token_ids.tolist()}


def test_document_pages_become_several_images(tokenizer, png_bytes):
    (request,) = prepare_item(
        png_bytes, item_id="i", name="i.png", tokenizer=tokenizer, options=TaskOptions(task=Task.caption)
    ).requests
    # Two images in one prompt: the caption prompt with its image run repeated.
    ids = request.prompt_token_ids.tolist()
    start = ids.index(tokenizer.boi_token_id)
    end = ids.index(tokenizer.eoi_token_id) + 1
    doubled = ids[:end] + ids[start:end] + ids[end:]
    two = PreparedRequest(
        id="two",
        prompt_token_ids=np.asarray(doubled, np.int32),
        mm_token_type_ids=np.zeros(len(doubled), np.int8),
        image_patches=request.image_patches * 2,
        image_positions=request.image_positions * 2,
    )
    prompt = to_vllm_prompt(two, tokenizer, 280)
    assert prompt["prompt_token_ids"].count(tokenizer.image_token_id) == 2
    assert len(prompt["multi_modal_data"]["image"]) == 2


def test_more_than_one_audio_is_refused(tokenizer, wav_bytes):
    (request,) = prepare_item(
        wav_bytes, item_id="a", name="a.wav", tokenizer=tokenizer, options=TaskOptions(task=Task.transcribe)
    ).requests
    two = PreparedRequest(
        id="two-clips",
        prompt_token_ids=request.prompt_token_ids,
        mm_token_type_ids=request.mm_token_type_ids,
        audio_frames=request.audio_frames * 2,
    )
    with pytest.raises(InvalidRequest, match="at most one audio clip") as caught:
        to_vllm_prompt(two, tokenizer)
    assert caught.value.item == "two-clips" and caught.value.stage == "generate"


def test_placeholder_runs_must_match_the_media(tokenizer, png_bytes):
    (request,) = prepare_item(
        png_bytes, item_id="i", name="i.png", tokenizer=tokenizer, options=TaskOptions(task=Task.caption)
    ).requests
    ids = request.prompt_token_ids.tolist()
    counts = [request.image_tokens]
    assert collapse_placeholders(ids, tokenizer, counts, []).count(tokenizer.image_token_id) == 1
    with pytest.raises(InvalidRequest, match="has 1 more|tokens but its image has"):
        collapse_placeholders(ids, tokenizer, [request.image_tokens + 1], [])
    with pytest.raises(InvalidRequest, match="more image placeholders"):
        collapse_placeholders(ids, tokenizer, [], [])
    with pytest.raises(InvalidRequest, match="more image items"):
        collapse_placeholders(ids, tokenizer, counts * 2, [])
    with pytest.raises(InvalidRequest, match="not closed"):
        collapse_placeholders(ids[: ids.index(tokenizer.eoi_token_id)], tokenizer, counts, [])
    with pytest.raises(InvalidRequest, match="outside"):
        collapse_placeholders([tokenizer.image_token_id], tokenizer, [], [])


# ---- sampling, engine ----


def test_sampling_kwargs():
    greedy = to_vllm_sampling_kwargs(SamplingParams(max_new_tokens=32))
    assert greedy == {"max_tokens": 32, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": []}
    sampled = to_vllm_sampling_kwargs(
        SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=64, seed=7, stop=("\n\n",)), [1, 106]
    )
    assert sampled == {
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 64,
        "seed": 7,
        "stop": ["\n\n"],
        "stop_token_ids": [1, 106],
    }


def test_stop_tokens_are_end_of_sequence_and_end_of_turn(tokenizer):
    ids = stop_token_ids(tokenizer)
    assert tokenizer.eos_token_id in ids and tokenizer.convert_tokens_to_ids("<turn|>") in ids


@pytest.mark.parametrize(
    "quantization,expected",
    [("none", None), ("fp8", "fp8_per_tensor"), ("compressed-tensors", None)],
)
def test_engine_kwargs_quantization(quantization, expected):
    kwargs = engine_kwargs(EngineSpec(kind="vllm", quantization=quantization), "/m", None)
    assert kwargs["quantization"] == expected


@pytest.mark.parametrize("quantization", ["bnb-4bit", "bnb-8bit"])
def test_vllm_with_bitsandbytes_is_refused_by_the_spec(quantization):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        EngineSpec(kind="vllm", quantization=quantization)
    message = str(caught.value)
    assert f"quantization={quantization} runs on the transformers engine only" in message
    assert "use fp8, or compressed-tensors" in message
    assert EngineSpec(kind="transformers", quantization=quantization).quantization == quantization
    with pytest.raises(ValueError, match="no vLLM equivalent"):
        engine_kwargs(EngineSpec(kind="transformers", quantization=quantization), "/m", None)


def test_vllm_fp8_in_float32_is_refused_by_the_spec():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fp8 computes in bfloat16 or float16 on vLLM"):
        EngineSpec(kind="vllm", quantization="fp8", dtype="float32")
    assert EngineSpec(kind="vllm", quantization="fp8", dtype="bfloat16").dtype == "bfloat16"


def test_engine_kwargs():
    spec = EngineSpec(
        kind="vllm",
        dtype="bfloat16",
        max_model_len=4096,
        gpu_memory_utilization=0.8,
        max_images_per_prompt=3,
        num_speculative_tokens=6,
    )
    kwargs = engine_kwargs(spec, "/models/g", "/models/g/assistant", max_soft_tokens=560)
    assert kwargs == {
        "model": "/models/g",
        "tokenizer": "/models/g",
        "dtype": "bfloat16",
        "quantization": None,
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.8,
        "limit_mm_per_prompt": {"image": 3, "audio": 1, "video": 0},
        "trust_remote_code": False,
        "mm_processor_kwargs": {"max_soft_tokens": 560},
        "speculative_config": {"method": "mtp", "model": "/models/g/assistant", "num_speculative_tokens": 6},
        "disable_log_stats": False,
    }
    plain = engine_kwargs(spec, "/models/g", None)
    assert "speculative_config" not in plain and "mm_processor_kwargs" not in plain
    off = engine_kwargs(EngineSpec(kind="vllm", speculative=False), "/models/g", "/models/g/assistant")
    assert "speculative_config" not in off


# ---- output text ----


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_output_text_hides_thinking_and_special_tokens(tokenizer):
    ids = _ids(tokenizer, "<|channel>thought\nthe quick fox<channel|>A cat sits on a red mat.<turn|>")
    text, stopped = output_text(tokenizer, ids)
    assert text == "A cat sits on a red mat." and not stopped
    text, stopped = output_text(tokenizer, ids, ("red",))
    assert text == "A cat sits on a" and stopped


def test_stream_deltas_add_up_to_the_text(tokenizer):
    ids = _ids(tokenizer, "<|channel>thought\nhidden<channel|>The report shows revenue growth.<turn|>")
    stream = TextStream(tokenizer)
    deltas = [stream.push([token]) for token in ids[:-1]] + [stream.push(ids[-1:], final=True)]
    assert "".join(deltas) == "The report shows revenue growth."
    assert all("hidden" not in d for d in deltas)


def test_stream_stops_at_a_stop_string_without_leaking_it(tokenizer):
    ids = _ids(tokenizer, "A photo of a mountain lake at sunrise")
    stream = TextStream(tokenizer, stop=("lake",))
    text = ""
    for token in ids:
        text += stream.push([token])
        if stream.stopped:
            break
    assert stream.stopped and text == "A photo of a mountain "


def test_penalties_and_logit_bias_reach_vllm_unchanged():
    kwargs = to_vllm_sampling_kwargs(
        SamplingParams(frequency_penalty=0.5, presence_penalty=-1.0, logit_bias=((5, -100.0), (9, 2.5)))
    )
    assert kwargs["frequency_penalty"] == 0.5 and kwargs["presence_penalty"] == -1.0
    assert kwargs["logit_bias"] == {5: -100.0, 9: 2.5}
