"""Metrics on /metrics, the health endpoint, and structured (JSON) logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies, pool_spec

pytestmark = pytest.mark.integration


def test_metrics_health_and_json_logs(
    crd: Path,
    kubeconfig: Path,
    operator_namespace: str,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
    tmp_path: Path,
) -> None:
    operator = OperatorProcess(
        kubeconfig,
        tmp_path / "operator.log",
        verbose=False,
        extra_env={"PREFECT_GPU_OPERATOR_LOG_FORMAT": "json"},
    ).start()
    try:
        assert operator.healthy()
        gpu_nodes.create("m1-a", 4, labels={"pool": "m1"})
        gpu_nodes.create("m1-b", 2, labels={"pool": "m1"})
        policies.create(
            "m1",
            pool_spec(prefect_api_url, "m1"),
        )
        expect_limits(prefect_limits, "gpu:m1-", {"gpu:m1-a": 4, "gpu:m1-b": 2})

        def exported() -> None:
            assert operator.metric("prefect_gpu_operator_managed_limits", policy="m1") == 2
            assert operator.metric("prefect_gpu_operator_node_slots", policy="m1", node="m1-a") == 4
            assert operator.metric("prefect_gpu_operator_node_slots", policy="m1", node="m1-b") == 2

        eventually(exported)
        assert operator.metric("prefect_gpu_operator_reconciles_total", policy="m1") >= 1
        assert operator.metric("prefect_gpu_operator_reconcile_seconds_count") >= 1
        assert (
            operator.metric("prefect_gpu_operator_prefect_api_calls_total", operation="create") >= 2
        )
        assert operator.metric("prefect_gpu_operator_prefect_api_errors_total") == 0

        gpu_nodes.delete("m1-b")
        expect_limits(prefect_limits, "gpu:m1-", {"gpu:m1-a": 4})
        eventually(lambda: _gone(operator))
        policies.delete("m1")
    finally:
        operator.stop()
    lines = [line for line in operator.log().splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all("message" in record for record in records)


def _gone(operator: OperatorProcess) -> None:
    text = operator.metric("prefect_gpu_operator_node_slots", policy="m1", node="m1-b")
    assert text == 0  # the series is removed, so it sums to nothing
