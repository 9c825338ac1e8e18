"""Job specs from YAML with command-line overrides, validated once, at the boundary."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from pipelines.config import JobSpec
from pipelines.errors import GemmaUnifiedError


class SpecError(GemmaUnifiedError):
    """A job file or its overrides do not make a valid spec; the message names the file and the fields."""


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_validation(error: ValidationError, source: str) -> str:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
    return f"{source}: {problems}"


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
    clean = _drop_none(overrides or {})
    try:
        return JobSpec.model_validate(_merge(data, clean))
    except ValidationError as exc:
        raise SpecError(describe_validation(exc, source)) from None


def load_job(path: str | Path | None, overrides: dict | None = None) -> JobSpec:
    data = load_yaml(path) if path else {}
    return build_job(data, overrides, str(path) if path else "command line")


def _drop_none(mapping: dict) -> dict:
    cleaned = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                cleaned[key] = value
        elif value is not None:
            cleaned[key] = value
    return cleaned
