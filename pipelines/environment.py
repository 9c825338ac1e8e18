"""Which environment variables reach Ray workers: storage credentials and model settings, not the API keys."""

from __future__ import annotations

import os

FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HF_", "GEMMA_UNIFIED_", "FSSPEC_")
API_KEYS_ENV = "GEMMA_UNIFIED_API_KEYS"  # the endpoint hashes these itself; no worker needs them in clear


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k != API_KEYS_ENV}
