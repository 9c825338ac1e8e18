"""Audio -> 16 kHz mono float32 cut into windows of at most 30 s, each chunked into 640-sample frames.

Gemma 4 Unified has no audio encoder front end: one soft token is 640 raw samples (40 ms at 16 kHz), exactly as
transformers' `Gemma4UnifiedAudioFeatureExtractor` chunks them. That extractor neither resamples nor scales, so
decoding here does both: channels averaged to mono, soxr "HQ" resampling (the default librosa and python-soxr use).

Two decoders, in order: soundfile (libsndfile: WAV, AIFF, FLAC, Ogg Vorbis/Opus, MP3, ...), then PyAV (FFmpeg: AAC,
ALAC, WMA, WavPack, Musepack, APE, AMR, and the audio track of MP4/MOV/Matroska/WebM/3GP files). A file
libsndfile cannot open, or fails on part-way, goes to PyAV, which decodes it from the start. The length is what
the decoder produced: header frame counts (MP3 Xing/LAME/VBRI, ...) are estimates and often wrong, so nothing is
sized from them, and a read that returns fewer frames than asked is taken at its word.

Decoding streams: decoder blocks -> mono -> resampler -> windows, each window handed on as soon as it is full, so
an item costs one window and one decoder block of memory however long it is (`AudioStream`). The duration limit
is checked from the header where the header is exact (libsndfile's PCM, FLAC and Ogg lengths) and always on what
is decoded.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np
import soundfile as sf
import soxr

from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded, UnsupportedInput

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME = 640
MAX_WINDOW_S = 30.0
DEFAULT_MAX_DURATION_S = 4 * 3600.0
RESAMPLE_QUALITY = "HQ"

Source = bytes | BinaryIO  # a file's bytes, or a seekable binary file object (read from its start)

# Rates outside this range are hostile or broken headers: a 1 Hz file of 20,000 frames claims 5.5 hours.
_MIN_RATE, _MAX_RATE = 1000, 768_000
_BLOCK_SAMPLES = 1 << 18  # decoder block size in samples (all channels): 1 MiB of float32
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX when the length is unknown
_ESTIMATED_LENGTH_FORMATS = {"MP3"}  # libsndfile formats whose frame count is a guess from the header


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


_OPEN, _NO_STREAM, _EMPTY, _READ = "open", "no audio stream", "empty", "read"


class _CannotDecode(Exception):
    """This decoder cannot read the item (at open, or part-way); the next one may."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.decoder = ""


class AudioStream:
    """The windows of one clip, decoded as they are iterated (once). Memory: one window plus one decoder block.

    `sample_rate_in`, `channels_in`, `decoder` and `duration_s` describe what has been decoded so far and are
    final once iteration ends. Raises ItemError subclasses (naming the item) on bad input or a bad request.
    """

    def __init__(
        self,
        source: Source,
        *,
        item: str | None = None,
        window_s: float = MAX_WINDOW_S,
        overlap_s: float = 0.0,
        max_duration_s: float = DEFAULT_MAX_DURATION_S,
    ) -> None:
        try:
            window_spans(0, window_s=window_s, overlap_s=overlap_s)  # reject a bad request before decoding
            if not max_duration_s > 0:
                raise InvalidRequest(f"max_duration_s must be positive, got {max_duration_s}")
        except InvalidRequest as exc:
            raise exc.with_item(item) if item else exc from None
        if isinstance(source, (bytes, bytearray, memoryview)):
            if not len(source):
                raise DecodeError("audio is empty (0 bytes)", item=item)
            source = io.BytesIO(source)
        self.source, self.item = source, item
        self.window_s, self.overlap_s, self.max_duration_s = window_s, overlap_s, max_duration_s
        self.sample_rate_in: int | None = None
        self.channels_in: int | None = None
        self.decoder: str | None = None
        self.samples = 0  # 16 kHz samples delivered in windows so far

    @property
    def duration_s(self) -> float:
        return self.samples / SAMPLE_RATE

    def __iter__(self) -> Iterator[AudioWindow]:
        windower = _Windower(self.window_s, self.overlap_s)
        failures: list[_CannotDecode] = []
        for name, blocks in (("soundfile", _soundfile_blocks), ("PyAV", _av_blocks)):
            self.source.seek(0)
            # A decoder that takes over part-way starts from the beginning of the file; the windows already
            # handed on stay, and its output continues from where they end.
            skip = windower.rewind()
            mixer = None
            try:
                with closing(blocks(self.source, self.item, self.max_duration_s)) as decoded:
                    for rate, block in decoded:
                        if mixer is None:
                            mixer = _Mixer(rate, self.max_duration_s, self.item)
                            self.sample_rate_in, self.channels_in, self.decoder = rate, block.shape[1], name
                        skip = yield from self._emit(windower, mixer.add(block), skip)
                if mixer is None:
                    raise _CannotDecode(_EMPTY, "no samples")
                yield from self._emit(windower, mixer.finish(), skip)
            except _CannotDecode as exc:
                exc.decoder = name
                failures.append(exc)
                if mixer is not None:
                    logger.info(
                        "%s: %s failed after %d input frames (%s); trying the next decoder",
                        self.item or "audio",
                        name,
                        mixer.read,
                        exc,
                    )
                continue
            yield from self._finish(windower)
            return
        raise _no_decoder_error(failures, self.item)

    def _emit(self, windower: _Windower, samples: np.ndarray, skip: int):
        if skip:
            dropped = min(skip, len(samples))
            samples, skip = samples[dropped:], skip - dropped
        for window in windower.add(samples):
            self.samples = round(window.end_s * SAMPLE_RATE)
            yield window
        return skip

    def _finish(self, windower: _Windower) -> Iterator[AudioWindow]:
        for window in windower.finish():
            self.samples = round(window.end_s * SAMPLE_RATE)
            yield window
        if windower.total == 0:
            raise DecodeError("audio has no samples", item=self.item)


def _no_decoder_error(failures: list[_CannotDecode], item: str | None) -> DecodeError:
    kinds = {failure.kind for failure in failures}
    if _NO_STREAM in kinds:
        return DecodeError("file has no audio stream", item=item)
    if kinds <= {_OPEN}:
        return DecodeError("not an audio format soundfile or FFmpeg can read (unknown or corrupt)", item=item)
    if kinds <= {_OPEN, _EMPTY}:
        return DecodeError("audio has no samples", item=item)
    detail = "; ".join(f"{failure.decoder}: {failure}" for failure in failures if failure.kind != _OPEN)
    return DecodeError(f"corrupt or truncated audio ({detail})", item=item)


class _Mixer:
    """Mixes decoder blocks to mono and resamples them to 16 kHz as one stream; enforces the duration limit."""

    def __init__(self, rate: int, max_duration_s: float, item: str | None) -> None:
        _check_rate(rate, item)
        self.rate, self.item, self.max_duration_s = rate, item, max_duration_s
        self.read = 0  # input frames
        self.stream = None
        if rate != SAMPLE_RATE:
            self.stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def add(self, block: np.ndarray) -> np.ndarray:
        """block: float32 [n, channels] -> 16 kHz mono samples (the resampler holds back a few)."""
        self.read += len(block)
        _check_duration(self.read / self.rate, self.max_duration_s, self.item)
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else np.array(block[:, 0])
        # Float files may hold NaN, inf or values far outside [-1, 1]; clean them before the filter spreads them.
        np.nan_to_num(mono, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(mono, -1.0, 1.0, out=mono)
        return _clip(mono if self.stream is None else self.stream.resample_chunk(mono, last=False))

    def finish(self) -> np.ndarray:
        if self.stream is None:
            return np.zeros(0, np.float32)
        return _clip(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))


def _clip(samples: np.ndarray) -> np.ndarray:
    np.clip(samples, -1.0, 1.0, out=samples)  # resampling overshoots a little near full scale
    return samples


class _Windower:
    """16 kHz samples in, windows out as soon as each is complete: the spans of `window_spans`, streamed."""

    def __init__(self, window_s: float, overlap_s: float) -> None:
        self.window, self.hop = _window_hop(window_s, overlap_s)
        self.start = 0  # absolute sample where the next window starts
        self.index = 0
        self.pending: list[np.ndarray] = []  # samples from `start` on
        self.pending_len = 0
        self.last_end = 0

    @property
    def total(self) -> int:
        return self.start + self.pending_len

    def rewind(self) -> int:
        """Drop what is not yet in a window; returns how many samples a fresh decode must skip to continue."""
        self.pending, self.pending_len = [], 0
        return self.start

    def add(self, samples: np.ndarray) -> Iterator[AudioWindow]:
        if len(samples):
            self.pending.append(samples)
            self.pending_len += len(samples)
        while self.pending_len >= self.window:
            yield self._cut(self.window)

    def finish(self) -> Iterator[AudioWindow]:
        # Windows stop at the first that reaches the end (see window_spans).
        while self.pending_len and self.total > self.last_end:
            yield self._cut(min(self.window, self.pending_len))

    def _cut(self, length: int) -> AudioWindow:
        buffer = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        window = AudioWindow(
            index=self.index,
            start_s=self.start / SAMPLE_RATE,
            end_s=(self.start + length) / SAMPLE_RATE,
            samples=buffer[:length].copy(),
        )
        self.last_end = self.start + length
        hop = min(self.hop, len(buffer))
        rest = buffer[hop:]
        self.pending, self.pending_len = ([rest] if len(rest) else []), len(rest)
        self.start += hop
        self.index += 1
        return window


def _check_rate(rate: int, item: str | None) -> None:
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise UnsupportedInput(f"sample rate {rate} Hz is outside {_MIN_RATE}-{_MAX_RATE} Hz", item=item)


def _check_duration(seconds: float, max_duration_s: float, item: str | None) -> None:
    if seconds > max_duration_s:
        raise LimitExceeded(f"audio is {seconds:.1f} s long, over the limit of {max_duration_s:g} s", item=item)


def _soundfile_blocks(source: BinaryIO, item: str | None, max_duration_s: float):
    try:
        f = sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise _CannotDecode(_OPEN, str(exc)) from None
    with f:
        _check_rate(f.samplerate, item)
        if f.channels < 1:
            raise _CannotDecode(_EMPTY, "no channels")
        if f.format not in _ESTIMATED_LENGTH_FORMATS and 0 < f.frames < _UNKNOWN_FRAMES:
            _check_duration(f.frames / f.samplerate, max_duration_s, item)
        out = np.empty((max(1, _BLOCK_SAMPLES // f.channels), f.channels), np.float32)
        while True:
            try:
                n = _read_frames(f, out)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise _CannotDecode(_READ, str(exc)) from None
            if n <= 0:
                return
            yield f.samplerate, out[:n]


def _read_frames(f: sf.SoundFile, out: np.ndarray) -> int:
    """One sf_readf_float into `out`; returns the frames libsndfile produced (fewer than asked at the end).

    Not SoundFile.read: it seeks after every call, and a seek makes libmpg123 re-prime its decoder, so an MP3
    read in blocks that way differs (by up to 1e-4) from the same file read in one call. Reading on without
    seeking gives exactly the one-call samples.
    """
    n = sf._snd.sf_readf_float(f._file, sf._ffi.cast("float *", out.ctypes.data), len(out))
    code = sf._snd.sf_error(f._file)
    if code:
        raise sf.LibsndfileError(code)
    return int(n)


def _av_blocks(source: BinaryIO, item: str | None, max_duration_s: float):
    try:
        container = av.open(source, mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise _CannotDecode(_OPEN, str(exc)) from None
    with container:
        if not container.streams.audio:
            raise _CannotDecode(_NO_STREAM, "no audio stream")
        stream = container.streams.audio[0]
        rate, resampler, setup = None, None, None
        try:
            for frame in container.decode(stream):
                rate = rate or frame.sample_rate
                # Planar float at the first frame's rate, with a new resampler whenever the format, layout or
                # rate changes mid-stream (FFmpeg's resampler is fixed to its first input). FFmpeg scales integer
                # PCM to [-1, 1) like libsndfile.
                key = (frame.format.name, frame.layout.name, frame.sample_rate)
                if key != setup:
                    if resampler is not None:
                        yield from _planes(resampler.resample(None), rate)
                    resampler, setup = av.AudioResampler(format="fltp", rate=rate), key
                yield from _planes(resampler.resample(frame), rate)
            if resampler is not None:
                yield from _planes(resampler.resample(None), rate)
        except (av.FFmpegError, ValueError) as exc:
            raise _CannotDecode(_READ, str(exc)) from None


def _planes(frames, rate: int):
    for frame in frames:
        yield rate, frame.to_ndarray().T


def _window_hop(window_s: float, overlap_s: float) -> tuple[int, int]:
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
    return window, hop


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
    window, hop = _window_hop(window_s, overlap_s)
    spans = []
    start = 0
    while start < n:
        end = min(start + window, n)
        spans.append((start, end))
        if end == n:
            break
        start += hop
    return spans


def window_audio(samples: np.ndarray, *, window_s: float = MAX_WINDOW_S, overlap_s: float = 0.0) -> list[AudioWindow]:
    return [
        AudioWindow(index=i, start_s=start / SAMPLE_RATE, end_s=end / SAMPLE_RATE, samples=samples[start:end])
        for i, (start, end) in enumerate(window_spans(len(samples), window_s=window_s, overlap_s=overlap_s))
    ]


def decode_audio(
    source: Source, *, item: str | None = None, max_duration_s: float = DEFAULT_MAX_DURATION_S
) -> DecodedAudio:
    """Any audio file -> 16 kHz mono float32 in [-1, 1], with the input's rate and channel count."""
    stream = AudioStream(source, item=item, max_duration_s=max_duration_s)
    samples = np.concatenate([window.samples for window in stream])
    return DecodedAudio(samples=samples, sample_rate_in=stream.sample_rate_in, channels_in=stream.channels_in)


def prepare_audio(
    source: Source,
    *,
    item: str | None = None,
    window_s: float = MAX_WINDOW_S,
    overlap_s: float = 0.0,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> PreparedAudio:
    """An audio file -> all its windows of at most 30 s, ready for the model (see AudioStream to stream them)."""
    stream = AudioStream(source, item=item, window_s=window_s, overlap_s=overlap_s, max_duration_s=max_duration_s)
    windows = list(stream)
    return PreparedAudio(
        duration_s=stream.duration_s,
        sample_rate_in=stream.sample_rate_in,
        channels_in=stream.channels_in,
        windows=windows,
    )
