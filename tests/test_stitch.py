"""Stitching staged audio windows into one row per clip: whole clips, failed windows, runs killed part-way."""

from __future__ import annotations

import json

import pyarrow as pa

from pipelines.output import ERROR_COLUMNS, ERRORS, RESULT_COLUMNS, RESULTS, WINDOW_COLUMNS, WINDOWS, OutputDir
from pipelines.stitch import stitch_windows


def window(item: str, index: int, total: int, text: str = "", error: str | None = None) -> dict:
    row = {key: None for key in WINDOW_COLUMNS}
    row.update(id=f"{item}#w{index}", item_id=item, source=f"/in/{item}", task="transcribe", window_total=total)
    if error is not None:
        return {**row, "error": error, "error_stage": "generate"}
    span = [30.0 * index, 30.0 * index + 30.0]
    return {
        **row,
        "text": text,
        "segments": json.dumps([{"start_s": span[0], "end_s": span[1], "text": text}]),
        "prompt_tokens": 10,
        "image_tokens": 0,
        "audio_tokens": 750,
        "output_tokens": 3,
        "finish_reason": "stop",
        "model": "tiny",
        "latency_s": 0.5,
        "spec_drafted": 2,
        "spec_accepted": 1,
    }


def stage(out: OutputDir, name: str, rows: list[dict]) -> None:
    table = pa.table({k: pa.array([r[k] for r in rows], type=pa.type_for_alias(t)) for k, t in WINDOW_COLUMNS.items()})
    out.write_part(table, f"{WINDOWS}/part-{name}.parquet")


def rows(out: OutputDir, folder: str) -> dict[str, dict]:
    table = out.read_table(folder)
    return {} if table is None else {row["id"]: row for row in table.to_pylist()}


def test_a_whole_clip_becomes_one_row_in_window_order(tmp_path):
    out = OutputDir(str(tmp_path), {})
    stage(out, "b", [window("talk.mp3", 2, 3, "third"), window("talk.mp3", 0, 0, "first")])
    stage(out, "a", [window("talk.mp3", 1, 0, "")])  # a silent window adds no text
    counts = stitch_windows(out)
    assert (counts.succeeded, counts.failed, counts.pending) == (1, 0, 0)
    (row,) = rows(out, RESULTS).values()
    assert row["id"] == row["item_id"] == "talk.mp3" and row["text"] == "first third"
    assert [s["start_s"] for s in json.loads(row["segments"])] == [0.0, 30.0, 60.0]
    assert (row["audio_tokens"], row["output_tokens"], row["spec_drafted"], row["spec_accepted"]) == (2250, 9, 6, 3)
    assert row["latency_s"] == 1.5 and set(row) == set(RESULT_COLUMNS)
    assert out.parts(WINDOWS) == []


def test_a_failed_window_fails_its_clip_with_the_window_named(tmp_path):
    out = OutputDir(str(tmp_path), {})
    stage(out, "a", [window("a.wav", 0, 0, "x"), window("a.wav", 1, 2, error="CUDA error: device-side assert")])
    counts = stitch_windows(out)
    assert (counts.succeeded, counts.failed) == (0, 1)
    (error,) = rows(out, ERRORS).values()
    assert error["id"] == "a.wav" and error["stage"] == "generate" and set(error) == set(ERROR_COLUMNS)
    assert error["error"] == "audio window 2 of 2: CUDA error: device-side assert"
    assert rows(out, RESULTS) == {}


def test_a_clip_missing_windows_stays_staged_and_its_finished_windows_count_as_done(tmp_path):
    out = OutputDir(str(tmp_path), {})
    stage(out, "a", [window("long.flac", 0, 0, "one"), window("long.flac", 1, 0, error="boom")])
    counts = stitch_windows(out)
    assert (counts.succeeded, counts.failed, counts.pending) == (0, 0, 1)
    assert set(rows(out, WINDOWS)) == {"long.flac#w0", "long.flac#w1"}
    assert list(out.done_ids(retry_failed=True)) == ["long.flac#w0"]  # the failed window is generated again

    stage(out, "b", [window("long.flac", 1, 0, "two"), window("long.flac", 2, 3, "three")])  # the next run
    assert stitch_windows(out).succeeded == 1
    assert rows(out, RESULTS)["long.flac"]["text"] == "one two three"
    assert out.parts(WINDOWS) == []


def test_windows_of_a_clip_that_already_has_its_row_are_dropped(tmp_path):
    out = OutputDir(str(tmp_path), {})
    error = {
        "id": "bad.mp3",
        "item_id": "bad.mp3",
        "source": "/in/bad.mp3",
        "task": "transcribe",
        "stage": "prepare",
        "error": "decoding failed part-way",
    }
    out.write_part(pa.Table.from_pylist([error]), f"{ERRORS}/part-x.parquet")
    stage(out, "a", [window("bad.mp3", 0, 0, "made before the decoder failed")])
    counts = stitch_windows(out)
    assert (counts.succeeded, counts.failed, counts.pending) == (0, 0, 0)
    assert rows(out, RESULTS) == {} and out.parts(WINDOWS) == []
