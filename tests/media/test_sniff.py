"""Content sniffing: what a file holds decides how it is decoded, whatever it is called."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from media_makers import av_file, lame_mp3
from PIL import Image

from jobs.demo.samples import document
from pipelines.config import InputSpec, MediaSpec
from pipelines.errors import DecodeError, UnsupportedInput
from pipelines.media.sniff import AUDIO, DOCUMENT, IMAGE, MEDIA_SUFFIXES, TEXT, by_extension, modality_of, sniff
from pipelines.prepare import prepare_item
from pipelines.prompts import Task, TaskOptions
from pipelines.sources import iter_listing

REAL_MEDIA = Path(__file__).parent / "data" / "real-media"


def image_bytes(fmt: str, mode: str = "RGB", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (40, 30), "red" if mode == "RGB" else 0).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def sound_bytes(fmt: str, subtype: str | None = None, rate: int = 44100) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((rate // 2, 1), np.float32), rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def pdf_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "doc.pdf")
        document(path, pages=1)
        return path.read_bytes()


def _png_text(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    return info


def raw_mp3_frames() -> bytes:
    """MP3 frames with no ID3 tag and no Xing header: the file starts with a frame sync."""
    return av_file("mp3", "libmp3lame", options={"write_xing": "0", "id3v2_version": "0"})


CONTENT = {
    "jpeg": (lambda: image_bytes("JPEG"), IMAGE),
    "png": (lambda: image_bytes("PNG"), IMAGE),
    "gif": (lambda: image_bytes("GIF"), IMAGE),
    "webp": (lambda: image_bytes("WEBP"), IMAGE),
    "tiff": (lambda: image_bytes("TIFF"), IMAGE),
    "bmp": (lambda: image_bytes("BMP"), IMAGE),
    "ico (Pillow probe)": (lambda: image_bytes("ICO"), IMAGE),
    "ppm (Pillow probe)": (lambda: image_bytes("PPM"), IMAGE),
    "tga (Pillow probe)": (lambda: image_bytes("TGA"), IMAGE),
    "pdf": (pdf_bytes, DOCUMENT),
    "wav": (lambda: sound_bytes("WAV"), AUDIO),
    "flac": (lambda: sound_bytes("FLAC"), AUDIO),
    "ogg vorbis": (lambda: sound_bytes("OGG", "VORBIS"), AUDIO),
    "aiff": (lambda: sound_bytes("AIFF"), AUDIO),
    "au": (lambda: sound_bytes("AU"), AUDIO),
    "caf": (lambda: sound_bytes("CAF"), AUDIO),
    "w64 (libsndfile probe)": (lambda: sound_bytes("W64"), AUDIO),
    "mp3 with ID3": (lambda: lame_mp3(0.5), AUDIO),
    "mp3 frames only": (raw_mp3_frames, AUDIO),
    "mp3 after junk (probe)": (lambda: bytes(700) + raw_mp3_frames(), AUDIO),
    "adts aac": (lambda: av_file("adts", "aac"), AUDIO),
    "m4a": (lambda: av_file("ipod", "aac"), AUDIO),
    "mp4 with video": (lambda: av_file("mp4", "aac", video_codec="mpeg4"), AUDIO),
    "mp4 without audio": (lambda: av_file("mp4", None, video_codec="mpeg4"), AUDIO),
    "mov": (lambda: av_file("mov", "alac", seconds=0.2), AUDIO),
    "3gp amr": (lambda: av_file("3gp", "libopencore_amrnb", rate=8000, channels=1), AUDIO),
    "amr": (lambda: av_file("amr", "libopencore_amrnb", rate=8000, channels=1), AUDIO),
    "mkv opus": (lambda: av_file("matroska", "libopus", rate=48000), AUDIO),
    "webm": (lambda: av_file("webm", "libopus", rate=48000, video_codec="libvpx"), AUDIO),
    "wma": (lambda: av_file("asf", "wmav2", bit_rate=128_000), AUDIO),
    "wavpack": (lambda: av_file("wv", "wavpack", seconds=0.2), AUDIO),
    "mpeg-ts (FFmpeg probe)": (lambda: av_file("mpegts", "aac"), AUDIO),
    "mpeg-ts without audio (FFmpeg probe)": (lambda: av_file("mpegts", None, video_codec="mpeg4"), AUDIO),
    "png quoting %PDF- in a text chunk": (lambda: image_bytes("PNG", pnginfo=_png_text("see %PDF-1.7")), IMAGE),
    "pdf after junk": (lambda: b"\xef\xbb\xbf  \n" + pdf_bytes(), DOCUMENT),
    "markdown": (lambda: b"# Notes\nRevenue grew 12 percent.\n", TEXT),
    "utf-8 cut inside a character": (lambda: "é".encode() * 3000, TEXT),
}


@pytest.mark.parametrize("case", sorted(CONTENT))
def test_content_decides_whatever_the_name(case):
    make, expected = CONTENT[case]
    data = make()
    assert sniff(data) == expected
    for lying_name in ("file.jpg", "file.mp3", "file.pdf", "file.txt", "file"):
        assert modality_of(data, lying_name) == expected


@pytest.mark.parametrize(
    "name", sorted(p.name for p in REAL_MEDIA.iterdir() if p.name not in ("expected.json", "README.md"))
)
def test_real_audio_files_are_audio(name):
    data = (REAL_MEDIA / name).read_bytes()
    assert sniff(data) == AUDIO
    assert modality_of(data, "cover.png") == AUDIO


def test_unknown_content_falls_back_to_the_extension():
    noise = np.random.default_rng(0).bytes(3000)
    assert sniff(noise) is None
    assert modality_of(noise, "x.png") == IMAGE and modality_of(noise, "x.wma") == AUDIO
    assert modality_of(noise, "x.MKV") == AUDIO and modality_of(noise, "x.pdf") == DOCUMENT
    assert modality_of(noise, "x") is None and modality_of(noise, "x.xyz") is None


def test_a_file_object_is_sniffed_from_its_start_and_left_there(tmp_path):
    path = tmp_path / "clip.bin"
    path.write_bytes(av_file("ipod", "aac"))
    with open(path, "rb") as handle:
        handle.read(100)
        assert sniff(handle) == AUDIO
        assert handle.tell() == 0


def test_every_accepted_extension_names_one_modality():
    assert {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".3gp"} <= MEDIA_SUFFIXES
    assert {".aif", ".aiff", ".wv", ".wma", ".mpc", ".ape", ".m4b", ".amr"} <= MEDIA_SUFFIXES
    assert all(by_extension("x" + suffix) for suffix in MEDIA_SUFFIXES)


def test_listing_takes_audio_and_video_containers(tmp_path):
    names = ["a.aiff", "b.wv", "c.wma", "d.mpc", "e.ape", "f.m4b", "g.amr", "h.mp4", "i.mkv", "j.3gp", "k.xyz"]
    for name in names:
        (tmp_path / name).write_bytes(b"x" if name != "k.xyz" else b"\x00\xff\xfe\x01")  # not even text
    listed = sorted(row["id"] for row in iter_listing(InputSpec(url=str(tmp_path))))
    assert listed == names  # every file is listed: one that cannot be read becomes an error row
    skipped: list[str] = []
    recognised = sorted(row["id"] for row in iter_listing(InputSpec(url=str(tmp_path), skip_unsupported=True), skipped))
    assert recognised == names[:-1] and skipped == ["k.xyz"]  # by extension: every container above is recognised


# Through prepare_item: the task meets what the content is.

OPTIONS = {
    "transcribe": TaskOptions(task=Task.transcribe, language="English"),
    "caption": TaskOptions(task=Task.caption),
    "prompt": TaskOptions(task=Task.prompt, prompt="Describe this."),
}


def prepare(data: bytes, name: str, task: str, tokenizer):
    return prepare_item(data, item_id=name, name=name, tokenizer=tokenizer, options=OPTIONS[task], limits=MediaSpec())


@pytest.mark.parametrize(
    "name",
    [
        "mutagen__tests__data__8k-1ch-1s-silence.aif",
        "mutagen__tests__data__no_length.wv",
        "mutagen__tests__data__silence-1.wma",
        "mutagen__tests__data__ep7.m4b",
        "io__tests__test_video__small.mp4",
    ],
)
def test_audio_in_other_containers_is_transcribed_not_sent_to_the_image_decoder(name, tokenizer):
    item = prepare((REAL_MEDIA / name).read_bytes(), name, "transcribe", tokenizer)
    assert item.modality == AUDIO and item.requests[0].audio_tokens > 0


def test_the_audio_track_of_a_video_is_transcribed(tokenizer):
    item = prepare(av_file("webm", "libopus", rate=48000, video_codec="libvpx"), "talk.webm", "transcribe", tokenizer)
    assert item.modality == AUDIO and item.detail["duration_s"] == pytest.approx(1.5, abs=0.05)


def test_a_video_without_sound_is_a_clear_error(tokenizer):
    with pytest.raises(DecodeError, match="silent.mp4: file has no audio stream"):
        prepare(av_file("mp4", None, video_codec="mpeg4"), "silent.mp4", "transcribe", tokenizer)


def test_an_image_named_like_audio_is_an_image(tokenizer):
    with pytest.raises(UnsupportedInput, match="song.mp3: task 'transcribe' does not take image input"):
        prepare(image_bytes("PNG"), "song.mp3", "transcribe", tokenizer)
    assert prepare(image_bytes("PNG"), "song.mp3", "caption", tokenizer).modality == IMAGE


def test_unknown_content_without_a_known_extension(tokenizer):
    noise = np.random.default_rng(3).bytes(4000)
    with pytest.raises(DecodeError, match="blob: unknown format"):
        prepare(noise, "blob", "prompt", tokenizer)
    with pytest.raises(DecodeError, match="blob: not an audio format"):
        prepare(noise, "blob", "transcribe", tokenizer)  # the one modality the task takes gets the last word
    with pytest.raises(DecodeError, match="blob: not an image Pillow can read"):
        prepare(noise, "blob", "caption", tokenizer)
