"""Our streaming audio decoder against a one-shot decode (see audio_reference.py), on files nobody here made and
on files made to lie: cut at any byte, overstated Xing/LAME/VBRI headers, trailing ID3v1/APEv2 tags, tiny VBR
files, and audio in the containers FFmpeg reads.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_reference import check_against_one_shot, one_shot
from hypothesis import given, settings
from hypothesis import strategies as st
from media_makers import (
    av_file,
    lame_mp3,
    overstate_lame,
    overstate_xing,
    set_xing_counts,
    vbri,
    with_apev2,
    with_id3v1,
    xing_frames,
)

from jobs.demo.samples import speech
from pipelines.errors import DecodeError
from pipelines.media import audio
from pipelines.media.audio import FRAME, SAMPLE_RATE, AudioStream, window_spans

REAL_MEDIA = Path(__file__).parent / "data" / "real-media"
EXPECTED = json.loads((REAL_MEDIA / "expected.json").read_text())


# Files nobody here made.


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_files_match_a_one_shot_decode(name):
    data = (REAL_MEDIA / name).read_bytes()
    clip = check_against_one_shot(data, name)
    expected = EXPECTED[name]
    assert not expected["expect_error"]
    assert abs(clip.duration_s - expected["duration_s"]) <= FRAME / SAMPLE_RATE
    assert clip.tokens == expected["tokens"]


def test_mp3_libsndfile_fails_on_part_way_is_decoded_by_pyav():
    data = (REAL_MEDIA / "mutagen__tests__data__id3v1v2-combined.mp3").read_bytes()
    with pytest.raises(sf.LibsndfileError):
        sf.read(io.BytesIO(data))  # libsndfile opens it, then fails reading
    clip = check_against_one_shot(data, "combined.mp3")
    assert clip.tokens == 4 and clip.decoder == "PyAV"


# MP3s made to lie, and other containers, from real encoders.

BASE_VBR = lame_mp3(2.0)
BASE_CBR = lame_mp3(2.0, rate=22050, channels=1, vbr=False)

MADE = {
    "vbr.mp3": BASE_VBR,
    "cbr-mono-22k.mp3": BASE_CBR,
    "xing-x3.mp3": overstate_xing(BASE_VBR, 3),
    "xing-x50.mp3": overstate_xing(BASE_VBR, 50),
    "xing-cbr-x50.mp3": overstate_xing(BASE_CBR, 50),
    "lame-delay-padding-max.mp3": overstate_lame(BASE_VBR),
    "lame-music-length-100MB.mp3": overstate_lame(BASE_VBR, delay=576, padding=0, music_length=100_000_000),
    "vbri.mp3": vbri(BASE_VBR),
    "vbri-x40.mp3": vbri(BASE_VBR, 40),
    "id3v1.mp3": with_id3v1(BASE_VBR),
    "apev2.mp3": with_apev2(BASE_VBR),
    "apev2-id3v1.mp3": with_id3v1(with_apev2(BASE_VBR)),
    "xing-x50-apev2.mp3": with_apev2(overstate_xing(BASE_VBR, 50)),
    "half.mp3": BASE_VBR[: len(BASE_VBR) // 2],
    "tiny-vbr-1ms.mp3": lame_mp3(0.001),
    "tiny-vbr-10ms.mp3": lame_mp3(0.01),
    "tiny-vbr-30ms-mono-8k.mp3": lame_mp3(0.03, rate=8000, channels=1),
    "tiny-vbr-10ms-48k.mp3": lame_mp3(0.01, rate=48000),
    "tiny-vbr-padding-over-length.mp3": overstate_lame(lame_mp3(0.01)),
    "tiny-vbr-10ms-apev2.mp3": with_apev2(lame_mp3(0.01)),
    # Claims one frame, less than its LAME delay and padding: libsndfile reports an unknown length on a stream it
    # calls unseekable, where SoundFile.blocks raised ValueError (an uncaught crash).
    "tiny-vbr-claims-1-frame.mp3": overstate_lame(set_xing_counts(lame_mp3(0.01), 1), delay=576, padding=1500),
    "claims-1-frame.mp3": overstate_lame(set_xing_counts(BASE_VBR, 1), delay=576, padding=1500),
    "claims-0-frames.mp3": set_xing_counts(BASE_VBR, 0),
    "aac.m4a": av_file("ipod", "aac"),
    "aac-mpeg4.mp4": av_file("mp4", "aac", video_codec="mpeg4"),
    "alac.mov": av_file("mov", "alac", seconds=0.5),
    "opus.mkv": av_file("matroska", "libopus", rate=48000),
    "opus-vp8.webm": av_file("webm", "libopus", rate=48000, video_codec="libvpx"),
    "amr.3gp": av_file("3gp", "libopencore_amrnb", rate=8000, channels=1),
    "wmav2.wma": av_file("asf", "wmav2", bit_rate=128_000),
    "adts.aac": av_file("adts", "aac"),
    "aac.ts": av_file("mpegts", "aac"),
    "wavpack.wv": av_file("wv", "wavpack", seconds=0.5),
    "flac-by-ffmpeg.flac": av_file("flac", "flac", seconds=0.5),
}
for fmt, subtype in [
    ("WAV", "PCM_16"),
    ("WAV", "FLOAT"),
    ("FLAC", None),
    ("OGG", "VORBIS"),
    ("OGG", "OPUS"),
    ("MP3", None),
    ("AIFF", "PCM_24"),
    ("AU", "PCM_16"),
    ("CAF", "PCM_16"),
]:
    rate = 48000 if subtype == "OPUS" else 44100
    buffer = io.BytesIO()
    sf.write(
        buffer, np.repeat(np.sin(np.arange(rate) / 7.0)[:, None] * 0.4, 2, axis=1), rate, format=fmt, subtype=subtype
    )
    MADE[f"{subtype or 'default'}.{fmt.lower()}"] = buffer.getvalue()


@pytest.mark.parametrize("name", sorted(MADE))
def test_made_files_match_a_one_shot_decode(name):
    check_against_one_shot(MADE[name], name)


def test_the_demo_speech_clip_matches_a_one_shot_decode(tmp_path):
    path = speech(tmp_path / "speech.wav")  # espeak-ng's voice when installed
    check_against_one_shot(path.read_bytes(), "speech.wav")


def test_the_hostile_mp3s_really_lie():
    """The makers did what they claim: headers overstate, tags trail, and libsndfile's count is wrong."""
    assert xing_frames(MADE["xing-x50.mp3"]) == 50 * xing_frames(BASE_VBR)
    with sf.SoundFile(io.BytesIO(MADE["xing-x50.mp3"])) as f:
        claimed = f.frames
    assert claimed > 40 * SAMPLE_RATE * 2.0  # the header says about 100 s; the audio is 2 s
    with sf.SoundFile(io.BytesIO(MADE["vbri-x40.mp3"])) as f:
        assert f.frames > 2 * 44100 * 2.0
    assert MADE["apev2.mp3"].endswith(b"\x00" * 8) and b"APETAGEX" in MADE["apev2.mp3"][-40:]
    assert MADE["id3v1.mp3"][-128:].startswith(b"TAG")
    clip = check_against_one_shot(MADE["xing-x50.mp3"], "x.mp3")
    assert clip.duration_s < 2.1


def test_a_header_claiming_days_decodes_to_the_audio_there():
    # 100,000 times the real frame count: 55 hours, over the 4-hour limit; the file holds 2 s.
    data = overstate_xing(BASE_VBR, 100_000)
    clip = check_against_one_shot(data, "liar.mp3", same_decoder=False)  # a one-shot read cannot allocate that
    assert clip.decoder == "soundfile" and clip.duration_s == pytest.approx(2.0, abs=0.05)


def test_the_file_that_crashed_soundfile_blocks_is_decoded():
    data = MADE["tiny-vbr-claims-1-frame.mp3"]
    with pytest.raises(ValueError), sf.SoundFile(io.BytesIO(data)) as f:
        list(f.blocks(1024, dtype="float32"))
    clip = check_against_one_shot(data, "tiny.mp3")
    assert clip.tokens == 1


def test_padding_longer_than_the_audio_is_a_clear_error():
    with pytest.raises(DecodeError, match="tiny.mp3: audio has no samples"):
        list(AudioStream(MADE["tiny-vbr-padding-over-length.mp3"], item="tiny.mp3"))


def test_a_video_without_an_audio_track_says_so():
    data = av_file("mp4", None, video_codec="mpeg4")
    with pytest.raises(DecodeError, match="clip.mp4: file has no audio stream"):
        list(AudioStream(data, item="clip.mp4"))


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(0, len(BASE_VBR)), cbr=st.booleans())
def test_mp3_cut_at_any_byte_matches_a_one_shot_decode(cut, cbr):
    data = (BASE_CBR if cbr else BASE_VBR)[:cut]
    if not data:
        with pytest.raises(DecodeError):
            list(AudioStream(data, item="cut.mp3"))
        return
    check_against_one_shot(data, "cut.mp3")


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(1, len(MADE["aac.m4a"])))
def test_other_formats_cut_at_any_byte_match_a_one_shot_decode(cut):
    check_against_one_shot(MADE["aac.m4a"][:cut], "cut.m4a")


# Failures part-way.


def test_a_failure_part_way_hands_over_to_pyav_from_the_start(monkeypatch):
    rate = 44100
    x = (0.4 * np.sin(np.arange(rate * 8) / 9.0)).astype(np.float32)[:, None].repeat(2, axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, x, rate, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    expected = one_shot(data)
    calls = []
    real_read = audio._read_frames

    def fails_on_the_third_block(f, out):
        calls.append(len(out))
        if len(calls) == 3:
            raise sf.LibsndfileError(29)
        return real_read(f, out)

    monkeypatch.setattr(audio, "_read_frames", fails_on_the_third_block)
    clip = AudioStream(data, item="long.wav", window_s=1.0, overlap_s=0.3)
    windows = []
    for window in clip:
        windows.append(window)
        if len(calls) < 3:
            assert clip.decoder == "soundfile"  # windows were handed on before the failure
    assert clip.decoder == "PyAV" and len(calls) == 3
    spans = window_spans(len(expected.samples), window_s=1.0, overlap_s=0.3)
    assert [(round(w.start_s * SAMPLE_RATE), round(w.end_s * SAMPLE_RATE)) for w in windows] == spans
    for window, (start, end) in zip(windows, spans):
        assert np.array_equal(window.samples, expected.samples[start:end])
