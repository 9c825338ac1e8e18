"""Session-wide fixtures: the tiny model's processor files, built once into a temp cache."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the test session's tiny model out of the user's cache, and build it once per session."""
    root = tmp_path_factory.mktemp("gemma-unified-cache")
    previous = os.environ.get("GEMMA_UNIFIED_CACHE")
    os.environ["GEMMA_UNIFIED_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("GEMMA_UNIFIED_CACHE", None)
    else:
        os.environ["GEMMA_UNIFIED_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache):
    from pipelines.models import tiny_dir as build

    return build()


@pytest.fixture(scope="session")
def hf_processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from pipelines.models import load_tokenizer

    return load_tokenizer("tiny")
