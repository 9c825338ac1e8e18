"""Checks made before any work starts, so a job or endpoint that cannot run says why in one line, quickly.

Only what this machine can know is checked here: a local run needs the model and the engine's extra on this
machine; on a cluster those live on the workers, so only the connection to the cluster is checked.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from urllib.parse import urlsplit

from pipelines.config import EngineSpec, ModelSpec
from pipelines.errors import ClusterError, EngineUnavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0


def cluster_address(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def check_cluster(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the head before `ray.init`, which on an unreachable address retries for many minutes."""
    if address in ("auto", "local") or address.startswith("local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme in ("http", "https"):
        raise ClusterError(
            f"{address} is a dashboard (Jobs API) address: submit to it with `gemma-unified submit`, or join the "
            f"cluster with its GCS address (HEAD:6379) or Ray Client (ray://HEAD:10001)"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ClusterError(f"cannot read the cluster address {address!r}: expected HEAD:6379 or ray://HEAD:10001")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({exc}): check that the cluster is up and the address "
            f"(--address or RAY_ADDRESS; the head's GCS port is 6379, Ray Client's 10001)"
        ) from None
    log.info("the Ray head at %s accepts connections", address)


def check_local_model(model: ModelSpec, engine: EngineSpec) -> None:
    """The engine's extra and the model's files (the tokenizer's: cheap even from object storage) on this machine."""
    from pipelines.model_sources import load_tokenizer

    if engine.kind == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EngineUnavailable(
            "engine.kind is vllm but vLLM is not installed here: pip install -c constraints.txt '.[vllm]' on a GPU "
            "machine, or use the transformers engine (--engine transformers)"
        )
    load_tokenizer(model)
