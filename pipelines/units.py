"""Prepared units as plain Arrow-friendly rows, and back.

A unit is what ends as exactly one output row: an image, a text, a document page window, an audio clip of one window,
or one window of a longer clip (`ITEM#wN`, stitched into the clip's row after the run, see pipelines/stitch.py).
A unit holds one or more requests; their arrays are concatenated with per-request counts, so every column is a flat
array or a scalar.
"""

from __future__ import annotations

import json

import numpy as np

from pipelines.engines.base import PreparedRequest, SamplingParams
from pipelines.media.image import PATCH_DIM

FRAME = 640
CHAT_TASK = "chat"  # the task of a unit from an OpenAI batch file: its own request says what to do

# The columns of a prepared unit, besides the arrays `pack` makes: where it comes from, what to do with it, and
# `error`/`error_stage`/`error_code` (set, with empty arrays, when preparing it failed).
UNIT_FIELDS = (
    "id",
    "item_id",
    "source",
    "task",
    "error",
    "error_stage",
    "error_code",
    "segments_in",
    "pages",
    "window_total",
)
UNIT_ARRAYS = (
    "request_ids",
    "prompt_token_ids",
    "prompt_lengths",
    "mm_token_type_ids",
    "image_patches",
    "image_positions",
    "image_tokens_each",
    "images_per_request",
    "audio_frames",
    "audio_tokens_each",
    "audio_per_request",
    "sampling",
)
UNIT_COLUMNS = UNIT_FIELDS + UNIT_ARRAYS


def empty_arrays() -> dict:
    """The array columns of a unit that carries no requests (an error row)."""
    return {
        "request_ids": "[]",
        "prompt_token_ids": np.zeros(0, np.int32),
        "prompt_lengths": np.zeros(0, np.int32),
        "mm_token_type_ids": np.zeros(0, np.int8),
        "image_patches": np.zeros((0, PATCH_DIM), np.uint8),
        "image_positions": np.zeros((0, 2), np.int16),
        "image_tokens_each": np.zeros(0, np.int32),
        "images_per_request": np.zeros(0, np.int32),
        "audio_frames": np.zeros((0, FRAME), np.float32),
        "audio_tokens_each": np.zeros(0, np.int32),
        "audio_per_request": np.zeros(0, np.int32),
        "sampling": "{}",
    }


def to_columns(rows: list[dict]) -> dict:
    """Rows -> a Ray Data batch; array-valued columns become object arrays of arrays (Ray stores them ragged)."""
    if not rows:
        return {}
    columns = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], np.ndarray):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            columns[key] = column
        else:
            columns[key] = np.asarray(values, dtype=object)
    return columns


def array_bytes(unit: dict) -> int:
    return sum(value.nbytes for value in unit.values() if isinstance(value, np.ndarray))


def _counts(values) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int32)


def pack(requests: list[PreparedRequest]) -> dict:
    """The arrays of a unit's requests, concatenated."""
    images = [p for r in requests for p in r.image_patches]
    positions = [p for r in requests for p in r.image_positions]
    audio = [f for r in requests for f in r.audio_frames]
    sampling = requests[0].sampling
    return {
        "request_ids": json.dumps([r.id for r in requests]),
        "prompt_token_ids": np.concatenate([r.prompt_token_ids for r in requests]).astype(np.int32),
        "prompt_lengths": _counts(r.prompt_tokens for r in requests),
        "mm_token_type_ids": np.concatenate([r.mm_token_type_ids for r in requests]).astype(np.int8),
        "image_patches": np.concatenate(images) if images else np.zeros((0, PATCH_DIM), np.uint8),
        "image_positions": np.concatenate(positions) if positions else np.zeros((0, 2), np.int16),
        "image_tokens_each": _counts(p.shape[0] for p in images),
        "images_per_request": _counts(len(r.image_patches) for r in requests),
        "audio_frames": np.concatenate(audio) if audio else np.zeros((0, FRAME), np.float32),
        "audio_tokens_each": _counts(f.shape[0] for f in audio),
        "audio_per_request": _counts(len(r.audio_frames) for r in requests),
        "sampling": json.dumps({**sampling.__dict__, "stop": list(sampling.stop)}),
    }


def unpack(row: dict) -> list[PreparedRequest]:
    ids = json.loads(row["request_ids"])
    params = json.loads(row["sampling"])
    bias = tuple((int(token), float(value)) for token, value in params.get("logit_bias", ()))
    sampling = SamplingParams(**{**params, "stop": tuple(params["stop"]), "logit_bias": bias})
    prompts = _split(row["prompt_token_ids"], row["prompt_lengths"])
    types = _split(row["mm_token_type_ids"], row["prompt_lengths"])
    patches = _split(_rows(row["image_patches"], PATCH_DIM, np.uint8), row["image_tokens_each"])
    positions = _split(_rows(row["image_positions"], 2, np.int16), row["image_tokens_each"])
    frames = _split(_rows(row["audio_frames"], FRAME, np.float32), row["audio_tokens_each"])
    requests, image_at, audio_at = [], 0, 0
    for index, request_id in enumerate(ids):
        n_images, n_audio = int(row["images_per_request"][index]), int(row["audio_per_request"][index])
        requests.append(
            PreparedRequest(
                id=request_id,
                prompt_token_ids=prompts[index],
                mm_token_type_ids=types[index],
                image_patches=patches[image_at : image_at + n_images],
                image_positions=positions[image_at : image_at + n_images],
                audio_frames=frames[audio_at : audio_at + n_audio],
                sampling=sampling,
            )
        )
        image_at += n_images
        audio_at += n_audio
    return requests


def _rows(array, width: int, dtype) -> np.ndarray:
    # Ray may hand back an empty tensor without its trailing dimension.
    array = np.asarray(array, dtype=dtype)
    return array.reshape(-1, width)


def _split(array: np.ndarray, counts) -> list[np.ndarray]:
    counts = np.asarray(counts, dtype=np.int64)
    return np.split(np.asarray(array), np.cumsum(counts)[:-1]) if len(counts) else []
