import io
import math
import struct

import av
import numpy as np
import pytest
import soundfile as sf
import soxr
from audio_reference import check_against_one_shot, one_shot
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import Gemma4UnifiedAudioFeatureExtractor

from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded, UnsupportedInput
from pipelines.media import audio
from pipelines.media.audio import FRAME, SAMPLE_RATE

EXTRACTOR = Gemma4UnifiedAudioFeatureExtractor()
RATES = (8000, 16000, 22050, 44100, 48000)
DURATIONS = (0.01, 29.99, 30.01, 95.0)
FORMATS = ("WAV", "FLAC", "OGG", "MP3")


def signal(rate: int, seconds: float, channels: int = 2, seed: int = 0) -> np.ndarray:
    n = round(rate * seconds)
    t = np.arange(n) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)[:, None] * np.array([1.0, 0.6, 0.3][:channels])
    noise = np.random.default_rng(seed).normal(0, 0.05, (n, channels))
    return (tone + noise).astype(np.float32)


def encode(x: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, x.shape[1], subtype=subtype, format=fmt) as f:
        # libvorbis overflows its stack when one call writes ~95 s or more (python-soundfile#426): write in blocks.
        for i in range(0, len(x), 1 << 16):
            f.write(x[i : i + (1 << 16)])
    return buf.getvalue()


def reference(data: bytes) -> np.ndarray:
    """What the model should see: the one-shot decode (soundfile in one call, else PyAV), normalised in one go."""
    return one_shot(data).samples


def hf_frames(samples: np.ndarray) -> np.ndarray:
    return EXTRACTOR(samples)["input_features"][0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rate", RATES)
def test_matches_transformers_extractor(fmt, rate):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    for seconds in DURATIONS:
        data = encode(signal(rate, seconds), rate, fmt)
        expected = reference(data)
        prepared = audio.prepare_audio(data, item=f"clip.{fmt.lower()}")

        assert prepared.sample_rate_in == rate and prepared.channels_in == 2
        assert prepared.duration_s == pytest.approx(len(expected) / SAMPLE_RATE)
        decoded = np.concatenate([w.samples for w in prepared.windows])
        assert np.array_equal(decoded, expected)  # MP3 too: blocks read without seeking equal one read
        if len(expected) <= 30 * SAMPLE_RATE:
            assert len(prepared.windows) == 1
        for window in prepared.windows:
            want = hf_frames(expected[round(window.start_s * SAMPLE_RATE) : round(window.end_s * SAMPLE_RATE)])
            assert window.frames.dtype == np.float32
            assert np.array_equal(window.frames, want)
            assert window.tokens == want.shape[0] == math.ceil(len(window.samples) / FRAME)
            assert window.end_s - window.start_s <= audio.MAX_WINDOW_S
        assert prepared.tokens == sum(math.ceil(len(w.samples) / FRAME) for w in prepared.windows)


def test_window_frames_for_95_seconds_are_750_750_750_125():
    data = encode(signal(48000, 95.0), 48000, "FLAC")
    prepared = audio.prepare_audio(data)
    assert [w.tokens for w in prepared.windows] == [750, 750, 750, 125]
    assert [(w.start_s, w.end_s) for w in prepared.windows] == [(0, 30), (30, 60), (60, 90), (90, 95)]


def test_pyav_fallback_for_m4a_matches_manual_decode():
    rate = 44100
    x = signal(rate, 1.5).T.copy()
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(x, format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    data = buf.getvalue()
    with pytest.raises(sf.LibsndfileError):
        sf.info(io.BytesIO(data))  # really goes through the fallback

    with av.open(io.BytesIO(data)) as container:
        planes = [f.to_ndarray() for f in container.decode(audio=0)]
    expected = soxr.resample(np.concatenate(planes, axis=1).mean(axis=0), rate, SAMPLE_RATE, quality="HQ")
    expected = np.clip(expected, -1.0, 1.0)

    prepared = audio.prepare_audio(data, item="clip.m4a")
    assert prepared.sample_rate_in == rate and prepared.channels_in == 2
    assert prepared.duration_s == pytest.approx(1.5, abs=0.1)  # AAC adds encoder priming
    (window,) = prepared.windows
    assert np.array_equal(window.samples, expected)
    assert np.array_equal(window.frames, hf_frames(expected))


def test_16khz_mono_float_passes_through_unchanged():
    x = signal(SAMPLE_RATE, 2.0, channels=1)
    decoded = audio.decode_audio(encode(x, SAMPLE_RATE, "WAV", "FLOAT"))
    assert decoded.samples.dtype == np.float32
    assert np.array_equal(decoded.samples, x[:, 0])
    assert (decoded.sample_rate_in, decoded.channels_in) == (SAMPLE_RATE, 1)


def test_int_pcm_is_scaled_to_unit_range():
    pcm = np.array([[32767], [-32768], [16384], [0]] * 400, dtype=np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    samples = audio.decode_audio(buf.getvalue()).samples
    assert np.array_equal(samples[:4], np.array([32767, -32768, 16384, 0], np.float32) / 32768)


def test_out_of_range_floats_nan_and_inf_are_cleaned():
    x = np.array([[3.0], [-7.0], [np.nan], [np.inf], [-np.inf], [0.25]] * 1000, dtype=np.float32)
    for rate in (SAMPLE_RATE, 44100):
        samples = audio.decode_audio(encode(x, rate, "WAV", "FLOAT")).samples
        assert np.isfinite(samples).all()
        assert samples.min() >= -1.0 and samples.max() <= 1.0


def test_frames_pads_the_tail_with_zeros():
    x = np.arange(1, 1301, dtype=np.float32)
    f = audio.frames(x)
    assert f.shape == (3, FRAME)
    assert np.array_equal(f.reshape(-1)[:1300], x) and not f.reshape(-1)[1300:].any()
    assert np.array_equal(f, hf_frames(x))
    assert audio.frames(x[:1280]).shape == (2, FRAME)


# Windows.


def check_windows(n: int, window_s: float, overlap_s: float) -> None:
    samples = np.arange(n, dtype=np.float32)
    try:
        windows = audio.window_audio(samples, window_s=window_s, overlap_s=overlap_s)
    except InvalidRequest:
        # Only when rounding to whole frames leaves less than one frame between window starts.
        assert window_s - overlap_s < 3 * FRAME / SAMPLE_RATE
        return
    starts = np.array([round(w.start_s * SAMPLE_RATE) for w in windows])
    ends = np.array([round(w.end_s * SAMPLE_RATE) for w in windows])
    lengths = np.array([len(w.samples) for w in windows])

    assert [w.index for w in windows] == list(range(len(windows)))
    assert np.array_equal(ends - starts, lengths) and (lengths > 0).all()
    for w, s in zip(windows, starts):
        assert w.samples[0] == s  # each window is its own slice of the audio
    assert starts[0] == 0 and ends[-1] == n
    assert (np.diff(starts) > 0).all() and (np.diff(ends) > 0).all()  # ordered; none inside the previous one
    assert lengths.max() <= min(round(window_s * SAMPLE_RATE), 30 * SAMPLE_RATE)
    if n <= (round(window_s * SAMPLE_RATE) // FRAME) * FRAME:
        assert len(windows) == 1

    # Every sample covered; coverage adds up to n plus the overlaps.
    coverage = np.zeros(n + 1, np.int64)
    np.add.at(coverage, starts, 1)
    np.add.at(coverage, ends, -1)
    assert (np.cumsum(coverage)[:n] >= 1).all()
    overlaps = ends[:-1] - starts[1:]
    assert lengths.sum() == n + overlaps.sum()

    # Whole-frame boundaries; overlap at least the one asked for and under one frame more.
    assert (starts % FRAME == 0).all() and (ends[:-1] % FRAME == 0).all()
    if len(overlaps):
        assert (overlaps == overlaps[0]).all()
        asked = round(overlap_s * SAMPLE_RATE)
        assert asked <= overlaps[0] < asked + FRAME
        assert (lengths[:-1] == lengths[0]).all()


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 200 * SAMPLE_RATE),
    window_s=st.floats(0.04, 30.0),
    overlap_fraction=st.floats(0.0, 0.999),
)
def test_window_properties(n, window_s, overlap_fraction):
    check_windows(n, window_s, window_s * overlap_fraction)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 5 * SAMPLE_RATE),
    window_s=st.sampled_from([0.04, 0.1, 1.0, 2.5]),
    overlap_frames=st.integers(0, 60),
)
def test_window_properties_frame_aligned(n, window_s, overlap_frames):
    overlap_s = overlap_frames * FRAME / SAMPLE_RATE
    if overlap_s < window_s:
        check_windows(n, window_s, overlap_s)


@pytest.mark.parametrize(
    "n, window_s, overlap_s, spans",
    [
        (480_000, 30.0, 0.0, [(0, 480_000)]),
        (480_001, 30.0, 0.0, [(0, 480_000), (480_000, 480_001)]),
        # 55 s at 30/5: the window starting at 50 s would lie inside [25 s, 55 s), so there is none.
        (880_000, 30.0, 5.0, [(0, 480_000), (400_000, 880_000)]),
        (900_000, 30.0, 5.0, [(0, 480_000), (400_000, 880_000), (800_000, 900_000)]),
        # 10.01 s windows round down to 10.0 s (250 frames).
        (400_000, 10.01, 0.0, [(0, 160_000), (160_000, 320_000), (320_000, 400_000)]),
        (100, 30.0, 0.0, [(0, 100)]),
        (0, 30.0, 0.0, []),
    ],
)
def test_window_spans_examples(n, window_s, overlap_s, spans):
    assert audio.window_spans(n, window_s=window_s, overlap_s=overlap_s) == spans


@pytest.mark.parametrize(
    "window_s, overlap_s",
    [
        (0.0, 0.0),
        (-1.0, 0.0),
        (30.01, 0.0),
        (float("nan"), 0.0),
        (0.02, 0.0),
        (10.0, -1.0),
        (10.0, 10.0),
        (10.0, 12.0),
        (10.0, 9.99),
    ],
)
def test_bad_window_requests(window_s, overlap_s):
    with pytest.raises(InvalidRequest):
        audio.window_spans(1000, window_s=window_s, overlap_s=overlap_s)


def test_bad_window_request_is_rejected_before_decoding():
    with pytest.raises(InvalidRequest, match="clip.wav"):
        audio.prepare_audio(b"not audio", item="clip.wav", window_s=31)


# Bad input.


def wav_bytes(x: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(wav_bytes(np.zeros((0, 1), np.float32), SAMPLE_RATE), id="zero-length-wav"),
        pytest.param(np.random.default_rng(1).bytes(5000), id="random-1"),
        pytest.param(np.random.default_rng(2).bytes(100_000), id="random-2"),
        pytest.param(b"ID3" + np.random.default_rng(3).bytes(3000), id="fake-id3"),
        pytest.param(b"RIFF" + np.random.default_rng(4).bytes(3000), id="fake-riff"),
        pytest.param(wav_bytes(signal(8000, 1.0), 8000)[:30], id="truncated-header"),
        pytest.param(encode(signal(48000, 1.0), 48000, "FLAC")[:20_000], id="truncated-flac"),
        pytest.param(b"hello world, plain text" * 10, id="text"),
    ],
)
def test_undecodable_input_raises_decode_error(data):
    assert one_shot(data) is None  # the one-shot reference cannot decode it either
    with pytest.raises(DecodeError) as info:
        audio.prepare_audio(data, item="bad.bin")
    assert "bad.bin" in str(info.value) and info.value.item == "bad.bin" and info.value.stage == "prepare"


def test_truncated_wav_keeps_the_samples_that_are_there():
    data = wav_bytes(signal(8000, 1.0), 8000)
    clip = check_against_one_shot(data[: 44 + 4 * 4000], "half.wav")  # header + half the frames
    assert clip.duration_s == pytest.approx(0.5, abs=0.01)


def test_over_duration_real_file_is_refused_before_decoding(monkeypatch):
    data = encode(np.zeros((48000 * 300, 2), np.float32), 48000, "FLAC")  # 5 minutes of silence: a few KB
    assert len(data) < 200_000

    def no_reading(*args, **kwargs):
        raise AssertionError("decoded before checking the duration")

    monkeypatch.setattr(audio, "_read_frames", no_reading)
    with pytest.raises(LimitExceeded, match="song.flac: audio is 300.0 s long, over the limit of 60 s"):
        audio.prepare_audio(data, item="song.flac", max_duration_s=60)


def test_over_duration_through_pyav_is_refused():
    rate = 8000
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, rate * 5), np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(LimitExceeded, match="clip.m4a"):
        audio.prepare_audio(buf.getvalue(), item="clip.m4a", max_duration_s=2)


def test_header_claiming_ten_hours_costs_only_the_bytes_present():
    data = bytearray(wav_bytes(signal(SAMPLE_RATE, 1.0, channels=1), SAMPLE_RATE))
    assert data[36:40] == b"data"
    data[40:44] = struct.pack("<I", 10 * 3600 * SAMPLE_RATE * 2)  # 16-bit mono: 10 hours of data
    data[4:8] = struct.pack("<I", 36 + 10 * 3600 * SAMPLE_RATE * 2)
    # libsndfile sizes the stream from the bytes actually there, so nothing large is allocated.
    decoded = audio.decode_audio(bytes(data), item="liar.wav", max_duration_s=60)
    assert decoded.duration_s == pytest.approx(1.0)


def test_header_claiming_a_tiny_sample_rate_is_refused():
    # 20,000 frames at a claimed 1 Hz would be 5.5 hours, upsampled 16,000-fold.
    data = bytearray(wav_bytes(np.zeros((20_000, 1), np.float32), 8000))
    data[24:28] = struct.pack("<I", 1)  # sample rate
    data[28:32] = struct.pack("<I", 2)  # byte rate
    with pytest.raises(UnsupportedInput, match="liar.wav: sample rate 1 Hz"):
        audio.prepare_audio(bytes(data), item="liar.wav")


def test_low_but_valid_rate_long_claim_hits_the_duration_limit():
    data = wav_bytes(np.zeros((100_000, 1), np.float32), 1000, subtype="PCM_U8")  # 100 s in 100 KB
    with pytest.raises(LimitExceeded, match="100.0 s"):
        audio.prepare_audio(data, item="x.wav", max_duration_s=60)
