"""The one-shot reference decode and the comparison every audio test file goes through.

The reference decodes a whole file in one call, soundfile (libsndfile) when that works and gives samples, else PyAV
(FFmpeg), and normalises it in one go: channel mean, NaN/inf cleaned and clipped, soxr HQ to 16 kHz, clipped. Ours
streams decoder blocks into windows. They must agree on every file: durations within one 640-sample frame, identical
frames whenever the same decoder did the work, and a file the reference cannot decode is a DecodeError naming it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from pipelines.errors import DecodeError
from pipelines.media import audio
from pipelines.media.audio import FRAME, SAMPLE_RATE, AudioStream, frames, window_spans

# A one-shot read allocates what the header claims; past this, "soundfile.read in one call" counts as failed.
ONE_SHOT_BUDGET = 1 << 30


@dataclass(frozen=True)
class Reference:
    decoder: str  # "soundfile" or "PyAV", as AudioStream.decoder names them
    samples: np.ndarray  # 16 kHz mono float32


def normalise(x: np.ndarray, rate: int) -> np.ndarray:
    mono = x.mean(axis=1)
    np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.clip(mono, -1.0, 1.0, out=mono)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality=audio.RESAMPLE_QUALITY)
    return np.clip(mono, -1.0, 1.0)


def one_shot(data: bytes) -> Reference | None:
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.frames * f.channels * 4 > ONE_SHOT_BUDGET:
                raise MemoryError(f"the header claims {f.frames} frames")
            x, rate = f.read(dtype="float32", always_2d=True), f.samplerate
        if len(x):
            return Reference("soundfile", normalise(x, rate))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, MemoryError):
        pass
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp")
            planes, rate = [], None
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                planes += [out.to_ndarray() for out in resampler.resample(frame)]
            planes += [out.to_ndarray() for out in resampler.resample(None)]
        if planes and sum(p.shape[1] for p in planes):
            return Reference("PyAV", normalise(np.concatenate(planes, axis=1).T, rate))
    except (av.FFmpegError, ValueError, OSError, IndexError):
        pass
    return None


def check_against_one_shot(data: bytes, name: str, *, same_decoder: bool = True) -> AudioStream | None:
    """Ours vs the reference on one file; returns our stream, iterated (None when both refuse the file)."""
    reference = one_shot(data)
    clip = AudioStream(data, item=name)
    if reference is None:
        with pytest.raises(DecodeError) as info:
            list(clip)
        assert info.value.item == name and name in str(info.value)
        return None
    windows = list(clip)
    ours = np.concatenate([w.samples for w in windows])
    assert abs(len(ours) - len(reference.samples)) <= FRAME, (len(ours), len(reference.samples))
    assert clip.duration_s == len(ours) / SAMPLE_RATE
    assert [(round(w.start_s * SAMPLE_RATE), round(w.end_s * SAMPLE_RATE)) for w in windows] == window_spans(len(ours))
    if same_decoder:
        assert clip.decoder == reference.decoder
    if clip.decoder == reference.decoder:
        assert np.array_equal(frames(ours), frames(reference.samples))
    clip.tokens = sum(w.tokens for w in windows)
    return clip
