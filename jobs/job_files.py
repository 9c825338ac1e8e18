"""Job specs from YAML with command-line overrides, validated once, at the boundary."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from pipelines.config import JobSpec, describe_validation, merge_overrides
from pipelines.errors import GemmaUnifiedError


class SpecError(GemmaUnifiedError):
    """A job file or its overrides do not make a valid spec; the message names the file and the fields."""


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: cannot read the job file: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job file is a mapping with input, task, model, engine, media, resources, output")
    return data


def build_job(data: dict, overrides: dict | None = None, source: str = "job spec") -> JobSpec:
    """A JobSpec from a mapping plus overrides (nested dicts; None values are ignored)."""
    try:
        return JobSpec.model_validate(merge_overrides(data, overrides or {}))
    except ValidationError as exc:
        raise SpecError(describe_validation(exc, source)) from None


def load_job(path: str | Path | None, overrides: dict | None = None) -> JobSpec:
    data = load_yaml(path) if path else {}
    return build_job(data, overrides, str(path) if path else "command line")

