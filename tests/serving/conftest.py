"""Fixtures for the endpoint tests."""

from __future__ import annotations

import pytest
from serving_helpers import MediaServer, png, wav


@pytest.fixture(scope="session")
def sample_png() -> bytes:
    return png()


@pytest.fixture(scope="session")
def short_wav() -> bytes:
    return wav(1.3)


@pytest.fixture(scope="session")
def long_wav() -> bytes:
    return wav(35.0)


@pytest.fixture(scope="session")
def media_server(sample_png):
    server = MediaServer(sample_png)
    yield server
    server.close()
