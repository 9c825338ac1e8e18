"""Job specs from YAML with command-line overrides, validated once, at the boundary."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import JobSpec, build_spec, load_spec_file, read_spec_file

SECTIONS = "input, task, model, engine, media, resources, output"


def load_yaml(path: str | Path) -> dict:
    return read_spec_file(path, "job", SECTIONS)


def build_job(data: dict, overrides: dict | None = None, source: str = "job spec") -> JobSpec:
    """A JobSpec from a mapping plus overrides (nested dicts; None values are ignored)."""
    return build_spec(JobSpec, data, overrides, source)


def load_job(path: str | Path | None, overrides: dict | None = None) -> JobSpec:
    return load_spec_file(JobSpec, path, overrides, "job", SECTIONS)
