"""What a file holds, from its content first and its name second.

Magic bytes place most files (PDF, the common image formats, the audio formats and the audio/video containers);
what they cannot place is probed with the decoders themselves: Pillow for images, then libsndfile and FFmpeg for
audio and the audio track of video files; then UTF-8 text. Only when the content says nothing is the extension
trusted. Video containers count as audio: their audio track is what this project reads of them.
"""

from __future__ import annotations

import io
import warnings
from pathlib import PurePosixPath
from typing import BinaryIO

IMAGE, AUDIO, DOCUMENT, TEXT = "image", "audio", "document", "text"

# The extensions each modality accepts, by what decodes them (the README lists the same).
PILLOW_IMAGES = (".jpg", ".jpeg", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
LIBSNDFILE_AUDIO = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf")
FFMPEG_AUDIO = (".m4a", ".m4b", ".aac", ".wma", ".wv", ".mpc", ".ape", ".amr")
VIDEO_CONTAINERS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".3gp")  # their audio track
EXTENSIONS = {
    IMAGE: frozenset(PILLOW_IMAGES),
    AUDIO: frozenset(LIBSNDFILE_AUDIO + FFMPEG_AUDIO + VIDEO_CONTAINERS),
    DOCUMENT: frozenset({".pdf"}),
    TEXT: frozenset({".txt", ".md", ".markdown"}),
}
MEDIA_SUFFIXES = frozenset().union(*EXTENSIONS.values())

Source = bytes | BinaryIO

_HEAD = 4096  # bytes read for magic numbers and the text check
_PDF_MAGIC = b"%PDF-"  # anywhere in the first 1024 bytes, as PDF readers accept it

# Prefix -> modality. RIFF, FORM and ISO BMFF files name their kind a few bytes in, so they are handled apart.
_MAGIC = (
    (b"\xff\xd8\xff", IMAGE),  # JPEG
    (b"\x89PNG\r\n\x1a\n", IMAGE),
    (b"GIF87a", IMAGE),
    (b"GIF89a", IMAGE),
    (b"II*\x00", IMAGE),  # TIFF, little-endian
    (b"MM\x00*", IMAGE),  # TIFF, big-endian
    (b"fLaC", AUDIO),
    (b"OggS", AUDIO),  # Vorbis, Opus, FLAC, or Theora video with its sound
    (b"ID3", AUDIO),  # an ID3v2 tag ahead of MP3 (or AAC) frames
    (b"wvpk", AUDIO),  # WavPack
    (b"MPCK", AUDIO),  # Musepack SV8
    (b"MP+", AUDIO),  # Musepack SV7
    (b"MAC ", AUDIO),  # Monkey's Audio
    (b"#!AMR", AUDIO),
    (b".snd", AUDIO),  # Sun/NeXT AU
    (b"caff", AUDIO),  # Core Audio Format
    (b"\x1aE\xdf\xa3", AUDIO),  # EBML: Matroska, WebM
    (b"0&\xb2u\x8ef\xcf\x11\xa6\xd9\x00\xaa\x00b\xcel", AUDIO),  # ASF: WMA, WMV
    (b"FLV\x01", AUDIO),
)
_RIFF_KINDS = {b"WAVE": AUDIO, b"AVI ": AUDIO, b"WEBP": IMAGE}  # RIFF/RF64/BW64 size kind
_FORM_KINDS = {b"AIFF": AUDIO, b"AIFC": AUDIO, b"8SVX": AUDIO}
# ISO BMFF brands of still images (AVIF, HEIF); any other `ftyp` is an MP4/MOV/3GP/M4A family file.
_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
# FFmpeg demuxers of video containers: a file they open is one whose audio track we want (or lack). Others that
# find a video stream (image sequences, ANSI art in text) do not make a file audio.
_VIDEO_DEMUXERS = {"mov", "mp4", "matroska", "webm", "avi", "asf", "flv", "mpegts", "mpeg", "ogg", "rm", "nut", "mxf"}


def modality_of(source: Source, name: str | None = None) -> str | None:
    """The modality of a file by content, else by extension; None when neither tells."""
    return sniff(source) or by_extension(name)


def by_extension(name: str | None) -> str | None:
    suffix = PurePosixPath(name or "").suffix.lower()
    return next((modality for modality, suffixes in EXTENSIONS.items() if suffix in suffixes), None)


def sniff(source: Source) -> str | None:
    """The modality of a file by its content alone, or None. A file object is read from its start and left there."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    handle.seek(0)
    head = handle.read(_HEAD)
    handle.seek(0)
    try:
        return _by_magic(head) or _by_probe(handle) or _by_text(head)
    finally:
        handle.seek(0)


def _by_magic(head: bytes) -> str | None:
    for prefix, modality in _MAGIC:
        if head.startswith(prefix):
            return modality
    kind = head[8:12]
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and kind in _RIFF_KINDS:
        return _RIFF_KINDS[kind]
    if head[:4] == b"FORM" and kind in _FORM_KINDS:
        return _FORM_KINDS[kind]
    if head[4:8] == b"ftyp":
        return IMAGE if head[8:12] in _IMAGE_BRANDS else AUDIO
    if _PDF_MAGIC in head[:1024]:  # after the fixed-offset signatures: a PNG's text chunk may quote "%PDF-"
        return DOCUMENT
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return IMAGE
    if _is_mpeg_audio_frame(head):
        return AUDIO
    return None


def _is_mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG audio frame header (MP1/2/3) or an ADTS AAC header at the very start."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    if head[1] & 0xF6 == 0xF0:  # ADTS: 12 sync bits, layer 00
        return (head[2] >> 2) & 0x0F < 13  # a real sampling-frequency index
    version, layer = (head[1] >> 3) & 0x03, (head[1] >> 1) & 0x03
    bitrate, rate = head[2] >> 4, (head[2] >> 2) & 0x03
    return version != 1 and layer != 0 and bitrate != 15 and rate != 3


def _by_probe(handle: BinaryIO) -> str | None:
    """Ask the decoders: Pillow identifies an image from its header, libsndfile and FFmpeg open audio."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            Image.open(handle)  # identifies from the header; not closed, as some plugins would close our handle
            return IMAGE
        except Image.DecompressionBombError:
            return IMAGE  # an image, and too large: the image decoder says so with the configured limit
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            pass
    handle.seek(0)
    import soundfile as sf

    try:
        sf.info(handle)
        return AUDIO
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        pass
    handle.seek(0)
    import av

    try:
        with av.open(handle, mode="r") as container:
            if container.streams.audio or set(container.format.name.split(",")) & _VIDEO_DEMUXERS:
                return AUDIO  # the audio decoder reads the track, or says the file has none
    except (av.FFmpegError, ValueError, OSError):
        pass
    return None


def _by_text(head: bytes) -> str | None:
    """UTF-8 without NUL bytes (a multi-byte character cut at the end of the head is fine)."""
    if not head or b"\x00" in head:
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or exc.reason != "unexpected end of data":
            return None
    return TEXT
