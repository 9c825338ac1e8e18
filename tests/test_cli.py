"""The command line as a user meets it: help for every command, and `inspect` on good and bad files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.demo.samples import make_samples

runner = CliRunner()


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    names = []
    for name, command in group.commands.items():
        names.append([name])
        for sub in getattr(command, "commands", {}) or {}:
            names.append([name, sub])
    return names


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_inspect_json_reports_every_file_and_keeps_going_after_a_bad_one(tiny_dir, tmp_path):
    files = make_samples(tmp_path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = runner.invoke(app, ["inspect", *map(str, files), str(bad), "--json", "--max-soft-tokens", "70"])
    assert result.exit_code == 1  # one file failed
    records = {json.loads(line)["file"].rsplit("/", 1)[-1]: json.loads(line) for line in result.output.splitlines()}
    assert set(records) == {"image_0.jpg", "image_1.png", "image_2.webp", "speech.wav", "report.pdf", "broken.jpg"}
    jpeg = records["image_0.jpg"]
    assert jpeg["modality"] == "image" and jpeg["error"] is None
    assert jpeg["tokens"] == jpeg["grid"][0] * jpeg["grid"][1] <= 70
    assert jpeg["size"] == [jpeg["grid"][0] * 48, jpeg["grid"][1] * 48]
    speech = records["speech.wav"]
    assert speech["modality"] == "audio" and speech["duration_s"] > 0
    assert speech["windows"][0][0] == 0 and speech["windows"][-1][1] == pytest.approx(speech["duration_s"], abs=0.01)
    assert speech["tokens"] == sum(w[2] for w in speech["windows"])
    assert records["report.pdf"]["pages"] == 3
    assert records["broken.jpg"]["error"] and "broken.jpg" in records["broken.jpg"]["error"]


def test_inspect_table_output(tiny_dir, tmp_path):
    files = make_samples(tmp_path)
    result = runner.invoke(app, ["inspect", str(files[0]), str(files[3])])
    assert result.exit_code == 0, result.output
    assert "grid" in result.output and "window" in result.output
