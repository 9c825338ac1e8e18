"""Media made on the spot by real encoders (PyAV's FFmpeg, libsndfile), and MP3s made to lie.

The MP3 makers take LAME's output and change only what a broken or hostile file changes (a cut, an overstated
Xing/LAME/VBRI header, trailing tags), so a decoder that trusts a header or reads past the audio shows it.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np

_XING_TAGS = (b"Xing", b"Info")
# Xing flags: which optional fields follow.
_FRAMES, _BYTES, _TOC, _QUALITY = 1, 2, 4, 8


def tones(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    """float32 [channels, n]: a tone per channel plus a little noise."""
    n = max(1, round(seconds * rate))
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    return np.stack(
        [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + rng.normal(0, 0.02, n) for c in range(channels)]
    ).astype(np.float32)


def av_file(
    fmt: str,
    audio_codec: str | None,
    *,
    seconds: float = 1.5,
    rate: int = 44100,
    channels: int = 2,
    video_codec: str | None = None,
    bit_rate: int | None = None,
    options: dict | None = None,
) -> bytes:
    """A file from FFmpeg's muxer `fmt` with an audio track (and a small video track when video_codec is set)."""
    layout = "mono" if channels == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt, options=options or {}) as container:
        video = None
        if video_codec:
            video = container.add_stream(video_codec, rate=10)
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        if audio_codec:
            audio = container.add_stream(audio_codec, rate=rate, layout=layout)
            if bit_rate:
                audio.bit_rate = bit_rate
            frame = av.AudioFrame.from_ndarray(tones(seconds, rate, channels), format="fltp", layout=layout)
            frame.sample_rate = rate
            resampler = av.AudioResampler(
                format=audio.codec_context.codec.audio_formats[0].name,
                layout=layout,
                rate=rate,
                frame_size=audio.codec_context.frame_size or None,
            )
            for converted in [*resampler.resample(frame), *resampler.resample(None)]:
                for packet in audio.encode(converted):
                    container.mux(packet)
            for packet in audio.encode(None):
                container.mux(packet)
        if video is not None:
            for index in range(max(1, round(seconds * 10))):
                picture = np.full((48, 64, 3), (index * 20) % 256, np.uint8)
                image = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
                image.pts = index
                for packet in video.encode(image):
                    container.mux(packet)
            for packet in video.encode(None):
                container.mux(packet)
    return buffer.getvalue()


def lame_mp3(seconds: float, rate: int = 44100, channels: int = 2, vbr: bool = True, seed: int = 0) -> bytes:
    """A real LAME MP3 (Xing or Info header with a LAME tag, as FFmpeg writes it): tones plus a little noise."""
    layout = "mono" if channels == 1 else "stereo"
    x = tones(seconds, rate, channels, seed)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout=layout)
        if vbr:
            stream.codec_context.qscale = 4
            stream.codec_context.flags |= av.codec.context.Flags.qscale
        frame = av.AudioFrame.from_ndarray(x, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buffer.getvalue()


def _xing(data: bytes) -> tuple[int, int]:
    """(offset of the Xing/Info tag, offset of the header of the frame holding it)."""
    for tag in _XING_TAGS:
        at = data.find(tag)
        for side_info in (32, 17, 9):  # MPEG-1 stereo, MPEG-1 mono or MPEG-2 stereo, MPEG-2 mono
            header = at - 4 - side_info
            if at > 0 and header >= 0 and data[header] == 0xFF and data[header + 1] & 0xE0 == 0xE0:
                return at, header
    raise ValueError("no Xing/Info header")


def _lame_tag_offset(data: bytes, xing: int) -> int:
    flags = struct.unpack(">I", data[xing + 4 : xing + 8])[0]
    offset = xing + 8
    offset += 4 if flags & _FRAMES else 0
    offset += 4 if flags & _BYTES else 0
    offset += 100 if flags & _TOC else 0
    offset += 4 if flags & _QUALITY else 0
    return offset


def _crc16(data: bytes) -> int:
    """CRC-16/ARC, the LAME tag's checksum."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _fix_lame_crc(data: bytearray, xing: int, header: int) -> None:
    lame = _lame_tag_offset(data, xing)
    struct.pack_into(">H", data, lame + 34, _crc16(bytes(data[header : lame + 34])))


def xing_frames(data: bytes) -> int:
    xing, _ = _xing(data)
    return struct.unpack(">I", data[xing + 8 : xing + 12])[0]


def overstate_xing(data: bytes, factor: int) -> bytes:
    """The Xing/Info frame and byte counts multiplied by factor (the LAME tag's CRC kept valid)."""
    xing, _ = _xing(data)
    frames, size = struct.unpack(">II", data[xing + 8 : xing + 16])
    return set_xing_counts(data, frames * factor, size * factor)


def set_xing_counts(data: bytes, frames: int, size: int | None = None) -> bytes:
    """The Xing/Info frame count (and byte count) set by hand, the LAME tag's CRC kept valid."""
    out = bytearray(data)
    xing, header = _xing(data)
    size = struct.unpack(">I", data[xing + 12 : xing + 16])[0] if size is None else size
    struct.pack_into(">II", out, xing + 8, min(frames, 0xFFFFFFFF), min(size, 0xFFFFFFFF))
    _fix_lame_crc(out, xing, header)
    return bytes(out)


def overstate_lame(data: bytes, delay: int = 0xFFF, padding: int = 0xFFF, music_length: int | None = None) -> bytes:
    """The LAME tag's encoder delay and padding (12 bits each) and music length set by hand, CRC kept valid."""
    out = bytearray(data)
    xing, header = _xing(data)
    lame = _lame_tag_offset(data, xing)
    out[lame + 21 : lame + 24] = ((delay << 12) | padding).to_bytes(3, "big")
    if music_length is not None:
        struct.pack_into(">I", out, lame + 28, music_length)
    _fix_lame_crc(out, xing, header)
    return bytes(out)


def vbri(data: bytes, frame_factor: int = 1) -> bytes:
    """The Xing frame rewritten as a Fraunhofer VBRI frame claiming frame_factor times the real frame count."""
    out = bytearray(data)
    xing, header = _xing(data)
    frames = xing_frames(data)
    size = len(data) - header
    body = header + 4 + 32  # VBRI sits 32 bytes after the frame header, whatever the channel mode
    fields = (1, 576, 75, size * frame_factor, frames * frame_factor, 0, 1, 2, 1)  # no TOC entries
    vbri_fields = b"VBRI" + struct.pack(">HHHIIHHHH", *fields)
    end = _lame_tag_offset(data, xing) + 36
    out[xing:end] = bytes(end - xing)
    out[body : body + len(vbri_fields)] = vbri_fields
    return bytes(out)


def with_id3v1(data: bytes) -> bytes:
    """A 128-byte ID3v1 tag after the audio."""
    fields = (b"Hostile title", b"Artist", b"Album")
    return data + b"TAG" + b"".join(f.ljust(30, b"\0") for f in fields) + b"2024" + bytes(30) + b"\x0c"


def with_apev2(data: bytes, lyrics_bytes: int = 6000, cover_bytes: int = 4000) -> bytes:
    """An APEv2 tag after the audio: header, a Lyrics text item, a binary cover-art item (random bytes), footer."""
    lyrics = (b"la la la, " * (lyrics_bytes // 10 + 1))[:lyrics_bytes]
    cover = np.random.default_rng(len(data)).bytes(cover_bytes)
    items = [(b"Lyrics", lyrics, 0), (b"Cover Art (Front)", b"cover.jpg\0" + cover, 2)]  # flags 2: binary
    body = b"".join(struct.pack("<II", len(value), flags) + key + b"\0" + value for key, value, flags in items)
    size = len(body) + 32

    def block(flags: int) -> bytes:
        return b"APETAGEX" + struct.pack("<IIII", 2000, size, len(items), flags) + bytes(8)

    return data + block(0xA0000000) + body + block(0x80000000)
