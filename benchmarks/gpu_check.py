"""What one GPU does with a full-size Gemma 4 12B Unified through transformers. Random weights, no download.

One command, under 8 minutes, with only PyTorch, transformers (and the few wheels our media code needs) and this
repo on the machine: no Ray, no vLLM. Sections, in order, each skipped with a note when time runs low:

1. bf16: the preset's config (pipelines/presets/gemma-4-12b-it/) built on the GPU with random weights. Prefill
   tokens/s (1 x 2048) and greedy decode tokens/s at batch 1, 8 and 32 (a plain cached loop), each beside the
   memory-bandwidth bound (batch x HBM bandwidth / bytes a step reads: the weights plus the batch's KV cache).
2. fp8 under a 16 GiB cap: the same weights, written as a checkpoint with its MTP assistant (random, from the
   preset's assistant config), loaded by our transformers engine (pipelines/engines/transformers.py). The decoder
   layers' linear weights are cast to float8_e4m3fn with one scale per tensor, here, before they reach the GPU:
   transformers' own fp8 route (FineGrainedFP8, the engine's `quantization: fp8`) runs its matmuls through a kernel
   it downloads from the Hugging Face hub, which a machine without network cannot. Everything else (embedding,
   norms, media embedders, assistant) stays bf16, as `gemma-unified plan` counts it. With
   torch.cuda.set_per_process_memory_fraction capping the process at 16 GiB, an image and an audio prompt
   (prepared by pipelines/prepare.py) go through the engine; peak memory is shown beside plan's figures.
3. Speculation: the same requests with the MTP assistant off and on: whether greedy output is identical, tokens/s,
   drafted and accepted counts.

    python benchmarks/gpu_check.py                 # needs CUDA; exits 0 with a note otherwise
    python benchmarks/gpu_check.py --hbm-gbps 2000 # bandwidth for cards it does not know
    python benchmarks/gpu_check.py --dry-run       # 2 layers, tiny widths, on CPU: every section, anywhere

The README ("GPU check") gives the exact command that brings the wheels to a machine with PyTorch only.
"""

from __future__ import annotations

import os
import sys

# Put the repo root, not this folder, first on the path: a benchmark module here may shadow a standard library
# module (tokenize.py did, and `import torch` imports tokenize), and `pipelines` must be importable.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import importlib.util
import json
import re
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

STARTED = time.perf_counter()
TIME_BUDGET_S = 8 * 60
ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "pipelines" / "presets" / "gemma-4-12b-it"
GIB = 1024**3
CAP_GIB = 16.0

# Import name -> distribution name: what this check (the engine, prepare and media modules it runs) imports.
# torch is preinstalled on the GPU machine; the others come as wheels (README, "GPU check").
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "packaging": "packaging",
    "pydantic": "pydantic",
    "PIL": "pillow",
    "soundfile": "soundfile",
    "soxr": "soxr",
    "av": "av",
    "pypdfium2": "pypdfium2",
    "jinja2": "jinja2",
}

# HBM bandwidth in GB/s by device name (first match wins).
BANDWIDTH = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),
    ("A100", 2039.0),
    ("L40S", 864.0),
    ("L4", 300.0),
]

# The dry run: the preset's structure (5:1 sliding/global pattern reduced to one of each, mixed head sizes, the
# full vocabulary) at widths a CPU runs in seconds. The assistant's dims follow, as its KV is the target's.
DRY_TEXT = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=64,
    max_position_embeddings=8192,
    layer_types=["sliding_attention", "full_attention"],
    per_layer_config={"01": {"head_dim": 32, "num_key_value_heads": 1}},
)
DRY_VISION = dict(mm_embed_dim=64, output_proj_dims=64)
DRY_ASSISTANT_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=64,
    max_position_embeddings=8192,
    per_layer_config={"3": {"head_dim": 32}},
)
# Decoder-layer linear weights: what plan counts as quantizable (pipelines/planning.py).
_DECODER_LINEAR = re.compile(r"(?:^|\.)layers\.\d+\.")


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def left() -> float:
    return TIME_BUDGET_S - (time.perf_counter() - STARTED)


def missing_packages() -> list[str]:
    missing = []
    for module, dist in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing


SECTIONS = ("setup", "bf16", "fp8", "plan", "speculation", "error")


class Table:
    """Rows (section, metric, value), printed at the end whatever happened before."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, section: str, metric: str, value: str) -> None:
        self.rows.append((section, metric, value))

    def print(self) -> None:
        order = {name: index for index, name in enumerate(SECTIONS)}
        rows = sorted(self.rows, key=lambda row: order.get(row[0], len(order)))  # stable: in order within one
        widths = [max(len(r[i]) for r in rows + [("section", "metric", "value")]) for i in range(2)]
        print()
        print(f"{'section'.ljust(widths[0])} | {'metric'.ljust(widths[1])} | value")
        print(f"{'-' * widths[0]}-|-{'-' * widths[1]}-|-{'-' * 40}")
        for section, metric, value in rows:
            print(f"{section.ljust(widths[0])} | {metric.ljust(widths[1])} | {value}", flush=True)


# ---- the checkpoint: preset config, a local tokenizer, random weights ----


def write_configs(directory: Path, dry_run: bool):
    """Tokenizer + the preset's target and assistant configs (token ids remapped) in `directory`; the configs."""
    from transformers import AutoConfig

    from pipelines.engines import mtp_fix
    from pipelines.engines.tiny_checkpoint import build_tiny_tokenizer, media_token_ids, text_token_ids

    mtp_fix.apply()
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    target = json.loads((PRESET / "config.json").read_text())
    assistant = json.loads((PRESET / "assistant" / "config.json").read_text())
    if dry_run:
        target["text_config"].update(DRY_TEXT)
        target["vision_config"].update(DRY_VISION)
        assistant["text_config"].update(DRY_ASSISTANT_TEXT)
        assistant["backbone_hidden_size"] = DRY_TEXT["hidden_size"]
    target.update(media_token_ids(tokenizer))
    target["text_config"].update(text_token_ids(tokenizer))
    assistant["text_config"].update(text_token_ids(tokenizer))
    (directory / "assistant").mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(target, indent=2))
    (directory / "assistant" / "config.json").write_text(json.dumps(assistant, indent=2))
    return tokenizer, AutoConfig.from_pretrained(directory), AutoConfig.from_pretrained(directory / "assistant")


@contextmanager
def default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(cls, config, device):
    """Allocate straight on the device in bf16 (no fp32 copy in host RAM); transformers' own init runs there."""
    import torch

    with default_dtype(torch.bfloat16), torch.device(device):
        return cls(config).eval()


def generation_ids(model, tokenizer) -> None:
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def weight_bytes(model) -> tuple[int, int, int]:
    """(all parameters, parameters a decode step reads, parameter count)."""
    total = count = media = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        total += size
        count += param.numel()
        if "embed_vision" in name or "embed_audio" in name:
            media += size
    # A decode step reads every decoder weight and the (tied) embedding once as the LM head; not the media embedders.
    return total, total - media, count


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "numel"):
                total += tensor.numel() * tensor.element_size()
    return total


# ---- section 1: bf16 ----


def measure_prefill(model, device, tokens: int, vocab: int, repeats: int) -> float:
    import torch

    ids = torch.randint(3, vocab, (1, tokens), device=device)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up: kernels, allocator, masks
        synchronize(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            synchronize(device)
            times.append(time.perf_counter() - started)
            if left() < 300:
                break
    return tokens / min(times)


def measure_decode(model, device, batch: int, steps: int, vocab: int, prompt: int = 32) -> tuple[float, int, int]:
    """Greedy decode of `batch` sequences with the KV cache: (tokens/s over all rows, steps, KV bytes at the end)."""
    import torch
    from transformers import DynamicCache

    def run(n: int) -> tuple[float, int, int]:
        cache = DynamicCache(config=model.config.get_text_config())
        ids = torch.randint(3, vocab, (batch, prompt), device=device)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        started = time.perf_counter()
        done = 0
        for _ in range(n):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)  # greedy; stays on the device, no host sync per step
            done += 1
            if left() < 270:
                break
        synchronize(device)
        return time.perf_counter() - started, done, cache_bytes(cache)

    with torch.inference_mode():
        run(min(4, steps))  # warm-up
        elapsed, done, kv = run(steps)
    return batch * done / elapsed, done, kv


def bandwidth_for(name: str, flag: float | None) -> float | None:
    if flag:
        return flag
    for key, gbps in BANDWIDTH:
        if key in name:
            return gbps
    return None


def section_bf16(table: Table, model, device, settings: dict, gbps: float | None) -> None:
    import torch

    total, per_step, count = weight_bytes(model)
    table.add("bf16", "parameters", f"{count / 1e9:.2f} B")
    table.add("bf16", "weight bytes", f"{total / GIB:.2f} GiB ({total / 1e9:.2f} GB)")
    table.add("bf16", "weight bytes read per decode step", f"{per_step / 1e9:.2f} GB")
    table.add("bf16", "HBM bandwidth", f"{gbps:,.0f} GB/s" if gbps else "unknown (--hbm-gbps)")
    vocab = model.config.get_text_config().vocab_size
    tokens = settings["prefill"]
    if left() > 330:
        log(f"bf16 prefill: batch 1 x {tokens} tokens, {settings['repeats']} timed run(s) after a warm-up ...")
        tps = measure_prefill(model, device, tokens, vocab, settings["repeats"])
        log(f"bf16 prefill: {tps:,.0f} tokens/s")
        table.add("bf16", f"prefill, 1 x {tokens} tokens", f"{tps:,.0f} tok/s")
    else:
        table.add("bf16", f"prefill, 1 x {tokens} tokens", "skipped: time")
    for batch in (1, 8, 32):
        metric = f"decode, batch {batch}"
        if left() < 290:
            table.add("bf16", metric, "skipped: time")
            continue
        log(f"bf16 decode: batch {batch}, greedy, {settings['decode']} steps after a 32-token prompt ...")
        tps, done, kv = measure_decode(model, device, batch, settings["decode"], vocab)
        bound = batch * gbps * 1e9 / (per_step + kv) if gbps else None
        log(f"bf16 decode: batch {batch}: {tps:,.1f} tokens/s over {done} steps")
        value = f"{tps:,.1f} tok/s ({1000 * batch / tps:.1f} ms/step, {done} steps)"
        if bound:
            value += f"; bound {bound:,.0f} tok/s (weights + {kv / 1e6:.1f} MB KV per step), {tps / bound:.0%} of it"
        table.add("bf16", metric, value)
    if device.type == "cuda":
        table.add("bf16", "peak GPU memory", f"{torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB")


# ---- section 2: fp8 weights under the cap, through the engine ----


def float8_linear(linear, device):
    """A bf16 nn.Linear -> (a weight-only float8_e4m3fn linear on `device` with one scale per tensor, the cast's
    relative error ||dequantized - bf16|| / ||bf16||). The forward dequantizes: it saves memory, not time."""
    import torch
    import torch.nn.functional as F

    class Float8Linear(torch.nn.Module):
        def __init__(self, weight, scale, bias) -> None:
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("scale", scale)
            self.bias = bias
            self.in_features, self.out_features = linear.in_features, linear.out_features

        def forward(self, x):
            out = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
            return out if self.bias is None else out + self.bias

    original = linear.weight.detach().to(device).float()
    scale = original.abs().amax().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    weight = (original / scale).to(torch.float8_e4m3fn)
    error = float((weight.float() * scale - original).norm() / original.norm().clamp(min=1e-12))
    bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return Float8Linear(weight, scale, bias), error


def cast_decoder_to_float8(model, device) -> tuple[int, float]:
    """Swap the decoder layers' nn.Linear modules for float8 ones on `device`, one at a time.
    (how many, the largest relative error of a cast weight: ||dequantized - bf16|| / ||bf16||)."""
    import torch

    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _DECODER_LINEAR.search(name)
    ]
    worst = 0.0
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        cast, error = float8_linear(getattr(parent, attr), device)
        worst = max(worst, error)
        setattr(parent, attr, cast)
    return len(targets), worst


def media_requests(tokenizer, max_new_tokens: int):
    """An image and an audio prompt, prepared by pipelines/prepare.py from bytes made here."""
    import io

    import numpy as np
    import soundfile as sf
    from PIL import Image

    from pipelines.engines.base import SamplingParams
    from pipelines.prepare import prepare_item
    from pipelines.prompts import Task, TaskOptions

    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([(x * 255 // 639), (y * 255 // 479), ((x + y) % 256)], axis=-1).astype(np.uint8)
    image = io.BytesIO()
    Image.fromarray(pixels).save(image, format="PNG")
    t = np.arange(16_000 * 10) / 16_000
    audio = io.BytesIO()
    sf.write(audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16_000, format="WAV")
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    caption = prepare_item(
        image.getvalue(),
        item_id="image",
        tokenizer=tokenizer,
        options=TaskOptions(task=Task.caption),
        sampling=sampling,
    )
    transcript = prepare_item(
        audio.getvalue(),
        item_id="audio",
        tokenizer=tokenizer,
        options=TaskOptions(task=Task.transcribe),
        sampling=sampling,
    )
    return caption.requests + transcript.requests


@contextmanager
def without_assistant(engine):
    assistant, engine.assistant = engine.assistant, None
    try:
        yield
    finally:
        engine.assistant = assistant


def load_engine(table: Table, directory: Path, device):
    """Our transformers engine on the checkpoint (bf16, on the CPU), then float8 decoder weights onto `device`."""
    import torch

    from pipelines.config import EngineSpec
    from pipelines.engines.transformers import TransformersEngine
    from pipelines.model_sources import ResolvedModel

    started = time.perf_counter()
    spec = EngineSpec(device="cpu", dtype="bfloat16", speculative=True, max_batch_size=1)
    engine = TransformersEngine(ResolvedModel("gemma-4-12b-it (random)", directory, directory / "assistant"), spec)
    log(f"fp8: engine loaded the bf16 checkpoint on the CPU in {engine.load_s:.1f}s; casting decoder weights ...")
    cast, error = cast_decoder_to_float8(engine.model, device)
    engine.model.to(device)
    engine.assistant.to(device)
    engine.device = device
    synchronize(device)
    elapsed = time.perf_counter() - started
    table.add(
        "fp8",
        "weights",
        f"float8_e4m3fn, one scale per tensor, {cast} decoder linears cast in this check "
        "(transformers' FineGrainedFP8 fetches its matmul kernel from the hub)",
    )
    table.add("fp8", "largest relative weight error of the cast", f"{error:.2%}")
    table.add("fp8", "engine load + cast + to device", f"{elapsed:.1f} s")
    if device.type == "cuda":
        table.add("fp8", "GPU memory after load", f"{torch.cuda.memory_allocated(device) / GIB:.2f} GiB")
    return engine


def section_media(table: Table, engine, device, max_new_tokens: int, planned: float | None) -> list:
    import torch

    requests = media_requests(engine.tokenizer, max_new_tokens)
    results = []
    with without_assistant(engine):
        for request in requests:
            log(
                f"fp8: {request.id} prompt: {request.prompt_tokens} tokens ({request.image_tokens} image, "
                f"{request.audio_tokens} audio) ..."
            )
            engine.generate([request])  # warm-up (kernels, allocator); the second run is timed
            (result,) = engine.generate([request])
            results.append(result)
            table.add(
                "fp8",
                f"{request.id} prompt",
                f"{request.prompt_tokens} tokens ({request.image_tokens} image, "
                f"{request.audio_tokens} audio) -> {result.output_tokens} tokens in {result.latency_s:.2f} s "
                f"({result.output_tokens / result.latency_s:.1f} tok/s)",
            )
    beside = f" (plan before KV cache: {planned:.2f} GiB)" if planned is not None else ""
    if device.type == "cuda":
        table.add(
            "fp8", "peak GPU memory (allocated)", f"{torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB{beside}"
        )
        table.add("fp8", "peak GPU memory (reserved)", f"{torch.cuda.max_memory_reserved(device) / GIB:.2f} GiB")
    else:
        table.add("fp8", "peak GPU memory (allocated)", f"- (CPU){beside}")
    return list(zip(requests, results))


def section_plan(table: Table, model: str) -> float:
    """plan's figures for fp8 on a 16 GiB card; its total before the KV cache, in GiB."""
    from pipelines.planning import plan

    figure = plan(model, gpu_memory_gib=CAP_GIB, quantization="fp8", engine="transformers", speculative=True)
    table.add("plan", "model", f"{model}, fp8, transformers, {CAP_GIB:g} GiB, max_model_len {figure.max_model_len}")
    table.add("plan", "weights + assistant", f"{figure.weights_gib:.2f} + {figure.assistant_gib:.2f} GiB")
    table.add("plan", "overhead (context, activations, logits)", f"{figure.overhead_gib:.2f} GiB")
    total = figure.weights_gib + figure.assistant_gib + figure.overhead_gib
    table.add(
        "plan",
        "total before KV cache",
        f"{total:.2f} GiB; KV budget {figure.kv_budget_gib:.2f} GiB = {figure.max_sequences} full-length sequence(s)",
    )
    return total


def section_speculation(table: Table, engine, pairs: list) -> None:
    identical, drafted, accepted, plain_tokens, plain_s, spec_tokens, spec_s = True, 0, 0, 0, 0.0, 0, 0.0
    for request, plain in pairs:
        if left() < 30:
            table.add("speculation", f"{request.id} prompt", "skipped: time")
            continue
        log(f"speculation: {request.id} prompt with the MTP assistant ...")
        engine.generate([request])  # warm-up of the assisted path
        (result,) = engine.generate([request])
        same = result.output_token_ids == plain.output_token_ids
        identical &= same
        drafted += result.spec_drafted or 0
        accepted += result.spec_accepted or 0
        plain_tokens, plain_s = plain_tokens + plain.output_tokens, plain_s + plain.latency_s
        spec_tokens, spec_s = spec_tokens + result.output_tokens, spec_s + result.latency_s
        if same:
            verdict = "identical"
        else:
            on, off = result.output_token_ids, plain.output_token_ids
            first = next((i for i, (x, y) in enumerate(zip(on, off)) if x != y), min(len(on), len(off)))
            verdict = f"DIFFERENT from token {first}"
        table.add(
            "speculation",
            f"{request.id} prompt",
            f"{verdict} greedy output; "
            f"drafted {result.spec_drafted}, accepted {result.spec_accepted}; "
            f"{result.output_tokens / result.latency_s:.1f} tok/s on vs "
            f"{plain.output_tokens / plain.latency_s:.1f} off",
        )
    if spec_s:
        table.add("speculation", "greedy output on vs off", "identical" if identical else "DIFFERENT")
        table.add(
            "speculation",
            "drafted / accepted",
            f"{drafted} / {accepted} ({accepted / max(drafted, 1):.0%}; "
            "random assistant weights: acceptance says nothing about the real one)",
        )
        table.add("speculation", "tokens/s on vs off", f"{spec_tokens / spec_s:.1f} vs {plain_tokens / plain_s:.1f}")


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    global TIME_BUDGET_S
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="2 layers, tiny widths, on CPU: every section")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth in GB/s (H100 SXM 3350, H200 4800)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prompt length for prefill (2048)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decode steps per batch size (128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per media/speculation request (32)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=TIME_BUDGET_S,
        help="seconds; sections that would not fit are skipped with a note (480)",
    )
    parser.add_argument("--workdir", default=None, help="where the random checkpoint is written (a temp folder)")
    args = parser.parse_args(argv)
    TIME_BUDGET_S = args.time_budget

    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)} (README, 'GPU check', brings them)")
        return 2
    import torch
    import transformers

    if not hasattr(transformers, "Gemma4UnifiedForConditionalGeneration"):
        print(f"gpu_check: transformers {transformers.__version__} has no Gemma 4 Unified; install 5.20 or later")
        return 2

    if args.dry_run:
        device, name = torch.device("cpu"), "CPU (dry run)"
        settings = dict(
            prefill=args.prefill_tokens or 64,
            decode=args.decode_tokens or 4,
            repeats=1,
            new_tokens=args.new_tokens or 6,
        )
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible, nothing to measure (use --dry-run to check the code path on CPU).")
            return 0
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        settings = dict(
            prefill=args.prefill_tokens or 2048,
            decode=args.decode_tokens or 128,
            repeats=3,
            new_tokens=args.new_tokens or 32,
        )
        torch.backends.cuda.matmul.allow_tf32 = True
    gbps = bandwidth_for(name, args.hbm_gbps) if device.type == "cuda" else args.hbm_gbps

    table = Table()
    table.add("setup", "device", name)
    table.add("setup", "versions", f"torch {torch.__version__}, transformers {transformers.__version__}")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(table, args, device, settings, gbps, workdir)
        failed = False
    except Exception as exc:  # a section failed: the table still shows what was measured
        traceback.print_exc()
        log(f"stopped: {type(exc).__name__}: {exc}")
        table.add("error", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        failed = True
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        table.add("setup", "total time", f"{time.perf_counter() - STARTED:.0f} s (budget {TIME_BUDGET_S:.0f} s)")
        table.print()
        if args.dry_run:
            print("\n(dry run: 2 layers, tiny widths, on CPU; the numbers only show that every section runs)")
    return 1 if failed else 0


def run(table: Table, args, device, settings: dict, gbps: float | None, workdir: Path) -> None:
    import gc

    import torch
    from transformers import Gemma4UnifiedAssistantForCausalLM, Gemma4UnifiedForConditionalGeneration

    text_layers = "2" if args.dry_run else "48"
    log(f"device: {table.rows[0][2]}; checkpoint ({text_layers} layers) in {workdir}")
    tokenizer, config, assistant_config = write_configs(workdir, args.dry_run)
    log(f"building the target in bfloat16 on {device.type} ...")
    model = build(Gemma4UnifiedForConditionalGeneration, config, device)
    generation_ids(model, tokenizer)
    if device.type == "cuda":
        log(f"built: GPU memory allocated {torch.cuda.memory_allocated(device) / GIB:.1f} GiB")
    section_bf16(table, model, device, settings, gbps)
    if left() < 210:  # writing and loading 25 GB takes minutes: leave the rest out rather than overrun
        del model
        for section, metric in (("fp8", "engine, image and audio prompts"), ("speculation", "on vs off")):
            table.add(section, metric, "skipped: time")
        return

    log("writing the random checkpoint (target + assistant) for the engine ...")
    started = time.perf_counter()
    model.save_pretrained(workdir)
    del model
    gc.collect()
    assistant = build(Gemma4UnifiedAssistantForCausalLM, assistant_config, device)
    generation_ids(assistant, tokenizer)
    assistant.save_pretrained(workdir / "assistant")
    del assistant
    gc.collect()
    table.add("setup", "checkpoint written", f"{time.perf_counter() - started:.1f} s")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, CAP_GIB * GIB / torch.cuda.get_device_properties(device).total_memory), device
        )
        torch.cuda.reset_peak_memory_stats(device)
        table.add("fp8", "memory cap", f"{CAP_GIB:g} GiB (torch.cuda.set_per_process_memory_fraction)")
    else:
        table.add("fp8", "memory cap", "- (CPU)")

    planned = section_plan(table, str(workdir) if args.dry_run else "gemma-4-12b-it")
    if left() < 120:
        for section, metric in (("fp8", "engine, image and audio prompts"), ("speculation", "on vs off")):
            table.add(section, metric, "skipped: time")
        return
    engine = load_engine(table, workdir, device)
    if left() < 60:
        for section, metric in (("fp8", "image and audio prompts"), ("speculation", "on vs off")):
            table.add(section, metric, "skipped: time")
        return
    pairs = section_media(table, engine, device, settings["new_tokens"], planned)
    section_speculation(table, engine, pairs)


if __name__ == "__main__":
    sys.exit(main())
