"""Our image path against transformers' Gemma4UnifiedImageProcessor, bit for bit."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded
from pipelines.media.image import (
    PATCH,
    SUPPORTED_SOFT_TOKENS,
    decode_image,
    prepare_image,
    target_size,
)

SIZES = [(48, 48), (224, 224), (480, 640), (1080, 1920), (37, 999), (3000, 20)]


@pytest.fixture(scope="module")
def reference():
    from transformers.models.gemma4_unified import Gemma4UnifiedImageProcessor

    return Gemma4UnifiedImageProcessor()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x[..., None] / 23.0 + y[..., None] / 37.0 + np.arange(3))
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def assert_matches_reference(reference, data: bytes, reference_image: Image.Image, budget: int) -> None:
    ours = prepare_image(data, max_soft_tokens=budget)
    expected = reference(images=reference_image, max_soft_tokens=budget, return_tensors="pt")
    count = int(expected["num_soft_tokens_per_image"][0])
    assert ours.tokens == count
    assert ours.patches.dtype == np.uint8 and ours.patches.shape == (count, PATCH * PATCH * 3)
    assert ours.positions.dtype == np.int16 and ours.positions.shape == (count, 2)
    assert torch.equal(torch.from_numpy(ours.positions).long(), expected["image_position_ids"][0, :count])
    # The model side rescales exactly like the processor does: uint8 tensor * (1/255).
    assert torch.equal(torch.from_numpy(ours.patches) * (1 / 255), expected["pixel_values"][0, :count])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("budget", [70, 280, 1120])
def test_sizes_and_budgets_match_transformers(reference, size, budget):
    data = _encode(Image.fromarray(_photo(*size)), "PNG")
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), budget)


@pytest.mark.parametrize("budget", [140, 560])
def test_jpeg_matches_transformers(reference, budget):
    data = _encode(Image.fromarray(_photo(768, 1024)), "JPEG", quality=90)
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), budget)


def test_palette_png_matches_transformers(reference):
    image = Image.fromarray(_photo(300, 500)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    data = _encode(image, "PNG")
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), 280)


# transformers before 5.23 (constraints-gpu.txt's 5.20) converts images with transparency to RGB without compositing
# on white; ours follows 5.23. vLLM never sees the difference: it gets our already composited RGB image.
_COMPOSITES_ON_WHITE = pytest.mark.skipif(
    tuple(int(p) for p in __import__("transformers").__version__.split(".")[:2]) < (5, 23),
    reason="this transformers does not composite transparency on white",
)


@_COMPOSITES_ON_WHITE
def test_palette_gif_with_transparency_matches_transformers(reference):
    image = Image.fromarray(_photo(200, 320)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    data = _encode(image, "GIF", transparency=0)
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), 280)


@_COMPOSITES_ON_WHITE
def test_alpha_is_composited_on_white_like_transformers(reference):
    rgba = np.dstack([_photo(256, 384), np.tile(np.linspace(0, 255, 384, dtype=np.uint8), (256, 1))])
    data = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), 280)
    # Fully transparent pixels become white.
    rgb = decode_image(data)
    assert (rgb[:, 0] == 255).all()


def test_cmyk_jpeg_matches_transformers(reference):
    data = _encode(Image.fromarray(_photo(400, 300)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), 280)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_formats_match_transformers(reference, fmt):
    data = _encode(Image.fromarray(_photo(333, 444)), fmt)
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), 280)


def test_exif_orientation_is_applied():
    photo = _photo(300, 500)  # landscape pixels, tagged "rotate 90 CW" (orientation 6): shows as portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(photo), "JPEG", quality=95, exif=exif.tobytes())
    rgb = decode_image(data)
    assert rgb.shape == (500, 300, 3)
    plain = decode_image(_encode(Image.fromarray(photo), "JPEG", quality=95))
    assert np.array_equal(rgb, np.rot90(plain, k=-1))


def test_exif_rotated_matches_transformers_on_the_upright_image(reference):
    exif = Image.Exif()
    exif[0x0112] = 8
    data = _encode(Image.fromarray(_photo(240, 480)), "JPEG", quality=95, exif=exif.tobytes())
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert_matches_reference(reference, data, upright, 280)


def test_sixteen_bit_png_is_scaled_not_clipped(reference):
    ramp = np.tile(np.linspace(0, 65535, 512).astype(np.uint16), (128, 1))
    data = _encode(Image.fromarray(ramp), "PNG")
    rgb = decode_image(data)
    expected_gray = (ramp >> 8).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected_gray) and np.array_equal(rgb[..., 2], expected_gray)
    # From the 8-bit image on, the path equals transformers'.
    eight_bit = Image.fromarray(np.repeat(expected_gray[..., None], 3, axis=2))
    assert_matches_reference(reference, data, eight_bit, 280)


def png(pixels: np.ndarray, color_type: int, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour or tRNS on 16-bit gray)."""
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + (chunk(b"tRNS", trns) if trns else b"")
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_sixteen_bit_gray_with_trns_is_composited_on_white_and_scaled():
    values = np.array([[0, 1000, 40000, 65535], [1000, 2, 256, 1000]], np.uint16)
    data = png(values, color_type=0, trns=struct.pack(">H", 1000))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = decode_image(data)
    expected = np.where(values == 1000, 255, values >> 8).astype(np.uint8)
    assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


def test_sixteen_bit_rgb_with_trns_is_composited_on_white():
    values = np.zeros((2, 3, 3), np.uint16)
    values[0, 0] = (0x1234, 0x5678, 0x9ABC)  # the transparent colour
    values[0, 1] = (0x8000, 0x4000, 0x2000)
    values[1, 2] = (0x1234, 0x5678, 0x9ABC)
    data = png(values, color_type=2, trns=struct.pack(">HHH", 0x1234, 0x5678, 0x9ABC))
    rgb = decode_image(data)
    assert (rgb[0, 0] == 255).all() and (rgb[1, 2] == 255).all()
    assert rgb[0, 1].tolist() == [0x80, 0x40, 0x20] and rgb[1, 0].tolist() == [0, 0, 0]


def test_sixteen_bit_gray_alpha_is_composited_on_white():
    values = np.zeros((1, 3, 2), np.uint16)
    values[..., 0] = 0x2000  # dark gray
    values[0, :, 1] = (0, 65535, 32896)  # transparent, opaque, half
    rgb = decode_image(png(values, color_type=4))
    assert rgb[0, 0].tolist() == [255] * 3 and rgb[0, 1].tolist() == [0x20] * 3
    assert 0x20 < rgb[0, 2, 0] < 255 and abs(int(rgb[0, 2, 0]) - (0x20 + 255) / 2) <= 1


@pytest.mark.parametrize("mode", ["L", "P", "RGB", "1"])
def test_trns_in_eight_bit_modes_is_composited_on_white(mode):
    image = Image.fromarray(np.array([[0, 200], [200, 0]], np.uint8)).convert(mode)
    transparent = image.getpixel((0, 0))
    rgb = decode_image(_encode(image, "PNG", transparency=transparent))
    assert rgb[0, 0].tolist() == [255] * 3 and rgb[1, 1].tolist() == [255] * 3
    assert rgb[0, 1].tolist() != [255] * 3 or mode == "1"


def test_pillow_bomb_limit_is_left_as_it_was_for_other_code():
    script = (
        "from PIL import Image; default = Image.MAX_IMAGE_PIXELS; import pipelines.media.image; "
        "assert Image.MAX_IMAGE_PIXELS == default == 89478485, Image.MAX_IMAGE_PIXELS"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_images_over_pillows_limit_follow_ours_and_pillows_stays(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2000 pixels
    data = _encode(Image.fromarray(_photo(100, 100)), "PNG")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    assert decode_image(data, max_pixels=20_000).shape == (100, 100, 3)  # our limit decides
    with pytest.raises(LimitExceeded, match="10,000 pixels"):
        decode_image(data, max_pixels=5_000)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))  # other code keeps Pillow's guard


def test_truncated_image_is_a_decode_error():
    data = _encode(Image.fromarray(_photo(256, 256)), "JPEG")
    with pytest.raises(DecodeError, match="photo.jpg"):
        prepare_image(data[: len(data) // 3], item="photo.jpg")


@pytest.mark.parametrize(
    "data", [b"", b"\x00" * 100, np.random.default_rng(1).bytes(5000)], ids=["empty", "zeros", "random"]
)
def test_garbage_is_a_decode_error(data):
    with pytest.raises(DecodeError, match="junk.bin"):
        prepare_image(data, item="junk.bin")


def test_decompression_bomb_is_refused_from_the_header():
    # A 1-bit 20000x20000 PNG compresses to a few kB; the pixel limit refuses it before decoding.
    bomb = _encode(Image.new("1", (20_000, 20_000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(LimitExceeded, match="400,000,000 pixels"):
        prepare_image(bomb, item="bomb.png")
    with pytest.raises(LimitExceeded):
        prepare_image(_encode(Image.fromarray(_photo(100, 100)), "PNG"), max_pixels=5_000)


def test_unsupported_budget_is_refused():
    with pytest.raises(InvalidRequest, match="max_soft_tokens"):
        prepare_image(_encode(Image.fromarray(_photo(48, 48)), "PNG"), max_soft_tokens=300)


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 20_000),
    width=st.integers(1, 20_000),
    budget=st.sampled_from(SUPPORTED_SOFT_TOKENS),
)
def test_target_size_never_exceeds_the_budget(height, width, budget):
    from transformers.models.gemma4_unified.image_processing_gemma4_unified import get_aspect_ratio_preserving_size

    try:
        expected = get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
    except ValueError:
        with pytest.raises(InvalidRequest):
            target_size(height, width, budget)
        return
    th, tw = target_size(height, width, budget)
    assert (th, tw) == expected
    assert th % PATCH == 0 and tw % PATCH == 0 and th > 0 and tw > 0
    assert (th // PATCH) * (tw // PATCH) <= budget
