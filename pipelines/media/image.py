"""Images -> 48x48 pixel patches with (x, y) positions, exactly as Gemma 4 Unified expects them.

The rule mirrors transformers' `Gemma4UnifiedImageProcessor`: convert to RGB (transparency composited on white),
resize aspect-preserving into the `max_soft_tokens` budget with bicubic + antialias on uint8, cut 48x48 patches in
raster order. Patches stay uint8; the model side rescales by 1/255, so four times fewer bytes cross the object store.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipelines.errors import DecodeError, InvalidRequest, LimitExceeded

PATCH = 48
PATCH_DIM = PATCH * PATCH * 3
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
DEFAULT_MAX_PIXELS = 100_000_000

# The budget is in teacher patches of 16 px merged 3x3 into one 48 px soft token.
_TEACHER_PATCH = 16
_POOLING = 3

_ORIENTATION = 0x0112

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Pillow refuses images over twice its MAX_IMAGE_PIXELS while opening them; our limit is configured separately and
# may be higher, so that refusal is lifted for the one header read it blocks, under this lock (see _open).
_PILLOW_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class PreparedImage:
    """One image as model input: uint8 patches [n, 6912] and int16 (x, y) positions [n, 2]."""

    patches: np.ndarray
    positions: np.ndarray
    decoded_size: tuple[int, int]  # (height, width) after decode and EXIF orientation
    size: tuple[int, int]  # (height, width) after resize

    @property
    def grid(self) -> tuple[int, int]:
        return self.size[0] // PATCH, self.size[1] // PATCH

    @property
    def tokens(self) -> int:
        return int(self.patches.shape[0])


def check_soft_tokens(max_soft_tokens: int) -> int:
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise InvalidRequest(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
    return max_soft_tokens


def target_size(height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> tuple[int, int]:
    """The (height, width) an image is resized to: the largest multiples of 48 inside the budget.

    Replicates `get_aspect_ratio_preserving_size` bit for bit, including its float arithmetic and the
    thin-image fallback (one side 48, the other the floored aspect ratio, capped).
    """
    max_patches = max_soft_tokens * _POOLING**2
    target_px = max_patches * _TEACHER_PATCH**2
    factor = math.sqrt(target_px / (height * width))
    th = int(math.floor(factor * height / PATCH)) * PATCH
    tw = int(math.floor(factor * width / PATCH)) * PATCH
    max_side = (max_patches // _POOLING**2) * PATCH
    if th == 0 and tw == 0:
        raise InvalidRequest(f"a {height}x{width} image cannot be resized to any 48-pixel grid")
    if th == 0:
        th, tw = PATCH, min(int(math.floor(width / height)) * PATCH, max_side)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * PATCH, max_side), PATCH
    return th, tw


def decode_image(data: bytes, *, item: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode any format Pillow reads into an RGB uint8 array [H, W, 3], honouring EXIF orientation.

    The pixel count is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. Transparency is composited on white (as transformers does); 16-bit and float images are scaled
    to 8 bits rather than clipped.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = _open(data)
            width, height = image.size
            if width * height > max_pixels:
                raise LimitExceeded(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
                    item=item,
                )
            if width == 0 or height == 0:
                raise DecodeError("image has zero width or height", item=item)
            image.load()
            if image.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even when nothing turns
                image = ImageOps.exif_transpose(image)
            return _to_rgb_array(image)
    except (LimitExceeded, DecodeError):
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read (unknown or corrupt format)", item=item) from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"corrupt or truncated image ({exc})", item=item) from None


def _open(data: bytes) -> Image.Image:
    """Image.open, reading only the header; Pillow's own size refusal does not pre-empt the configured limit.

    Pillow's limit stays as it is for every other caller: it is lifted only to re-read the header of an image it
    refused, and decode_image checks the size against max_pixels before a single pixel is decoded.
    """
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        with _PILLOW_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    transparency = image.info.get("transparency")
    if image.mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image)
        gray = _scale_to_8_bits(values, image.mode)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        if isinstance(transparency, (int, float)):  # tRNS on 16-bit gray: one value is transparent
            rgb[values == transparency] = 255  # composited on white
        return rgb
    if image.mode == "RGB" and isinstance(transparency, tuple) and max(transparency) > 255:
        # A 16-bit PNG's tRNS colour has 16 bits a channel; Pillow keeps the high 8 bits of each pixel.
        image.info["transparency"] = tuple(value >> 8 for value in transparency)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)  # one copy out of Pillow; read-only, and nothing downstream writes to it


def _scale_to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit and float gray to 8 bits by scaling the full range down, never by clipping."""
    if mode.startswith("I;16"):
        return (values >> 8).astype(np.uint8)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return np.clip(values.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic + antialias resize of a uint8 [H, W, 3] array; bit-exact with torchvision on CPU."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    import torch

    # HWC memory viewed as NCHW is channels-last, the layout torch's fast uint8 antialias kernel works in;
    # writing into a channels-last output keeps it there (interpolate() would return NCHW and cost a copy).
    height, width = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only input: the kernel only reads it
        nchw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)
    out = torch.empty((1, height, width, 3), dtype=torch.uint8)
    torch.ops.aten._upsample_bicubic2d_aa.out(nchw, [height, width], False, None, None, out=out.permute(0, 3, 1, 2))
    return out[0].numpy()


def patchify(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut [H, W, 3] (multiples of 48) into raster-ordered patches [n, 6912] and (x, y) positions [n, 2]."""
    height, width = rgb.shape[:2]
    rows, cols = height // PATCH, width // PATCH
    patches = rgb.reshape(rows, PATCH, cols, PATCH, 3).swapaxes(1, 2).reshape(rows * cols, PATCH_DIM)
    ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
    positions = np.stack([xs, ys], axis=1).astype(np.int16)
    return np.ascontiguousarray(patches), positions


def prepare_image_array(rgb: np.ndarray, max_soft_tokens: int = DEFAULT_SOFT_TOKENS) -> PreparedImage:
    check_soft_tokens(max_soft_tokens)
    height, width = rgb.shape[:2]
    size = target_size(height, width, max_soft_tokens)
    patches, positions = patchify(resize(rgb, size))
    return PreparedImage(patches=patches, positions=positions, decoded_size=(height, width), size=size)


def prepare_image(
    data: bytes,
    *,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    item: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Bytes of an image file -> patches and positions ready for the model."""
    return prepare_image_array(decode_image(data, item=item, max_pixels=max_pixels), max_soft_tokens)
