"""The batch job end to end on a real local Ray cluster, against local paths and a real S3-compatible server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.demo.samples import document, make_images, speech
from pipelines.batch import run
from pipelines.config import InputSpec, JobSpec, MediaSpec, OutputSpec, ResourcesSpec, TaskSpec
from pipelines.errors import StorageError
from pipelines.output import SpecMismatch

pytestmark = pytest.mark.slow


def job(input_url, output_url, task: TaskSpec, storage=None, **sections) -> JobSpec:
    return JobSpec(
        input=InputSpec(url=str(input_url), storage_options=storage or {}),
        task=task,
        output=OutputSpec(url=str(output_url), storage_options=storage or {}, **sections.pop("output", {})),
        resources=ResourcesSpec(**{"batch_size": 4, **sections.pop("resources", {})}),
        **sections,
    )


def read(output, folder: str, storage=None) -> list[dict]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(output), **(storage or {}))
    rows = []
    for part in sorted(fs.glob(f"{root}/{folder}/*.parquet")):
        with fs.open(part, "rb") as handle:
            rows += pq.read_table(handle).to_pylist()
    return rows


def ids(rows) -> list[str]:
    return sorted(r["id"] for r in rows)


def assert_no_duplicates(results, errors):
    counts = Counter(r["id"] for r in results + errors)
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]


CAPTION = TaskSpec(task="caption", max_new_tokens=6)


def test_caption_with_bad_items_as_error_rows(ray_cluster, tmp_path):
    source = tmp_path / "in"
    make_images(source, 3)
    (source / "truncated.jpg").write_bytes((source / "image_0.jpg").read_bytes()[:500])
    (source / "noise.png").write_bytes(np.random.default_rng(0).bytes(3000))
    speech(source / "speech.wav")  # audio cannot be captioned
    summary = run(job(source, tmp_path / "out", CAPTION), progress=False)

    results, errors = read(tmp_path / "out", "results"), read(tmp_path / "out", "errors")
    assert ids(results) == ["image_0.jpg", "image_1.png", "image_2.webp"]
    by_id = {e["id"]: e for e in errors}
    assert set(by_id) == {"truncated.jpg", "noise.png", "speech.wav"}
    assert "truncated" in by_id["truncated.jpg"]["error"] and by_id["truncated.jpg"]["stage"] == "prepare"
    assert "does not take audio" in by_id["speech.wav"]["error"]
    assert_no_duplicates(results, errors)
    assert (summary.total, summary.succeeded, summary.failed) == (6, 3, 3)
    row = results[0]
    assert row["image_tokens"] > 0 and row["output_tokens"] == 6 and row["finish_reason"] == "length"
    assert row["model"] == "tiny" and row["latency_s"] > 0
    assert row["spec_drafted"] is None  # the tiny model does not speculate with its random drafter by default
    manifest = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert manifest["counts"] == {"total": 6, "succeeded": 3, "failed": 3}
    assert manifest["fingerprint"] == summary.fingerprint and manifest["status"] == "partial"
    engine = manifest["engine"]  # the replica runtime's statistics: error rows never reach the engine
    assert engine["replicas"] == 1 and engine["requests"] == 3
    assert 0 < engine["busy_fraction"] <= 1 and engine["mean_batch_size"] >= 1
    assert summary.busy_fraction == engine["busy_fraction"]


def test_ray_data_batches_in_flight_are_merged_into_larger_engine_batches(ray_cluster, tmp_path):
    source = tmp_path / "in"
    make_images(source, 12)
    spec = job(source, tmp_path / "out", CAPTION, resources={"batch_size": 1, "max_concurrent_batches": 4})
    summary = run(spec, progress=False)
    assert summary.succeeded == 12 and read(tmp_path / "out", "errors") == []
    # One unit per Ray Data batch, several batches in flight on the actor: the engine still ran fuller batches.
    assert summary.engine["requests"] == 12 and summary.mean_batch_size > 1


def test_transcribe_long_audio_is_stitched_in_order(ray_cluster, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    rate = 22_050
    t = np.arange(int(rate * 65)) / rate
    sf.write(source / "long.flac", (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate)
    speech(source / "short.wav")
    summary = run(
        job(source, tmp_path / "out", TaskSpec(task="transcribe", language="English", max_new_tokens=4)), progress=False
    )
    results = {r["id"]: r for r in read(tmp_path / "out", "results")}
    assert set(results) == {"long.flac", "short.wav"} and read(tmp_path / "out", "errors") == []
    assert (summary.run_succeeded, summary.total) == (2, 2)
    assert read(tmp_path / "out", "_windows") == []  # every staged window was stitched into its clip's row
    segments = json.loads(results["long.flac"]["segments"])
    assert [(s["start_s"], s["end_s"]) for s in segments] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    assert results["long.flac"]["text"] == " ".join(s["text"] for s in segments if s["text"])
    assert results["long.flac"]["audio_tokens"] == int(np.ceil(65 * 16_000 / 640))


def test_translate_has_transcript_and_translation_columns(ray_cluster, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    speech(source / "a.wav")
    task = TaskSpec(task="translate", source_language="English", target_language="French", max_new_tokens=6)
    run(job(source, tmp_path / "out", task), progress=False)
    (row,) = read(tmp_path / "out", "results")
    assert row["task"] == "translate" and row["transcript"] is not None and row["translation"] is not None


def test_answer_splits_long_documents_into_page_windows(ray_cluster, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    document(source / "report.pdf", pages=5)
    (source / "notes.md").write_text("# Notes\nRevenue grew 12 percent.")
    task = TaskSpec(task="answer", question="What grew?", max_new_tokens=4)
    summary = run(job(source, tmp_path / "out", task, media=MediaSpec(max_pages=2, max_soft_tokens=70)), progress=False)
    results = {r["id"]: r for r in read(tmp_path / "out", "results")}
    assert set(results) == {"report.pdf#0", "report.pdf#1", "report.pdf#2", "notes.md"}
    assert [json.loads(results[f"report.pdf#{k}"]["pages"]) for k in range(3)] == [[1, 2], [3, 4], [5]]
    assert all(results[f"report.pdf#{k}"]["item_id"] == "report.pdf" for k in range(3))
    assert summary.total == 4


def test_manifest_with_per_row_fields_and_inline_bytes(ray_cluster, tmp_path):
    import pyarrow as pa

    images = make_images(tmp_path / "media", 2)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["first", "second", "inline"],
                "uri": [str(images[0]), str(images[1]), None],
                "data": [None, None, images[0].read_bytes()],
                "question": ["What colour?", "How many shapes?", "Is it round?"],
                "max_soft_tokens": [70, 140, None],
            }
        ),
        manifest,
    )
    run(job(manifest, tmp_path / "out", TaskSpec(task="answer", max_new_tokens=3)), progress=False)
    results = {r["id"]: r for r in read(tmp_path / "out", "results")}
    assert set(results) == {"first", "second", "inline"}
    assert results["first"]["image_tokens"] <= 70 < results["second"]["image_tokens"] <= 140
    assert results["inline"]["image_tokens"] > 140


def test_resume_skips_done_items_retries_failures_and_refuses_another_spec(ray_cluster, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    make_images(source, 3)
    (source / "broken.png").write_bytes(b"not an image")
    first = run(job(source, out, CAPTION), progress=False)
    assert (first.run_succeeded, first.run_failed) == (3, 1)

    make_images(source, 2, start=3)  # two new items arrive
    (source / "broken.png").write_bytes((source / "image_1.png").read_bytes())  # and the broken one is fixed
    kept = run(job(source, out, CAPTION, output={"retry_failed": False}), progress=False)
    assert (kept.run_succeeded, kept.run_failed) == (2, 0)  # the failure was kept, not retried
    assert "broken.png" in ids(read(out, "errors"))

    second = run(job(source, out, CAPTION), progress=False)
    assert (second.run_succeeded, second.run_failed) == (1, 0)  # only the fixed item ran again
    results, errors = read(out, "results"), read(out, "errors")
    assert len(results) == 6 and errors == []
    assert_no_duplicates(results, errors)

    with pytest.raises(SpecMismatch, match="different job"):
        run(job(source, out, TaskSpec(task="caption", max_new_tokens=7)), progress=False)


def _put_tree(fs, local: Path, remote: str) -> None:
    for path in local.iterdir():
        fs.put_file(str(path), f"{remote}/{path.name}")


def test_s3_in_and_out_with_env_credentials(ray_cluster, s3_env, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("media-in")
    local = tmp_path / "in"
    make_images(local, 3)
    speech(local / "speech.wav")
    _put_tree(fs, local, "media-in/batch1")
    summary = run(job("s3://media-in/batch1", "s3://media-out/run1", CAPTION), progress=False)
    assert (summary.succeeded, summary.failed) == (3, 1)
    results, errors = read("s3://media-out/run1", "results"), read("s3://media-out/run1", "errors")
    assert ids(results) == ["image_0.jpg", "image_1.png", "image_2.webp"] and ids(errors) == ["speech.wav"]
    assert fs.exists("media-out/run1/_job.json")


def test_s3_storage_options_and_tar_shards(ray_cluster, s3_server, tmp_path):
    import tarfile

    import s3fs

    storage = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**storage)
    fs.mkdir("shards")
    images = make_images(tmp_path / "media", 3)
    for shard, members in enumerate([images[:2], images[2:]]):
        path = tmp_path / f"shard-{shard:04d}.tar"
        with tarfile.open(path, "w") as archive:
            for image in members:
                archive.add(image, arcname=f"{image.stem}.{image.suffix[1:]}")
                meta = json.dumps({"question": f"What is in {image.stem}?"}).encode()
                info = tarfile.TarInfo(f"{image.stem}.json")
                info.size = len(meta)
                archive.addfile(info, io.BytesIO(meta))
        fs.put_file(str(path), f"shards/{path.name}")
    task = TaskSpec(task="answer", max_new_tokens=3)
    run(job("s3://shards/", "s3://shards-out/x", task, storage=storage), progress=False)
    assert ids(read("s3://shards-out/x", "results", storage)) == [
        "shard-0000.tar/image_0",
        "shard-0000.tar/image_1",
        "shard-0001.tar/image_2",
    ]


def test_unreachable_storage_fails_fast(ray_cluster, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    storage = {"endpoint_url": f"http://127.0.0.1:{closed}", "key": "x", "secret": "y"}
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach s3://nowhere"):
        run(job("s3://nowhere/in", tmp_path / "out", CAPTION, storage=storage), progress=False)
    assert time.monotonic() - started < 30
    with pytest.raises(StorageError, match="nothing found"):
        run(job(tmp_path / "missing", tmp_path / "out", CAPTION), progress=False)


def _generate_actor_pids() -> list[int]:
    """Ray titles a worker process after the actor it hosts."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"MapBatches(Generate)" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_killed_model_actor_is_replaced_without_loss_or_duplicates(ray_cluster, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    make_images(source, 24)
    outcome = {}
    worker = threading.Thread(
        target=lambda: outcome.setdefault(
            "summary",
            run(
                job(source, out, TaskSpec(task="caption", max_new_tokens=24), resources={"batch_size": 2}),
                progress=False,
            ),
        )
    )
    worker.start()
    deadline = time.monotonic() + 120
    killed = None
    while time.monotonic() < deadline and killed is None:
        pids = _generate_actor_pids()
        if pids and len(list((out / "results").glob("*.parquet"))) >= 1:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    worker.join(timeout=300)
    assert killed is not None, "the model actor was never seen alive"
    results, errors = read(out, "results"), read(out, "errors")
    assert_no_duplicates(results, errors)
    assert ids(results) == sorted(p.name for p in source.iterdir()) and errors == []
    assert outcome["summary"].succeeded == 24


def test_a_killed_driver_is_resumed_by_a_rerun(ray_cluster, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    make_images(source, 60)  # enough work that the first results land well before the last
    address = ray_cluster.get_runtime_context().gcs_address
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "run",
        "--task",
        "caption",
        "--input",
        str(source),
        "--output",
        str(out),
        "--max-new-tokens",
        "48",
        "--batch-size",
        "2",
        "--address",
        address,
        "--no-progress",
    ]
    driver = subprocess.Popen(
        command,
        cwd=Path(__file__).parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "results").glob("*.parquet")):
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = read(out, "results")
    assert 0 < len(done_before) < 60, "the driver should die mid-job"

    summary = run(
        job(source, out, TaskSpec(task="caption", max_new_tokens=48), resources={"batch_size": 2}), progress=False
    )
    results = read(out, "results")
    assert_no_duplicates(results, [])
    assert len(results) == 60
    assert summary.run_succeeded == 60 - len(done_before)


def test_tokenization_is_not_fused_into_the_model_actors(ray_cluster, tmp_path, capsys):
    import ray.data

    from pipelines.batch import build

    spec = job(tmp_path, tmp_path / "out", CAPTION, resources={"cpus_per_replica": 1, "gpus_per_replica": 0})
    listing = ray.data.from_items([{"id": "a", "uri": str(tmp_path / "a.png"), "container": "file"}])
    build(spec, listing, None).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    operators = [line for line in optimized.splitlines() if "Prepare" in line or "Generate" in line]
    assert len(operators) == 2, optimized  # Prepare in CPU tasks, Generate in the actor pool: two operators
    assert "Write" not in optimized  # the model actors write their own parts: no operator after Generate
    assert "TaskPoolMapOperator" in next(line for line in operators if "Prepare" in line)
