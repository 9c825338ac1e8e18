"""`run` on a real local Ray instance through the command line: exit codes, the summary's pointers, `show`, and
files this project cannot read (an error row each, or counted as skipped when asked)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.demo.samples import make_images

pytestmark = pytest.mark.slow

runner = CliRunner()


def run_cli(source, out, *flags: str):
    return runner.invoke(
        app,
        [
            "run",
            "--task",
            "caption",
            "--input",
            str(source),
            "--output",
            str(out),
            "--max-new-tokens",
            "3",
            "--batch-size",
            "4",
            "--no-progress",
            *flags,
        ],
    )


def record(out) -> dict:
    return json.loads((out / "_job.json").read_text())


def test_exit_codes_follow_the_whole_output_and_show_prints_the_rows(ray_cluster, tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    make_images(source, 2)
    (source / "broken.png").write_bytes(b"not an image")
    first = run_cli(source, out)
    assert first.exit_code == 1, first.output
    assert record(out)["status"] == "partial"
    assert f"gemma-unified show {out} --errors" in " ".join(first.output.split())
    assert f"errors: {out}/errors/" in first.output

    kept = run_cli(source, out, "--no-retry-failed")  # the failure is kept, not retried: still not all succeeded
    assert kept.exit_code == 1, kept.output
    assert record(out)["status"] == "partial" and record(out)["counts"]["failed"] == 1

    results = runner.invoke(app, ["show", str(out)])
    assert results.exit_code == 0 and "first 2 of 2 rows" in results.output and "image_0.jpg" in results.output
    errors = runner.invoke(app, ["show", str(out), "--errors"])
    assert errors.exit_code == 0 and "broken.png" in errors.output and "prepare" in errors.output

    (source / "broken.png").write_bytes((source / "image_1.png").read_bytes())  # fixed: the rerun retries it
    fixed = run_cli(source, out)
    assert fixed.exit_code == 0, fixed.output
    assert record(out)["status"] == "succeeded" and record(out)["counts"] == {"total": 3, "succeeded": 3, "failed": 0}


def test_a_file_this_project_cannot_read_is_an_error_row_or_counted_as_skipped(ray_cluster, tmp_path):
    source = tmp_path / "in"
    make_images(source, 1)
    (source / "data.xyz").write_bytes(bytes(range(256)) * 4)  # no known extension, nothing recognisable inside
    as_error = run_cli(source, tmp_path / "strict")
    assert as_error.exit_code == 1, as_error.output
    shown = runner.invoke(app, ["show", str(tmp_path / "strict"), "--errors"])
    assert "data.xyz" in shown.output
    assert record(tmp_path / "strict")["counts"] == {"total": 2, "succeeded": 1, "failed": 1}

    skipping = run_cli(source, tmp_path / "lenient", "--skip-unsupported")
    assert skipping.exit_code == 0, skipping.output
    assert "skipped: 1 file(s)" in skipping.output
    manifest = record(tmp_path / "lenient")
    assert manifest["this_run"]["skipped_unsupported"] == 1 and manifest["skipped_unsupported"] == ["data.xyz"]
    assert manifest["counts"] == {"total": 1, "succeeded": 1, "failed": 0}
