"""How fast can one GPU run a full-size Gemma 4 12B Unified through transformers? Random weights, no download.

Builds the model directly on the GPU in bfloat16, then measures prefill throughput (batch 1 x 2048 tokens),
single-stream greedy decode (128 tokens, a plain cached loop) and compares decode with the memory-bandwidth bound
(weight bytes read per token / HBM bandwidth). Finishes within about 8 minutes and prints a table.

    python benchmarks/gpu_check.py                      # needs CUDA; exits 0 with a note otherwise
    python benchmarks/gpu_check.py --hbm-gbps 2000      # bandwidth for cards it does not know
    python benchmarks/gpu_check.py --dry-run            # 2 layers on CPU: checks the code path anywhere
"""

from __future__ import annotations

import os
import sys

# Put the repo root, not this folder, first on the path: a benchmark module here may shadow a standard library
# module (tokenize.py did, and `import torch` imports tokenize), and `pipelines` must be importable.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse  # noqa: E402
import time  # noqa: E402

STARTED = time.perf_counter()
TIME_BUDGET_S = 8 * 60

# Published facts (48 layers, hidden 3840, vocab 262144, sliding window 1024, a global layer every 6th with head
# dim 512). Head counts and MLP width are not in transformers' defaults (those describe a smaller model): these are
# assumptions, Gemma 3 12B's shape plus key=value global layers with 4 KV heads, which gives exactly the published
# 11.95B language-model parameters.
KNOWN = dict(num_hidden_layers=48, hidden_size=3840, vocab_size=262_144, sliding_window=1024, global_head_dim=512)
ASSUMED = dict(
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    intermediate_size=15_360,
    attention_k_eq_v=True,
    num_global_key_value_heads=4,
)

# HBM bandwidth in GB/s by device name (first match wins).
BANDWIDTH = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0)]


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def left() -> float:
    return TIME_BUDGET_S - (time.perf_counter() - STARTED)


def build(device, layers: int):
    import torch
    from transformers import (
        Gemma4UnifiedAudioConfig,
        Gemma4UnifiedConfig,
        Gemma4UnifiedForConditionalGeneration,
        Gemma4UnifiedTextConfig,
        Gemma4UnifiedVisionConfig,
    )

    # Every 6th layer global, and the last one always (so a 2-layer dry run still has both kinds).
    layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    layer_types[-1] = "full_attention"
    text = Gemma4UnifiedTextConfig(**{**KNOWN, "num_hidden_layers": layers}, **ASSUMED, layer_types=layer_types)
    config = Gemma4UnifiedConfig(
        text_config=text, vision_config=Gemma4UnifiedVisionConfig(), audio_config=Gemma4UnifiedAudioConfig()
    )
    # Allocate straight on the device in bf16: no 48 GB fp32 copy in host RAM. Init is transformers' own
    # (normal, std 0.02), run on the device, so it takes seconds.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma4UnifiedForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), config


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
            if left() < 150:
                break
    return tokens / min(times)


def measure_decode(model, device, steps: int, vocab: int, prompt: int = 32) -> tuple[float, int]:
    """Greedy single-stream decode with the KV cache: tokens/s over `steps` forward passes of one token."""
    import torch
    from transformers import DynamicCache

    def run(n: int) -> tuple[float, int]:
        cache = DynamicCache(config=model.config.get_text_config())
        ids = torch.randint(3, vocab, (1, prompt), device=device)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        started = time.perf_counter()
        done = 0
        for _ in range(n):
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)  # greedy; stays on the device, no host sync per step
            done += 1
            if left() < 60:
                break
        synchronize(device)
        return time.perf_counter() - started, done

    with torch.inference_mode():
        run(min(8, steps))  # warm-up
        elapsed, done = run(steps)
    return done / elapsed, done


def bandwidth_for(name: str, flag: float | None) -> float | None:
    if flag:
        return flag
    for key, gbps in BANDWIDTH:
        if key in name:
            return gbps
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="2 layers on CPU, short runs: checks the code path")
    parser.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth in GB/s (H100 SXM 3350, H200 4800)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="prompt length for prefill (2048)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens to decode (128)")
    args = parser.parse_args(argv)

    import torch

    if args.dry_run:
        device, layers = torch.device("cpu"), 2
        prefill, decode, repeats = args.prefill_tokens or 64, args.decode_tokens or 4, 1
        name = "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU visible, nothing to measure (use --dry-run to check the code path on CPU).")
            return 0
        device, layers = torch.device("cuda"), KNOWN["num_hidden_layers"]
        prefill, decode, repeats = args.prefill_tokens or 2048, args.decode_tokens or 128, 3
        name = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = True

    log(f"device: {name}; torch {torch.__version__}")
    log(f"known config: {KNOWN}")
    log(f"assumed (not published; override by editing ASSUMED): {ASSUMED}")
    log(f"building {layers} layers in bfloat16 on {device.type} ...")
    model, config = build(device, layers)
    total, per_token, count = weight_bytes(model)
    log(f"built: {count / 1e9:.2f}B parameters, {total / 1e9:.2f} GB of weights")
    if device.type == "cuda":
        log(f"GPU memory allocated: {torch.cuda.memory_allocated(device) / 1e9:.1f} GB")

    vocab = config.text_config.vocab_size
    log(f"prefill: batch 1 x {prefill} tokens, {repeats} timed run(s) after a warm-up ...")
    prefill_tps = measure_prefill(model, device, prefill, vocab, repeats)
    log(f"prefill: {prefill_tps:,.0f} tokens/s")

    log(f"decode: greedy, {decode} tokens after a 32-token prompt ...")
    decode_tps, done = measure_decode(model, device, decode, vocab)
    log(f"decode: {decode_tps:.1f} tokens/s over {done} tokens")

    gbps = bandwidth_for(name, args.hbm_gbps) if device.type == "cuda" else args.hbm_gbps
    bound = gbps * 1e9 / per_token if gbps else None
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    if gbps is None and device.type == "cuda":
        log(f"unknown HBM bandwidth for {name!r}: pass --hbm-gbps to get the bound and the achieved fraction")

    rows = [
        ("device", name),
        ("layers", f"{layers}"),
        ("parameters", f"{count / 1e9:.2f} B"),
        ("weight bytes (bf16)", f"{total / 1e9:.2f} GB"),
        ("bytes read per decode step", f"{per_token / 1e9:.2f} GB"),
        ("peak GPU memory", f"{peak:.1f} GB" if peak else "-"),
        (f"prefill, 1 x {prefill} tokens", f"{prefill_tps:,.0f} tok/s"),
        (f"decode, greedy, {done} tokens", f"{decode_tps:.1f} tok/s ({1000 / decode_tps:.1f} ms/token)"),
        ("HBM bandwidth", f"{gbps:,.0f} GB/s" if gbps else "unknown (--hbm-gbps)"),
        ("decode bound (bandwidth / bytes per step)", f"{bound:.1f} tok/s" if bound else "-"),
        ("achieved fraction of the bound", f"{decode_tps / bound:.1%}" if bound else "-"),
        ("total time", f"{time.perf_counter() - STARTED:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"{'metric'.ljust(width)} | value")
    print(f"{'-' * width}-|-{'-' * 40}")
    for key, value in rows:
        print(f"{key.ljust(width)} | {value}")
    if args.dry_run:
        print("\n(dry run: 2 layers on CPU; the numbers only show that the code path works)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
