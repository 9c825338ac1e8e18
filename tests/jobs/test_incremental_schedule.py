"""A scheduled incremental pipeline, for real: two runs of `gemma-unified run` on the tiny model, where the second
one captions only the images added since the first."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from jobs.demo.samples import make_samples
from jobs.history import History
from jobs.job_files import build_job
from jobs.runners import LocalRunner
from jobs.scheduler import Scheduler
from jobs.schedules import Schedule, ScheduleEntry
from pipelines.output import ERRORS, RESULTS, OutputDir

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmpdir(monkeypatch):
    # Each run's local Ray instance lives here, short enough for its sockets and apart from other clusters.
    folder = tempfile.mkdtemp(prefix="gu-ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_second_run_processes_only_new_images(tmp_path, tiny_dir, ray_tmpdir, clock):
    inbox = tmp_path / "inbox"
    for sample in make_samples(tmp_path / "samples"):
        if sample.suffix in (".jpg", ".png", ".webp"):
            inbox.mkdir(exist_ok=True)
            shutil.copy(sample, inbox / f"day1_{sample.name}")
    job = build_job(
        {
            "input": {"url": str(inbox)},
            "output": {"url": str(tmp_path / "captions")},
            "task": {"task": "caption", "max_new_tokens": 4},
            "engine": {"speculative": False},
            "resources": {"num_cpus": 2, "object_store_mb": 200, "batch_size": 4},
        }
    )
    entry = ScheduleEntry(name="nightly", cron="0 2 * * *", job={}, incremental=True)
    schedule = Schedule(entry, job, "test")
    history = History(tmp_path / "history.db")
    runner = LocalRunner(tmp_path / "runs")
    scheduler = Scheduler([schedule], history, lambda s: runner, clock=clock)

    clock.set(2025, 1, 15, 2, 0, 30)
    first = scheduler.wait_for(scheduler.tick(), poll_s=0.5)
    assert [r.state for r in first] == ["succeeded"], runner.log_tail(first[0].job_id)
    assert (first[0].succeeded, first[0].failed, first[0].skipped) == (3, 0, 0)

    for index, image in enumerate(sorted((tmp_path / "samples").glob("image_[01].*"))):
        shutil.copy(image, inbox / f"day2_{index}{image.suffix}")
    clock.set(2025, 1, 16, 2, 0, 30)
    second = scheduler.wait_for(scheduler.tick(), poll_s=0.5)
    assert [r.state for r in second] == ["succeeded"], runner.log_tail(second[0].job_id)
    assert (second[0].succeeded, second[0].failed, second[0].skipped) == (2, 0, 3)

    out = OutputDir(job.output.url, {})
    assert len(set(out.read_column(RESULTS))) == 5 and len(out.read_column(ERRORS)) == 0
    assert len(out.read_column(RESULTS)) == 5  # nothing captioned twice
    assert [r.state for r in history.runs("nightly")] == ["succeeded", "succeeded"]
