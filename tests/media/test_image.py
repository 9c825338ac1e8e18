"""Our image path against transformers' Gemma4UnifiedImageProcessor, bit for bit."""

from __future__ import annotations

import io

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


def test_palette_gif_with_transparency_matches_transformers(reference):
    image = Image.fromarray(_photo(200, 320)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    data = _encode(image, "GIF", transparency=0)
    assert_matches_reference(reference, data, Image.open(io.BytesIO(data)), 280)


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


def test_truncated_image_is_a_decode_error():
    data = _encode(Image.fromarray(_photo(256, 256)), "JPEG")
    with pytest.raises(DecodeError, match="photo.jpg"):
        prepare_image(data[: len(data) // 3], item="photo.jpg")


@pytest.mark.parametrize("data", [b"", b"\x00" * 100, np.random.default_rng(1).bytes(5000)], ids=["empty", "zeros", "random"])
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
