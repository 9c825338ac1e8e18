"""The Prepare and Write stages called on plain batches, as Ray Data would call them, without Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from pipelines.config import InputSpec, JobSpec, OutputSpec, TaskSpec
from pipelines.output import ERROR_COLUMNS, RESULT_COLUMNS
from pipelines.sources import iter_listing
from pipelines.stages import Prepare, Write
from pipelines.units import unpack


def _png(path, size=(96, 64)) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _wav(path, seconds: float, rate: int = 16_000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


def _listing(folder) -> dict:
    rows = list(iter_listing(InputSpec(url=str(folder))))
    return {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}


def _prepare(folder, task: str, tokenizer) -> list[dict]:
    job = JobSpec(input=InputSpec(url=str(folder)), task=TaskSpec(task=task), output=OutputSpec(url=str(folder)))
    stage = Prepare(job)
    stage.tokenizer = lambda: tokenizer
    units = []
    for batch in stage(_listing(folder)):
        units += [{key: values[i] for key, values in batch.items()} for i in range(len(batch["id"]))]
    return units


def test_prepare_turns_a_listing_batch_into_units_and_error_rows(tmp_path, tokenizer):
    _png(tmp_path / "photo.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # a JPEG header and nothing else
    (tmp_path / "notes.bin").write_bytes(bytes(range(256)) * 4)
    units = {unit["id"]: unit for unit in _prepare(tmp_path, "caption", tokenizer)}

    assert sorted(units) == ["broken.jpg", "notes.bin", "photo.png"]
    photo = units["photo.png"]
    assert photo["error"] is None and photo["item_id"] == "photo.png" and photo["task"] == "caption"
    (request,) = unpack(photo)
    assert request.id == "photo.png" and len(request.image_patches) == 1
    patches = request.image_patches[0]
    assert patches.dtype == np.uint8 and patches.shape[1] == 48 * 48 * 3  # raw 48x48 RGB patches, not rescaled
    assert request.image_positions[0].dtype == np.int16
    assert int((request.prompt_token_ids == tokenizer.image_token_id).sum()) == patches.shape[0]

    for name, says in (("broken.jpg", "not an image"), ("notes.bin", "not an image")):
        bad = units[name]
        assert bad["source"] == str(tmp_path / name) and bad["error_stage"] == "prepare", bad
        assert says in bad["error"], bad["error"]
        assert len(bad["prompt_token_ids"]) == 0  # an error row carries no model input


def test_prepare_splits_long_audio_into_windows_that_know_their_count(tmp_path, tokenizer):
    _wav(tmp_path / "talk.wav", 65.0)
    _wav(tmp_path / "short.wav", 2.0)
    units = {unit["id"]: unit for unit in _prepare(tmp_path, "transcribe", tokenizer)}

    assert sorted(units) == ["short.wav", "talk.wav#w0", "talk.wav#w1", "talk.wav#w2"]
    assert units["short.wav"]["window_total"] is None  # one window: the clip's own row, nothing to stitch
    assert [units[f"talk.wav#w{i}"]["window_total"] for i in range(3)] == [0, 0, 3]  # the last one carries the count
    spans = [json.loads(units[f"talk.wav#w{i}"]["segments_in"])[0] for i in range(3)]
    assert spans == [[0.0, 30.0], [30.0, 60.0], [60.0, 65.0]]
    frames = sum(len(unpack(units[f"talk.wav#w{i}"])[0].audio_frames[0]) for i in range(3))
    assert frames == int(np.ceil(65 * 16_000 / 640))


def test_prepare_names_the_missing_columns():
    job = JobSpec(input=InputSpec(url="x"), task=TaskSpec(task="caption"), output=OutputSpec(url="y"))
    with pytest.raises(Exception, match="prepare.*uri"):
        list(Prepare(job)({"id": np.array(["a"], dtype=object)}))


def _generated_rows() -> pa.Table:
    base = {column: None for column in RESULT_COLUMNS}
    rows = [
        {
            **base,
            "id": "a.png",
            "item_id": "a.png",
            "source": "a.png",
            "task": "caption",
            "text": "a cat",
            "output_tokens": 3,
            "prompt_tokens": 10,
            "error": None,
            "error_stage": None,
            "error_code": None,
            "window_total": None,
        },
        {
            **base,
            "id": "b.jpg",
            "item_id": "b.jpg",
            "source": "b.jpg",
            "task": "caption",
            "error": "b.jpg: truncated",
            "error_stage": "prepare",
            "error_code": "invalid_media",
            "window_total": None,
        },
        {
            **base,
            "id": "t.wav#w0",
            "item_id": "t.wav",
            "source": "t.wav",
            "task": "transcribe",
            "text": "hello",
            "output_tokens": 2,
            "prompt_tokens": 50,
            "error": None,
            "error_stage": None,
            "error_code": None,
            "window_total": 2,
            "segments": json.dumps([{"start_s": 0.0, "end_s": 30.0, "text": "hello"}]),
        },
    ]
    return pa.Table.from_pylist(rows)


def test_write_sorts_rows_into_results_errors_and_staged_windows(tmp_path):
    table = _generated_rows()
    stats = Write(str(tmp_path), {})(table)

    assert {key: int(value[0]) for key, value in stats.items() if key in ("succeeded", "failed", "output_tokens")} == {
        "succeeded": 1,
        "failed": 1,
        "output_tokens": 5,
    }  # the window's tokens count: they were generated now
    (result,) = [pq.read_table(p) for p in (tmp_path / "results").glob("*.parquet")]
    (error,) = [pq.read_table(p) for p in (tmp_path / "errors").glob("*.parquet")]
    assert result.column_names == list(RESULT_COLUMNS) and result.column("id").to_pylist() == ["a.png"]
    assert error.column_names == list(ERROR_COLUMNS)
    assert error.to_pylist()[0]["error"] == "b.jpg: truncated" and error.to_pylist()[0]["code"] == "invalid_media"
    windows = list((tmp_path / "_windows").rglob("*.parquet"))
    assert len(windows) == 1 and pq.read_table(windows[0]).column("id").to_pylist() == ["t.wav#w0"]


def test_a_retried_write_replaces_its_own_part(tmp_path):
    table = _generated_rows()
    Write(str(tmp_path), {})(table)
    Write(str(tmp_path), {})(table.take([1, 0, 2]))  # the same rows in another order, as a retried task may see
    assert len(list((tmp_path / "results").glob("*.parquet"))) == 1
    assert len(list((tmp_path / "errors").glob("*.parquet"))) == 1
