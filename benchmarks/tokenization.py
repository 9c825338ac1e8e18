"""CPU tokenization throughput per core: ours beside transformers' processors, same inputs, same run.

    python benchmarks/tokenization.py [--seconds 3]

Both sides run on one thread (torch.set_num_threads(1)), so the numbers are per core. Every measured image is
also checked bit for bit against the transformers output. Peak memory per image is measured in a fresh
subprocess (max RSS growth while preparing one image).
"""

from __future__ import annotations

import os
import sys

# Run as a script, the project imports from this checkout: the repo root goes first on the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

import argparse
import io
import json
import subprocess
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table


def photo_jpeg(height: int, width: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth gradients, shapes and sensor noise (random noise alone decodes unrealistically slow)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / (60 + 25 * c) + y / (90 + 10 * c)) for c in range(3)], axis=-1)
    base += rng.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(10, max(11, width // 6)))
        draw.ellipse([x0, y0, x0 + size, y0 + size], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rate(fn, seconds: float) -> float:
    fn()  # warm-up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - started)


def bit_exact(data: bytes, reference) -> bool:
    from pipelines.media.image import prepare_image

    ours = prepare_image(data)
    expected = reference(images=Image.open(io.BytesIO(data)), return_tensors="pt")
    n = int(expected["num_soft_tokens_per_image"][0])
    return n == ours.tokens and torch.equal(torch.from_numpy(ours.patches) * (1 / 255), expected["pixel_values"][0, :n])


_MEMORY_PROBE = """
import os, sys, threading, torch
torch.set_num_threads(1)
from pipelines.media.image import prepare_image
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
data = open(sys.argv[1], "rb").read()
prepare_image(data)  # warm-up: allocator pools and lazy imports are not per-image cost
baseline, peak, running = rss(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
threading.Thread(target=sample, daemon=True).start()
prepared = prepare_image(data)
running[0] = False
print((max(peak[0], rss()) - baseline) / 2**20)
"""


def peak_memory_mb(data: bytes) -> float:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".jpg") as handle:
        handle.write(data)
        handle.flush()
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_PROBE, handle.name], capture_output=True, text=True, check=True
        )
    return float(out.stdout.strip().splitlines()[-1])


def audio_flac(seconds: float, rate_hz: int = 44_100) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate_hz)) / rate_hz
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, stereo.astype(np.float32), rate_hz, format="FLAC")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="Measuring time per cell.")
    parser.add_argument("--json", action="store_true", help="Print the numbers as JSON too.")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import soundfile as sf
    import soxr
    from transformers.models.gemma4_unified import Gemma4UnifiedAudioFeatureExtractor, Gemma4UnifiedImageProcessor

    from pipelines.media.audio import prepare_audio
    from pipelines.media.image import prepare_image

    reference = Gemma4UnifiedImageProcessor()
    table = Table(title="Tokenization per core (1 thread)")
    for column in ("input", "transformers", "ours", "speed-up", "bit-exact", "peak MB / image (ours)"):
        table.add_column(column, justify="right")
    numbers = {}
    for label, (height, width) in {"JPEG 1024x768": (768, 1024), "JPEG 4000x3000": (3000, 4000)}.items():
        data = photo_jpeg(height, width)
        theirs = rate(
            lambda data=data: reference(images=Image.open(io.BytesIO(data)), return_tensors="pt"), args.seconds
        )
        ours = rate(lambda data=data: prepare_image(data), args.seconds)
        exact = bit_exact(data, reference)
        memory = peak_memory_mb(data)
        numbers[label] = {"transformers_per_s": theirs, "ours_per_s": ours, "bit_exact": exact, "peak_mb": memory}
        table.add_row(
            label,
            f"{theirs:.1f} img/s",
            f"{ours:.1f} img/s",
            f"{ours / theirs:.1f}x",
            "yes" if exact else "NO",
            f"{memory:.0f}",
        )

    clip_s = 60.0
    flac = audio_flac(clip_s)
    extractor = Gemma4UnifiedAudioFeatureExtractor()

    def baseline_audio():
        wave, sr = sf.read(io.BytesIO(flac), dtype="float32")
        mono = soxr.resample(wave.mean(axis=1), sr, 16_000, quality="HQ")
        for start in range(0, len(mono), 480_000):
            extractor(mono[start : start + 480_000], return_tensors="np")

    theirs = rate(baseline_audio, args.seconds) * clip_s
    ours = rate(lambda: [w.frames for w in prepare_audio(flac).windows], args.seconds) * clip_s
    numbers["FLAC 44.1 kHz stereo"] = {"transformers_audio_s_per_s": theirs, "ours_audio_s_per_s": ours}
    table.add_row(
        "FLAC 44.1 kHz stereo, 60 s",
        f"{theirs:.0f} audio s/s",
        f"{ours:.0f} audio s/s",
        f"{ours / theirs:.1f}x",
        "frames equal (tests)",
        "-",
    )
    Console().print(table)
    print(
        "transformers' audio baseline: soundfile decode + soxr HQ resample + Gemma4UnifiedAudioFeatureExtractor "
        "per 30 s window (the extractor itself neither decodes nor resamples)."
    )
    if args.json:
        print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
