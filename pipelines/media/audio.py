"""Audio -> 16 kHz mono float32 cut into windows of at most 30 s, each chunked into 640-sample frames.

Gemma 4 Unified has no audio encoder front end: one soft token is 640 raw samples (40 ms at 16 kHz), exactly as
transformers' `Gemma4UnifiedAudioFeatureExtractor` chunks them. That extractor neither resamples nor scales, so
decoding here does both: soundfile (libsndfile: WAV, FLAC, OGG, MP3, ...) first, PyAV (FFmpeg: M4A, AAC, Opus in
WebM, audio tracks of video files, ...) for the rest; channels averaged to mono; soxr "HQ" resampling, the same
default librosa and python-soxr use. Decoding streams block by block, so memory stays near the size of the 16 kHz
output, and the duration limit is checked from the header before the first block and again while reading.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np
import soundfile as sf
import soxr

from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded, UnsupportedInput

SAMPLE_RATE = 16000
FRAME = 640
MAX_WINDOW_S = 30.0
DEFAULT_MAX_DURATION_S = 4 * 3600.0
RESAMPLE_QUALITY = "HQ"

# Rates outside this range are hostile or broken headers: a 1 Hz file of 20,000 frames claims 5.5 hours.
_MIN_RATE, _MAX_RATE = 1000, 768_000
_BLOCK = 1 << 18  # input frames per block
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX when the length is unknown


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 [n], mono, 16 kHz, in [-1, 1]
    sample_rate_in: int
    channels_in: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class AudioWindow:
    index: int
    start_s: float
    end_s: float
    samples: np.ndarray

    @property
    def tokens(self) -> int:
        return -(-len(self.samples) // FRAME)

    @property
    def frames(self) -> np.ndarray:
        return frames(self.samples)


@dataclass(frozen=True)
class PreparedAudio:
    duration_s: float
    sample_rate_in: int
    channels_in: int
    windows: list[AudioWindow]

    @property
    def tokens(self) -> int:
        return sum(window.tokens for window in self.windows)


class _Sink:
    """Mixes blocks to mono, resamples them as one stream and enforces the duration limit on what is read."""

    def __init__(self, rate: int, channels: int, max_duration_s: float, item: str | None) -> None:
        if not _MIN_RATE <= rate <= _MAX_RATE:
            raise UnsupportedInput(f"sample rate {rate} Hz is outside {_MIN_RATE}-{_MAX_RATE} Hz", item=item)
        if channels < 1:
            raise DecodeError("audio has no channels", item=item)
        self.rate, self.channels, self.item = rate, channels, item
        self.max_duration_s = max_duration_s
        self.read = 0
        self.parts: list[np.ndarray] = []
        self.stream = None
        if rate != SAMPLE_RATE:
            self.stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def check_frames(self, frames: int) -> None:
        if frames > self.max_duration_s * self.rate:
            raise LimitExceeded(
                f"audio is {frames / self.rate:.1f} s long, over the limit of {self.max_duration_s:g} s",
                item=self.item,
            )

    def add(self, block: np.ndarray) -> None:
        """block: float32 [n, channels]."""
        self.read += len(block)
        self.check_frames(self.read)
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else np.ascontiguousarray(block[:, 0])
        # Float files may hold NaN, inf or values far outside [-1, 1]; clean them before the filter spreads them.
        np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(mono, -1.0, 1.0, out=mono)
        self._emit(mono if self.stream is None else self.stream.resample_chunk(mono, last=False))

    def finish(self) -> DecodedAudio:
        if self.stream is not None:
            self._emit(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))
        samples = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        if len(samples) == 0:
            raise DecodeError("audio has no samples", item=self.item)
        np.clip(samples, -1.0, 1.0, out=samples)  # resampling overshoots a little near full scale
        return DecodedAudio(samples=samples, sample_rate_in=self.rate, channels_in=self.channels)

    def _emit(self, mono: np.ndarray) -> None:
        if len(mono):
            self.parts.append(mono)


def decode_audio(
    data: bytes, *, item: str | None = None, max_duration_s: float = DEFAULT_MAX_DURATION_S
) -> DecodedAudio:
    """Any audio file's bytes -> 16 kHz mono float32 in [-1, 1], with the input's rate and channel count."""
    if not max_duration_s > 0:
        raise InvalidRequest(f"max_duration_s must be positive, got {max_duration_s}", item=item)
    if not data:
        raise DecodeError("audio is empty (0 bytes)", item=item)
    decoded = _decode_soundfile(data, item, max_duration_s)
    if decoded is None:
        decoded = _decode_av(data, item, max_duration_s)
    return decoded


def _decode_soundfile(data: bytes, item: str | None, max_duration_s: float) -> DecodedAudio | None:
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None  # not a format libsndfile knows: let FFmpeg try
    with f:
        sink = _Sink(f.samplerate, f.channels, max_duration_s, item)
        if f.frames == 0:
            raise DecodeError("audio has no samples", item=item)
        if f.frames < _UNKNOWN_FRAMES:
            sink.check_frames(f.frames)
        try:
            for block in f.blocks(blocksize=_BLOCK, dtype="float32", always_2d=True):
                sink.add(block)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise DecodeError(f"corrupt or truncated audio ({exc})", item=item) from None
    return sink.finish()


def _decode_av(data: bytes, item: str | None, max_duration_s: float) -> DecodedAudio:
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError):
        raise DecodeError("not an audio format soundfile or FFmpeg can read (unknown or corrupt)", item=item) from None
    with container:
        if not container.streams.audio:
            raise DecodeError("file has no audio stream", item=item)
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        sink = _Sink(ctx.sample_rate, ctx.channels, max_duration_s, item)
        if stream.duration is not None and stream.time_base is not None:
            sink.check_frames(math.floor(stream.duration * stream.time_base * sink.rate))
        elif container.duration is not None:
            sink.check_frames(math.floor(container.duration / av.time_base * sink.rate))
        # Planar float at the stream's first rate and layout: FFmpeg scales integer PCM to [-1, 1) like libsndfile.
        resampler = av.AudioResampler(format="fltp", rate=sink.rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    sink.add(out.to_ndarray().T)
            for out in resampler.resample(None):
                sink.add(out.to_ndarray().T)
        except (av.FFmpegError, ValueError) as exc:
            raise DecodeError(f"corrupt or truncated audio ({exc})", item=item) from None
    return sink.finish()


def frames(samples: np.ndarray) -> np.ndarray:
    """float32 [t, 640] with the tail zero-padded: the extractor's `input_features[0]`."""
    samples = np.asarray(samples, dtype=np.float32)
    pad = (-len(samples)) % FRAME
    if pad:
        samples = np.pad(samples, (0, pad))
    return samples.reshape(-1, FRAME)


def window_spans(n: int, *, window_s: float = MAX_WINDOW_S, overlap_s: float = 0.0) -> list[tuple[int, int]]:
    """[start, end) sample spans of the windows over n samples.

    Window length and hop are whole frames (window rounded down, hop rounded down, so the overlap is at least the
    one asked for and at most 639 samples more): every boundary but the end of the audio falls on a frame, so no
    window but the last carries padding. Windows start at multiples of the hop and stop at the first that reaches n.
    """
    if not 0 < window_s <= MAX_WINDOW_S:
        raise InvalidRequest(f"window_s must be in (0, {MAX_WINDOW_S}], got {window_s}")
    if not 0 <= overlap_s < window_s:
        raise InvalidRequest(f"overlap_s must be in [0, window_s), got {overlap_s}")
    window = round(window_s * SAMPLE_RATE) // FRAME * FRAME
    if window < FRAME:
        raise InvalidRequest(f"window_s must be at least one token ({FRAME / SAMPLE_RATE} s), got {window_s}")
    hop = (window - round(overlap_s * SAMPLE_RATE)) // FRAME * FRAME
    if hop < FRAME:
        raise InvalidRequest(
            f"overlap_s={overlap_s} leaves less than one token ({FRAME / SAMPLE_RATE} s) between window starts"
        )
    spans = []
    start = 0
    while start < n:
        end = min(start + window, n)
        spans.append((start, end))
        if end == n:
            break
        start += hop
    return spans


def window_audio(
    samples: np.ndarray, *, window_s: float = MAX_WINDOW_S, overlap_s: float = 0.0
) -> list[AudioWindow]:
    return [
        AudioWindow(index=i, start_s=start / SAMPLE_RATE, end_s=end / SAMPLE_RATE, samples=samples[start:end])
        for i, (start, end) in enumerate(window_spans(len(samples), window_s=window_s, overlap_s=overlap_s))
    ]


def prepare_audio(
    data: bytes,
    *,
    item: str | None = None,
    window_s: float = MAX_WINDOW_S,
    overlap_s: float = 0.0,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> PreparedAudio:
    """Bytes of an audio file -> windows of at most 30 s, ready for the model."""
    try:
        window_spans(0, window_s=window_s, overlap_s=overlap_s)  # reject a bad request before decoding
    except InvalidRequest as exc:
        raise exc.with_item(item) if item else exc from None
    decoded = decode_audio(data, item=item, max_duration_s=max_duration_s)
    return PreparedAudio(
        duration_s=decoded.duration_s,
        sample_rate_in=decoded.sample_rate_in,
        channels_in=decoded.channels_in,
        windows=window_audio(decoded.samples, window_s=window_s, overlap_s=overlap_s),
    )
