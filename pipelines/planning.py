"""What a replica needs and what fits a GPU, from a model's config alone (no weights are read).

Parameters are counted exactly by building the model on PyTorch's meta device (shapes, no memory). Weight bytes
follow the quantization: only the decoder layers' linear weights are quantized (vLLM's fp8_per_tensor,
bitsandbytes and the w4a16 QAT checkpoint all leave the tied embedding / LM head, norms and the media embedders in
bf16), the assistant stays bf16. KV cache: K and V of every layer that keeps its own cache (vLLM keeps a V slot on
`attention_k_eq_v` layers too); sliding-window layers hold at most their window, global layers the whole sequence.

The engine overheads are estimates, not measurements (benchmarks/gpu_check.py measures peak memory beside them):
CUDA context and allocator slack, the peak activations of one forward over a prefill chunk (the MLP's gate and up
projections dominate), the sampler's fp32 logits, and for vLLM its CUDA graphs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GIB = 1024**3
PRESET_DIR = Path(__file__).parent / "presets"
# Presets whose config ships in pipelines/presets/ (all three share one architecture), with their default
# quantization and whether they come with the MTP assistant.
PLAN_PRESETS = {
    "gemma-4-12b-it": ("gemma-4-12b-it", "none", True),
    "gemma-4-12b": ("gemma-4-12b-it", "none", False),
    "gemma-4-12b-it-qat": ("gemma-4-12b-it", "compressed-tensors", True),
}

# Bytes per quantized weight (scales included): bnb 4-bit keeps an fp32 absmax per 64 weights (transformers'
# default, no double quantization); the QAT w4a16 checkpoint a bf16 scale per group of 128.
WEIGHT_BYTES = {"none": 2.0, "fp8": 1.0, "bnb-8bit": 1.0, "bnb-4bit": 0.5 + 4 / 64, "compressed-tensors": 0.5 + 2 / 128}
BF16 = 2
KV_BYTES = 2  # bf16 cache
CONTEXT_GIB = 0.5  # CUDA context, cuBLAS workspaces, allocator slack: outside the model's tensors
VLLM_CUDA_GRAPHS_GIB = 0.25
VLLM_PREFILL_CHUNK = 8192  # vLLM's max_num_batched_tokens for offline use
VLLM_MAX_NUM_SEQS = 256  # vLLM profiles the sampler with this many sequences
_SELF_ATTN = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn$")


@dataclass(frozen=True)
class ModelShape:
    """What planning needs of one checkpoint: counted from its config on the meta device."""

    params: int
    quantizable: int  # decoder-layer linear weights
    kv_layers: tuple[tuple[int, int | None], ...]  # (K width = kv heads x head dim, window or None) per cached layer
    hidden: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Plan:
    model: str
    engine: str
    quantization: str
    gpu_memory_gib: float
    gpu_memory_utilization: float
    max_model_len: int
    params: int
    assistant_params: int
    weights_gib: float
    assistant_gib: float
    kv_bytes_per_token: float  # a max_model_len sequence's KV over its length (sliding layers capped at the window)
    kv_bytes_per_sequence: int
    overhead_gib: float
    kv_budget_gib: float  # what is left for the KV cache
    max_sequences: int  # sequences of max_model_len that fit in that budget
    fits: bool  # at least one

    def to_json(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _model_class(config):
    import transformers

    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(f"unknown model architecture {architectures or config.model_type!r}")


def model_shape(config_dir: str | Path) -> ModelShape:
    """Count a checkpoint's parameters and cache layout from its config.json, without reading weights."""
    import torch
    from transformers import AutoConfig

    from pipelines.engines import mtp_fix

    mtp_fix.apply()  # the assistant's config cannot be built without it on the affected transformers releases
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = _model_class(config)(config)
    params = sum(p.numel() for p in model.parameters())
    quantizable = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(r"(?:^|\.)layers\.\d+\.", name)
    )
    text = config.get_text_config()
    shared_from = text.num_hidden_layers - (getattr(text, "num_kv_shared_layers", 0) or 0)
    kv_layers = []
    for name, module in model.named_modules():
        found = _SELF_ATTN.search(name)
        if not found or not hasattr(module, "k_proj") or int(found.group(1)) >= shared_from:
            continue
        sliding = text.layer_types[int(found.group(1))] == "sliding_attention"
        kv_layers.append((module.k_proj.out_features, text.sliding_window if sliding else None))
    return ModelShape(params, quantizable, tuple(kv_layers), text.hidden_size, text.intermediate_size, text.vocab_size)


def weight_bytes(shape: ModelShape, quantization: str) -> float:
    return shape.quantizable * WEIGHT_BYTES[quantization] + (shape.params - shape.quantizable) * BF16


def kv_bytes_per_sequence(shape: ModelShape, tokens: int) -> int:
    """K and V of one sequence of `tokens`: a sliding layer holds at most its window, a global layer all of it."""
    return sum(2 * width * KV_BYTES * (min(tokens, window) if window else tokens) for width, window in shape.kv_layers)


def overhead_bytes(shape: ModelShape, engine: str, max_model_len: int, max_batch_size: int) -> float:
    chunk = min(max_model_len, VLLM_PREFILL_CHUNK)
    activations = chunk * (2 * shape.intermediate + 4 * shape.hidden) * BF16
    if engine == "vllm":
        return (CONTEXT_GIB + VLLM_CUDA_GRAPHS_GIB) * GIB + activations + VLLM_MAX_NUM_SEQS * shape.vocab * 4
    return CONTEXT_GIB * GIB + activations + max_batch_size * shape.vocab * 4


def resolve_config_dirs(model: str) -> tuple[Path, Path | None, str]:
    """(target config dir, assistant config dir or None, default quantization) for a preset, tiny or a checkpoint."""
    if model in PLAN_PRESETS:
        folder, quantization, with_assistant = PLAN_PRESETS[model]
        directory = PRESET_DIR / folder
        return directory, (directory / "assistant") if with_assistant else None, quantization
    from pipelines.model_sources import resolve

    resolved = resolve(model)
    quantization = "compressed-tensors" if _checkpoint_quantized(resolved.path) else "none"
    return resolved.path, resolved.assistant_path, quantization


def _checkpoint_quantized(path: Path) -> bool:
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("quantization_config", {}).get("quant_method") == "compressed-tensors"


def plan(
    model: str,
    *,
    gpu_memory_gib: float = 16.0,
    quantization: str | None = None,
    max_model_len: int = 8192,
    engine: str = "vllm",
    speculative: bool = True,
) -> Plan:
    """What one replica of `model` needs on a GPU of `gpu_memory_gib`, and how many full-length sequences fit."""
    from pipelines.config import EngineSpec

    target_dir, assistant_dir, default_quantization = resolve_config_dirs(model)
    quantization = quantization or default_quantization
    # The same validation as a job or serve spec: refuses vllm + bitsandbytes with the spec's message.
    spec = EngineSpec(kind=engine, quantization=quantization, max_model_len=max_model_len, speculative=speculative)
    target = model_shape(target_dir)
    assistant = model_shape(assistant_dir) if (assistant_dir is not None and spec.speculates) else None
    weights = weight_bytes(target, quantization)
    assistant_bytes = weight_bytes(assistant, "none") if assistant else 0.0
    per_sequence = kv_bytes_per_sequence(target, max_model_len)
    overhead = overhead_bytes(target, engine, max_model_len, spec.max_batch_size)
    # vLLM takes gpu_memory_utilization of the card; the transformers engine allocates as it goes, up to the card.
    utilization = spec.gpu_memory_utilization if engine == "vllm" else 1.0
    budget = gpu_memory_gib * GIB * utilization - weights - assistant_bytes - overhead
    sequences = max(0, math.floor(budget / per_sequence)) if per_sequence else 0
    return Plan(
        model=model,
        engine=engine,
        quantization=quantization,
        gpu_memory_gib=gpu_memory_gib,
        gpu_memory_utilization=utilization,
        max_model_len=max_model_len,
        params=target.params,
        assistant_params=assistant.params if assistant else 0,
        weights_gib=weights / GIB,
        assistant_gib=assistant_bytes / GIB,
        kv_bytes_per_token=per_sequence / max_model_len,
        kv_bytes_per_sequence=per_sequence,
        overhead_gib=overhead / GIB,
        kv_budget_gib=budget / GIB,
        max_sequences=sequences,
        fits=sequences >= 1,
    )
