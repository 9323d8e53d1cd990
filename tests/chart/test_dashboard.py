"""The Grafana dashboard asks only for metrics the operator exports, and ships as the sidecar's
ConfigMap."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import REGISTRY

import prefect_gpu_operator.metrics  # noqa: F401  (registers the operator's metrics)
from prefect_gpu_sandbox.chart import render_chart
from prefect_gpu_sandbox.paths import CHART
from tests.chart.value_sets import NAMESPACE, RELEASE, VALUE_SETS

DASHBOARD = CHART / "dashboards/prefect-gpu-operator.json"
# PromQL's functions, keywords and aggregations: every other name in an expression is a metric.
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "increase", "histogram_quantile", "le", "max", "min", "avg",
    "count", "label_values", "offset",
}  # fmt: skip


# The series Prometheus scrapes of each kind of metric, by the metric's name.
SERIES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def _exported() -> set[str]:
    """The operator's metric names as a scrape shows them (labelled metrics have no samples
    until first used, so the names come from each metric's kind)."""
    return {
        metric.name + suffix
        for metric in REGISTRY.collect()
        if metric.name.startswith("prefect_gpu_operator_")
        for suffix in SERIES[metric.type]
    }


def _metric_names(expression: str) -> set[str]:
    # Drop label matchers, ranges, strings, grouping lists and label_values' label argument.
    without_labels = re.sub(
        r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"|\b(?:by|without)\s*\([^)]*\)|,\s*\w+\s*\)$",
        "",
        expression,
    )
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels))
    return {name for name in names - PROMQL_WORDS if not name.startswith("$")}


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    variables = [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries + variables


def test_every_query_reads_a_metric_the_operator_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = _expressions(dashboard)
    used = set().union(*(_metric_names(e) for e in expressions))
    assert used, "the dashboard queries nothing"
    assert used - _exported() == set()


def test_the_dashboard_covers_what_operators_of_it_ask() -> None:
    used = set().union(*(_metric_names(e) for e in _expressions(json.loads(DASHBOARD.read_text()))))
    for metric in (
        "prefect_gpu_operator_node_slots",
        "prefect_gpu_operator_node_held_slots",
        "prefect_gpu_operator_reconcile_seconds_bucket",
        "prefect_gpu_operator_prefect_api_errors_total",
        "prefect_gpu_operator_webhook_admissions_total",
    ):
        assert metric in used


def test_the_dashboard_ships_as_the_sidecars_config_map() -> None:
    assert not [d for d in render_chart(NAMESPACE, {}, release=RELEASE) if d["kind"] == "ConfigMap"]
    docs = render_chart(NAMESPACE, VALUE_SETS["grafana-dashboard"], release=RELEASE)
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "GPU"}
    shipped = json.loads(config_map["data"]["prefect-gpu-operator.json"])
    assert shipped == json.loads(DASHBOARD.read_text())
