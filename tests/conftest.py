"""Session-wide fixtures: the tiny model's processor files, built once into a temp cache."""

from __future__ import annotations

import os

import pytest

# Tests that use one of these start Ray or a server: they belong to the full tier only (`make test-fast` skips them).
SERVER_FIXTURES = frozenset({"ray_cluster", "s3_server", "s3_env", "media_server"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
    from pipelines.model_sources import tiny_dir as build

    return build()  # processor files, weights and the MTP assistant


@pytest.fixture(scope="session")
def hf_processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from pipelines.model_sources import load_tokenizer

    return load_tokenizer("tiny")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on loopback, for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_env(s3_server):
    """Credentials and endpoint through the standard variables, set before Ray starts so every worker sees them."""
    values = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(tiny_dir, s3_env):
    """One local Ray instance for the whole test session, sized for a 2-core machine."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=400 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"GEMMA_UNIFIED_CACHE": os.environ["GEMMA_UNIFIED_CACHE"], **s3_env}},
        )
    yield ray
    ray.shutdown()
