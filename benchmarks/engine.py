"""Transformers engine throughput on the tiny model (CPU), beside a naive one-request-at-a-time loop.

    python benchmarks/engine.py [--requests 16] [--new-tokens 32]

The naive loop is what a user writes first: transformers' processor and `model.generate` per request. The engine
runs the same requests from prepared rows at batch sizes 1, 4 and 16 (greedy, no speculation), and once more with
the MTP assistant. Model load time is measured too.
"""

from __future__ import annotations

import os
import sys

# Run as a script, the project imports from this checkout: the repo root goes first on the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from pipelines.config import EngineSpec
from pipelines.engines.base import SamplingParams
from pipelines.engines.transformers import TransformersEngine
from pipelines.model_sources import resolve
from pipelines.prepare import prepare_item
from pipelines.prompts import Task, TaskOptions, build_messages, render

PROMPTS = [
    "Describe the scene.", "Write a haiku about the sea.", "List three fruits.", "Why is the sky blue?",
    "Summarise the plot of a detective story in two sentences.", "Translate 'good morning' into French.",
    "What is 12 times 7?", "Name a famous painter and one of their works.",
]  # fmt: skip


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def workload(tokenizer, count: int, new_tokens: int):
    """Half text prompts of different lengths, half image captions."""
    sampling = SamplingParams(max_new_tokens=new_tokens)
    requests, raw = [], []
    for index in range(count):
        if index % 2:
            options = TaskOptions(task=Task.caption)
            data, name, media = png(index), "a.png", ["image"]
        else:
            options = TaskOptions(task=Task.prompt, prompt=PROMPTS[index % len(PROMPTS)] * (1 + index % 3))
            data, name, media = b"Context.", "n.txt", []
        item = prepare_item(
            data, item_id=f"r{index}", name=name, tokenizer=tokenizer, options=options, sampling=sampling
        )
        requests += item.requests
        raw.append((options, data, media))
    return requests, raw


def naive_loop(engine: TransformersEngine, processor, raw, new_tokens: int) -> tuple[float, int]:
    tokens, started = 0, time.perf_counter()
    for options, data, media in raw:
        if media:
            text = render(engine.tokenizer, build_messages(options, media))
            inputs = processor(
                text=text, images=[Image.open(io.BytesIO(data))], add_special_tokens=False, return_tensors="pt"
            )
        else:
            from dataclasses import replace

            text = render(
                engine.tokenizer, build_messages(replace(options, prompt=f"Context.\n\n{options.prompt}"), [])
            )
            inputs = processor(text=text, add_special_tokens=False, return_tensors="pt")
        inputs.pop("num_soft_tokens_per_image", None)
        with torch.inference_mode():
            output = engine.model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=sorted(engine.stop_ids),
                pad_token_id=0,
            )
        tokens += output.shape[1] - inputs["input_ids"].shape[1]
    return time.perf_counter() - started, tokens


def timed(engine: TransformersEngine, requests) -> tuple[float, int]:
    started = time.perf_counter()
    results = engine.generate(requests)
    return time.perf_counter() - started, sum(r.output_tokens for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (this machine has 2 cores).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor

    model = resolve("tiny")
    started = time.perf_counter()
    plain = TransformersEngine(model, EngineSpec(speculative=False, max_batch_size=1))
    load_s = time.perf_counter() - started
    processor = AutoProcessor.from_pretrained(model.path)
    requests, raw = workload(plain.tokenizer, args.requests, args.new_tokens)
    plain.generate(requests[:2])  # warm-up

    table = Table(
        title=f"transformers engine, tiny model, {args.requests} requests x {args.new_tokens} new tokens "
        f"(CPU, {args.threads} threads)"
    )
    for column in ("mode", "wall s", "output tokens", "tokens/s", "vs naive"):
        table.add_column(column, justify="right")
    naive_s, naive_tokens = naive_loop(plain, processor, raw, args.new_tokens)
    baseline = naive_tokens / naive_s
    table.add_row("naive loop (processor + generate)", f"{naive_s:.2f}", str(naive_tokens), f"{baseline:.1f}", "1.00x")
    for size in (1, 4, 16):
        plain.spec = EngineSpec(speculative=False, max_batch_size=size)
        wall, tokens = timed(plain, requests)
        table.add_row(
            f"engine, batch {size}",
            f"{wall:.2f}",
            str(tokens),
            f"{tokens / wall:.1f}",
            f"{tokens / wall / baseline:.2f}x",
        )
    speculative = TransformersEngine(model, EngineSpec(speculative=True))
    wall, tokens = timed(speculative, requests)
    table.add_row(
        "engine, MTP speculation (batch 1)",
        f"{wall:.2f}",
        str(tokens),
        f"{tokens / wall:.1f}",
        f"{tokens / wall / baseline:.2f}x",
    )
    console = Console()
    console.print(table)
    console.print(
        f"model load: {load_s:.2f} s (tiny model from local disk; includes the tokenizer). The tiny "
        "assistant's weights are random, so speculation accepts almost nothing here: its row shows the "
        "drafting overhead, not the speed-up a trained drafter gives."
    )


if __name__ == "__main__":
    main()
