"""Where the example specs and their rendered manifests live (shared by the infra tests)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "infra" / "examples"
RENDER_ARGS = dict(
    serve_file=EXAMPLES / "serve.yaml",
    job_files=[EXAMPLES / "job.yaml"],
    schedules_file=EXAMPLES / "schedules.yaml",
    cluster_file=EXAMPLES / "cluster.yaml",
)
RENDER_COMMAND = (
    "gemma-unified render-k8s infra/examples/serve.yaml --job infra/examples/job.yaml "
    "--schedules infra/examples/schedules.yaml --cluster infra/examples/cluster.yaml --out infra"
)
