"""`plan`: parameter counts against real models, KV arithmetic, what fits a 16 GiB card, and the command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipelines.planning import kv_bytes_per_sequence, model_shape, plan


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from pipelines.config import ModelSpec
    from pipelines.model_sources import resolve

    return resolve(ModelSpec(name="tiny", assistant="tiny"))  # the tiny drafter is opt-in


def test_parameter_counts_equal_the_tiny_models_real_numel(tiny_model):
    from transformers import Gemma4UnifiedAssistantForCausalLM, Gemma4UnifiedForConditionalGeneration

    from pipelines.engines import mtp_fix

    mtp_fix.apply()
    target = Gemma4UnifiedForConditionalGeneration.from_pretrained(tiny_model.path)
    assistant = Gemma4UnifiedAssistantForCausalLM.from_pretrained(tiny_model.assistant_path)
    assert model_shape(tiny_model.path).params == sum(p.numel() for p in target.parameters())
    assert model_shape(tiny_model.assistant_path).params == sum(p.numel() for p in assistant.parameters())
    result = plan("tiny", engine="transformers")
    # As a run would: the tiny model's untrained drafter is opt-in, so `plan tiny` counts no assistant.
    assert (result.params, result.assistant_params) == (sum(p.numel() for p in target.parameters()), 0)


def test_kv_cache_of_the_tiny_model_matches_transformers_cache(tiny_model):
    """The tiny model's cache after a real forward has exactly the bytes the plan counts (sliding layers capped)."""
    import torch
    from transformers import DynamicCache, Gemma4UnifiedForConditionalGeneration

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(tiny_model.path, dtype=torch.bfloat16).eval()
    text = model.config.get_text_config()
    tokens = text.sliding_window * 2 + 5  # past the window: sliding layers keep only their window
    cache = DynamicCache(config=text)
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 100, (1, tokens)), past_key_values=cache, use_cache=True)
    held = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )
    held_per_layer = [layer.keys.shape[-2] for layer in cache.layers]
    assert max(held_per_layer) == tokens and min(held_per_layer) <= text.sliding_window
    shape = model_shape(tiny_model.path)
    # transformers keeps window - 1 past tokens plus the new ones for a sliding layer; the plan counts the window.
    planned = kv_bytes_per_sequence(shape, tokens)
    assert abs(planned - held) <= sum(2 * w * 2 for w, window in shape.kv_layers if window)


def test_12b_preset_has_the_published_size():
    result = plan("gemma-4-12b-it", gpu_memory_gib=80)
    assert abs(result.params - 11.95e9) / 11.95e9 < 0.01
    assert 0.35e9 < result.assistant_params < 0.45e9  # "about 0.4B"
    assert 22 < result.weights_gib < 23  # "bf16 weights are about 24 GB"
    # 40 sliding layers capped at 1024 tokens (8 KV heads x 256) and 8 global layers (4 KV heads x 512), bf16 K and V.
    expected = 40 * 1024 * 2 * 8 * 256 * 2 + 8 * 8192 * 2 * 4 * 512 * 2
    assert result.kv_bytes_per_sequence == expected
    assert result.kv_bytes_per_token == expected / 8192


def test_a_16_gib_card():
    def fits(engine, quantization, model="gemma-4-12b-it"):
        return plan(model, gpu_memory_gib=16, engine=engine, quantization=quantization)

    for engine in ("vllm", "transformers"):
        assert not fits(engine, "none").fits  # bf16 weights alone are over 22 GiB
    # transformers engine: fp8 and bitsandbytes 4-bit fit, with the assistant.
    assert fits("transformers", "fp8").max_sequences == 2
    assert fits("transformers", "bnb-4bit").max_sequences == 7
    # vLLM: the 4-bit QAT checkpoint fits 5 sequences of 8192 beside the assistant; fp8 leaves no room for one at
    # gpu_memory_utilization 0.9 (its bf16 embedding alone is 1.9 GiB) unless the assistant stays off and
    # sequences are short.
    qat = fits("vllm", None, "gemma-4-12b-it-qat")
    assert qat.quantization == "compressed-tensors" and qat.max_sequences == 5
    assert not fits("vllm", "fp8").fits
    assert plan("gemma-4-12b-it", gpu_memory_gib=16, quantization="fp8", speculative=False, max_model_len=2048).fits


def test_more_memory_fits_more_sequences_and_weights_follow_quantization():
    sizes = [plan("gemma-4-12b-it", gpu_memory_gib=g, quantization="fp8").max_sequences for g in (16, 24, 80)]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    weights = [
        plan("gemma-4-12b-it", engine="transformers", quantization=q).weights_gib
        for q in ("none", "bnb-8bit", "bnb-4bit")
    ]
    assert weights == sorted(weights, reverse=True)
    assert plan("gemma-4-12b", gpu_memory_gib=80).assistant_params == 0  # the base preset has no assistant


def test_plan_command_json_and_refusal():
    from jobs.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "plan",
            "--model",
            "gemma-4-12b-it",
            "--gpu-memory-gib",
            "16",
            "--quantization",
            "fp8",
            "--engine",
            "transformers",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    for key in (
        "params",
        "assistant_params",
        "weights_gib",
        "assistant_gib",
        "kv_bytes_per_token",
        "max_sequences",
        "fits",
    ):
        assert key in answer
    assert answer["fits"] is True and answer["max_sequences"] == 2
    refused = runner.invoke(app, ["plan", "--engine", "vllm", "--quantization", "bnb-4bit"])
    assert refused.exit_code == 2
    assert "runs on the transformers engine only" in refused.output
    table = runner.invoke(app, ["plan", "--gpu-memory-gib", "80"])
    assert table.exit_code == 0 and "sequences that fit" in table.output
