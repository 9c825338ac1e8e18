"""Starting Ray: a local start that fails is one ClusterError naming the cause and what to try."""

from __future__ import annotations

import pytest

from pipelines.cluster import connect
from pipelines.errors import ClusterError


def test_a_local_start_that_fails_is_one_clear_error(monkeypatch):
    import ray

    def refuse(**kwargs):
        raise RuntimeError("Couldn't start Ray: the GCS did not come up within 60 s\n<traceback lines>")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ClusterError) as caught:
        connect(None, num_cpus=1)
    message = str(caught.value)
    assert message.startswith("cannot start a local Ray instance: Couldn't start Ray: the GCS did not come up")
    assert "<traceback lines>" not in message and "RAY_ADDRESS" in message
