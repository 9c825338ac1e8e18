"""The Grafana dashboard queries only metrics that exist: the endpoint's own (serving/metrics.py) and the ones Ray's
bundled dashboards query (its Serve, Data, node and autoscaler exporters)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from infra_paths import REPO

DASHBOARD = REPO / "infra" / "grafana" / "gemma-unified.json"
_METRIC = re.compile(r"\b((?:gemma_unified|ray|autoscaler)_[a-z0-9_]+)\b")


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _endpoint_series() -> set[str]:
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import Metrics

    metrics = Metrics("test")
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:
            metric.labels(*["x"] * len(metric._labelnames))  # a labelled metric shows no series until a child exists
    text = metrics.render().decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def _ray_dashboard_text() -> str:
    import ray.dashboard.modules.metrics.dashboards as dashboards

    folder = Path(dashboards.__file__).parent
    return "\n".join(p.read_text() for p in folder.glob("*.py"))


def test_dashboard_is_grafana_json_with_panels_and_a_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert {"datasource", "application"} <= {v["name"] for v in dashboard["templating"]["list"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert len(_queries(dashboard)) >= 20


def test_every_metric_queried_is_exported():
    dashboard = json.loads(DASHBOARD.read_text())
    endpoint, ray_text = _endpoint_series(), _ray_dashboard_text()
    used = {name for query in _queries(dashboard) for name in _METRIC.findall(query)}
    missing = [n for n in used if not (n in endpoint if n.startswith("gemma_unified_") else n in ray_text)]
    assert not missing, f"metrics no exporter provides: {sorted(missing)}"
    assert {n for n in used if n.startswith("gemma_unified_")} >= {
        "gemma_unified_requests_total",
        "gemma_unified_request_latency_seconds_bucket",
        "gemma_unified_model_queue_depth",
        "gemma_unified_tokens_total",
    }
    assert any(n.startswith("ray_data_") for n in used) and any(n.startswith("ray_serve_") for n in used)
