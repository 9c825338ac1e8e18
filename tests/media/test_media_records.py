"""No lost records: `inspect` and the batch Prepare stage over the real-media sample, hostile files and a file
whose decoding raises something nobody planned for. Every file ends as exactly one record (inspect) or one unit or
error row (batch), and inspect prints each record as soon as its file is done."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from media_makers import av_file, lame_mp3, overstate_lame, overstate_xing, with_apev2
from typer.testing import CliRunner

from jobs.cli import app
from jobs.media_report import inspect_files
from pipelines.config import InputSpec, JobSpec, MediaSpec, OutputSpec, TaskSpec
from pipelines.media import sniff as sniff_module
from pipelines.prompts import Task, TaskOptions
from pipelines.stages import Prepare

REAL_MEDIA = Path(__file__).parent / "data" / "real-media"
EXPECTED = json.loads((REAL_MEDIA / "expected.json").read_text())

CRASH = b"CRASH"  # files starting with this make the sniffer raise, as a decoder bug would


@pytest.fixture
def media(tmp_path) -> Path:
    """The real-media sample plus files made to break things, in one folder."""
    folder = tmp_path / "media"
    folder.mkdir()
    for name in EXPECTED:
        shutil.copy(REAL_MEDIA / name, folder / name)
    (folder / "tiny-vbr.mp3").write_bytes(lame_mp3(0.01))
    (folder / "padding-over-length.mp3").write_bytes(overstate_lame(lame_mp3(0.01)))
    (folder / "xing-x50-apev2.mp3").write_bytes(with_apev2(overstate_xing(lame_mp3(1.0), 50)))
    (folder / "silent-video.mp4").write_bytes(av_file("mp4", None, video_codec="mpeg4"))
    (folder / "crash.wav").write_bytes(CRASH + bytes(100))
    return folder


ERRORS = {
    "padding-over-length.mp3": "audio has no samples",
    "silent-video.mp4": "no audio stream",
    "crash.wav": "RuntimeError: a decoder bug",
}


@pytest.fixture
def crashing_sniffer(monkeypatch):
    real = sniff_module.sniff

    def sniff(source):
        head = source[:5] if isinstance(source, bytes) else source.read(5)
        if not isinstance(source, bytes):
            source.seek(0)
        if head == CRASH:
            raise RuntimeError("a decoder bug")
        return real(source)

    monkeypatch.setattr(sniff_module, "sniff", sniff)


def test_inspect_gives_every_file_its_record_and_exit_code_1(media, crashing_sniffer, tiny_dir):
    files = sorted(str(p) for p in media.iterdir())
    result = CliRunner().invoke(app, ["inspect", *files, "--json", "--task", "transcribe"])
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["file"] for r in records] == files  # one each, in order
    by_name = {Path(r["file"]).name: r for r in records}
    for name, message in ERRORS.items():
        assert message in by_name[name]["error"] and name in by_name[name]["error"]
    for name, expected in EXPECTED.items():
        record = by_name[name]
        assert record["error"] is None and record["modality"] == "audio"
        assert record["tokens"] == expected["tokens"]
        assert record["duration_s"] == pytest.approx(expected["duration_s"], abs=0.04)
    assert by_name["tiny-vbr.mp3"]["tokens"] == 1 and by_name["xing-x50-apev2.mp3"]["duration_s"] < 1.1


def test_batch_prepare_gives_every_file_one_unit_or_error_row(media, crashing_sniffer, tiny_dir, tmp_path):
    job = JobSpec(
        input=InputSpec(url=str(media)),
        task=TaskSpec(task="transcribe", language="English"),
        output=OutputSpec(url=str(tmp_path / "out")),
    )
    names = sorted(p.name for p in media.iterdir())
    batch = {"id": names, "uri": [str(media / n) for n in names], "container": ["file"] * len(names)}
    rows = {key: [] for key in ("id", "item_id", "error", "error_stage", "window_total")}
    for part in Prepare(job)(batch):
        for key in rows:
            rows[key].extend(part[key])
    units: dict[str, list[str]] = {}
    for unit_id, item_id in zip(rows["id"], rows["item_id"]):
        units.setdefault(item_id, []).append(unit_id)
    assert sorted(units) == names  # every file is one unit, its windows, or one error row
    for name, unit_ids in units.items():
        assert unit_ids == [name] or unit_ids == [f"{name}#w{k}" for k in range(len(unit_ids))]
    totals = {i: t for i, t in zip(rows["id"], rows["window_total"]) if t}
    assert all(i.endswith(f"#w{t - 1}") for i, t in totals.items())  # the last window carries the count
    errors = {i: (e, s) for i, e, s in zip(rows["id"], rows["error"], rows["error_stage"]) if e is not None}
    assert set(errors) == set(ERRORS)
    for name, message in ERRORS.items():
        assert message in errors[name][0] and errors[name][1] == "prepare"


def test_inspect_yields_each_record_before_reading_the_next_file(media, tokenizer):
    pulled = []

    def urls():
        for name in ("mutagen__tests__data__ep7.m4b", "crash.wav"):
            pulled.append(name)
            yield str(media / name)

    options = TaskOptions(task=Task.transcribe, language="English")
    records = inspect_files(urls(), tokenizer=tokenizer, options=options, limits=MediaSpec())
    first = next(records)
    assert first["tokens"] == EXPECTED["mutagen__tests__data__ep7.m4b"]["tokens"]
    assert pulled == ["mutagen__tests__data__ep7.m4b"]  # the second file is not even named yet
    second = next(records)
    assert pulled == ["mutagen__tests__data__ep7.m4b", "crash.wav"] and "crash.wav" in second["error"]


def test_inspect_prints_a_record_while_the_next_file_is_still_unread(media, tiny_dir):
    """End to end through a pipe: the first record arrives while opening the second file (a FIFO) still blocks."""
    fifo = media / "later.wav"
    os.mkfifo(fifo)
    first = media / "mutagen__tests__data__ep7.m4b"
    command = [
        sys.executable,
        "-c",
        "from jobs.cli import app; app()",
        "inspect",
        str(first),
        str(fifo),
        "--json",
        "--task",
        "transcribe",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        got = {}
        reader = threading.Thread(target=lambda: got.update(line=process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=240)
        assert json.loads(got["line"])["tokens"] == EXPECTED[first.name]["tokens"]
        assert process.poll() is None  # still blocked opening the FIFO, which has no writer
        open(fifo, "wb").close()
        out, _ = process.communicate(timeout=240)
        second = json.loads(out.splitlines()[0])
        assert second["file"] == str(fifo) and str(fifo) in second["error"]  # a pipe cannot be opened seekable
        assert process.returncode == 1
    finally:
        if process.poll() is None:
            process.kill()
