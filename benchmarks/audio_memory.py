"""Peak memory per audio file: a 4-hour recording beside a 1-minute one, streamed windows beside a one-shot decode.

    python benchmarks/audio_memory.py [--hours 4]

The files are MP3 (22.05 kHz mono, 48 kbit/s CBR, like a spoken-word podcast): one minute is encoded once and
repeated, which is a valid MP3 (a stream of self-delimiting frames) of any length in a second. Each cell runs in a
fresh process that reads the file from disk; memory is that process's peak RSS (VmHWM) minus its RSS after imports
and a warm-up on a one-second clip, so only what the file costs is counted.

- one-shot decode (baseline): soundfile.read of the whole file, channel mean, soxr HQ to 16 kHz, 640-sample frames.
- AudioStream: ours, windows decoded and handed on one at a time (what `inspect` does).
- prepare_audio: ours, every window kept (what one endpoint request over the whole clip holds).
- batch Prepare stage: ours, the Ray Data stage over the file, each yielded block dropped once counted (downstream
  stages take one window per unit; the windows are stitched into the clip's row after the run).
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
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

RATE = 22_050

_PROBE = r"""
import json, sys, time
import numpy as np

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))

method, path, warmup = sys.argv[1:4]
LIMIT = 24 * 3600.0  # the default limit is 4 h: the long file is a few seconds over it

def one_shot(source):
    import soundfile as sf, soxr
    from pipelines.media.audio import frames
    x, rate = sf.read(source, dtype="float32", always_2d=True)
    mono = soxr.resample(x.mean(axis=1), rate, 16000, quality="HQ")
    windows = [frames(mono[i : i + 480000]) for i in range(0, len(mono), 480000)]
    return sum(len(w) for w in windows), len(mono) / 16000

def stream(source):
    from pipelines.media.audio import AudioStream
    clip = AudioStream(open(source, "rb"), max_duration_s=LIMIT)
    return sum(len(window.frames) for window in clip), clip.duration_s

def prepare(source):
    from pipelines.media.audio import prepare_audio
    with open(source, "rb") as handle:
        prepared = prepare_audio(handle.read(), max_duration_s=LIMIT)
    return sum(len(window.frames) for window in prepared.windows), prepared.duration_s

def batch(source):
    import os, tempfile
    from pipelines.config import InputSpec, JobSpec, MediaSpec, OutputSpec, TaskSpec
    from pipelines.stages import Prepare
    folder = tempfile.mkdtemp()
    job = JobSpec(input=InputSpec(url=os.path.dirname(source)), output=OutputSpec(url=folder),
                  task=TaskSpec(task="transcribe", language="English"), media=MediaSpec(max_audio_s=LIMIT))
    tokens = end = 0
    for part in Prepare(job)({"id": [os.path.basename(source)], "uri": [source], "container": ["file"]}):
        tokens += sum(len(frames) for frames in part["audio_frames"])
        end = max([end] + [json.loads(spans)[-1][1] for spans in part["segments_in"]])
    return tokens, end

run = {"one-shot": one_shot, "stream": stream, "prepare": prepare, "batch": batch}[method]
run(warmup)  # imports, allocator pools, codec tables: not per-file cost
idle = status("VmRSS")
started = time.perf_counter()
tokens, duration = run(path)
elapsed = time.perf_counter() - started
print(json.dumps({"peak_mb": (status("VmHWM") - idle) / 2**20, "idle_mb": idle / 2**20, "tokens": tokens,
                  "duration_s": duration, "seconds": elapsed}))
"""

METHODS = {
    "one-shot": "one-shot decode (baseline)",
    "stream": "AudioStream (ours)",
    "prepare": "prepare_audio (ours)",
    "batch": "batch Prepare stage (ours)",
}
WIDTH = 150


def mp3_minute(seconds: float = 60.0) -> bytes:
    """A CBR MP3 with no Xing or ID3 header, so copies of it concatenate into one valid stream."""
    import av

    t = np.arange(int(seconds * RATE)) / RATE
    voice = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t))
    noise = np.random.default_rng(0).normal(0, 0.02, len(t))
    buffer = io.BytesIO()
    options = {"write_xing": "0", "id3v2_version": "0"}
    with av.open(buffer, "w", format="mp3", options=options) as container:
        stream = container.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.bit_rate = 48_000
        frame = av.AudioFrame.from_ndarray((voice + noise).astype(np.float32)[None], format="fltp", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def measure(method: str, path: Path, warmup: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, method, str(path), str(warmup)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if out.returncode:
        raise SystemExit(f"{method} on {path.name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=4.0, help="Length of the long file.")
    parser.add_argument("--json", action="store_true", help="Print the numbers as JSON too.")
    args = parser.parse_args()

    minute = mp3_minute()
    numbers = {}
    with tempfile.TemporaryDirectory() as folder:
        warmup = Path(folder, "warmup.mp3")
        warmup.write_bytes(mp3_minute(1.0))
        files = {"1 minute": 1, f"{args.hours:g} hours": round(args.hours * 60)}
        table = Table(title="Peak memory per audio file (RSS growth over an idle process, MP3 22.05 kHz mono)")
        for column in ("file", "size", *METHODS.values(), "audio tokens"):
            table.add_column(column, justify="right")
        for label, copies in files.items():
            path = Path(folder, f"{copies}.mp3")
            with open(path, "wb") as handle:
                for _ in range(copies):
                    handle.write(minute)
            cells = {method: measure(method, path, warmup) for method in METHODS}
            numbers[label] = cells
            tokens = {cell["tokens"] for cell in cells.values()}  # one value when all four agree
            table.add_row(
                label,
                f"{path.stat().st_size / 2**20:.1f} MB",
                *(f"{cell['peak_mb']:.0f} MB, {cell['seconds']:.1f} s" for cell in cells.values()),
                " / ".join(str(n) for n in sorted(tokens)),
            )
    Console(width=WIDTH).print(table)
    print(
        f"Idle process RSS after imports: {numbers['1 minute']['stream']['idle_mb']:.0f} MB; seconds: wall time "
        "of the decode. All four give the same audio tokens."
    )
    if args.json:
        print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
