"""The example specs under infra/examples, rendered once per session the way the committed manifests were."""

from __future__ import annotations

import pytest
import yaml
from infra_paths import RENDER_ARGS


@pytest.fixture(scope="session")
def rendered() -> dict[str, str]:
    from jobs.cli.deploy import render_files

    return render_files(**RENDER_ARGS)


@pytest.fixture(scope="session")
def manifests(rendered) -> dict[str, dict]:
    """Every Kubernetes object of the rendered examples, by kind (one of each kind is rendered)."""
    objects = {}
    for path, text in rendered.items():
        if path.startswith("k8s/"):
            for document in yaml.safe_load_all(text):
                assert document["kind"] not in objects, f"two {document['kind']} objects"
                objects[document["kind"]] = document
    return objects


@pytest.fixture(scope="session")
def cluster():
    from jobs.deploy.cluster import load_cluster

    return load_cluster(RENDER_ARGS["cluster_file"])


@pytest.fixture(scope="session")
def serve_spec():
    from serving.spec import load_spec

    return load_spec(RENDER_ARGS["serve_file"])


@pytest.fixture(scope="session")
def job_spec():
    from jobs.job_files import load_job

    return load_job(RENDER_ARGS["job_files"][0])
