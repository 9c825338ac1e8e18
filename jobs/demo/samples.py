"""Sample media for the demo and for first-time users: images, a spoken clip and a small PDF."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPEECH = "The quick brown fox jumps over the lazy dog. Gemma listens, looks and reads."


def _gradient(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    rgb = np.stack([127 + 120 * np.sin(x / (40 + 30 * c) + y / 90 + phase[c]) for c in range(3)], axis=-1)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        size = int(rng.integers(20, max(21, min(height, width) // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x0, y0, x0 + size, y0 + size], fill=color)
    return image


def speech(path: Path) -> Path:
    """A spoken sentence from espeak-ng when installed, else a synthetic voice-like signal (16 kHz WAV)."""
    import soundfile as sf

    if shutil.which("espeak-ng"):
        result = subprocess.run(["espeak-ng", "-w", str(path), SPEECH], capture_output=True, timeout=60)
        if result.returncode == 0 and path.exists() and path.stat().st_size > 44:
            return path
    rate = 16_000
    t = np.arange(int(rate * 4.5)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / rate) / k for k in range(1, 6))
    envelope = (np.sin(2 * np.pi * 3 * t) > -0.3).astype(np.float32)
    sf.write(path, (0.2 * voice * envelope).astype(np.float32), rate)
    return path


def document(path: Path, pages: int = 3) -> Path:
    images = []
    for page in range(pages):
        sheet = Image.new("RGB", (612, 792), "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((72, 72), f"Quarterly report, page {page + 1}", fill="black")
        for line in range(20):
            draw.text((72, 110 + 28 * line), f"Line {line + 1}: revenue grew {3 + line % 7} percent.", fill="black")
        images.append(sheet)
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72)
    return path


def make_images(directory: str | Path, count: int = 3, *, start: int = 0) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = [(768, 1024, "JPEG"), (480, 640, "PNG"), (900, 600, "WEBP")]
    files = []
    for index in range(start, start + count):
        height, width, fmt = shapes[index % len(shapes)]
        path = directory / f"image_{index}.{fmt.lower().replace('jpeg', 'jpg')}"
        _gradient(height, width, seed=index).save(path, fmt)
        files.append(path)
    return files


def make_samples(directory: str | Path) -> list[Path]:
    """Three images, a spoken clip and a three-page PDF, side by side in one directory."""
    directory = Path(directory)
    files = make_images(directory)
    files.append(speech(directory / "speech.wav"))
    files.append(document(directory / "report.pdf"))
    return files
