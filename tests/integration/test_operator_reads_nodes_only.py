"""The operator only reads Nodes, and node noise costs zero Prefect API calls."""

from __future__ import annotations

import pytest
from kubernetes import client

from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies, pool_spec

pytestmark = pytest.mark.integration

# No periodic resync during the test: every Prefect call it sees comes from node events.
OPERATOR_RESYNC_SECONDS = 600.0


def _settled(policies: Policies, name: str, nodes: int) -> None:
    assert policies.status(name).get("nodes") == nodes


def test_node_noise_costs_no_prefect_call_and_nodes_are_never_written(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
    core_v1: client.CoreV1Api,
) -> None:
    gpu_nodes.create("n1-a", 4, labels={"pool": "n1"})
    untouched = gpu_nodes.create("n1-b", 2, labels={"pool": "n1"})
    spec = pool_spec(prefect_api_url, "n1")
    policies.create("n1", spec)
    expect_limits(prefect_limits, "gpu:n1-", {"gpu:n1-a": 4, "gpu:n1-b": 2})
    eventually(lambda: _settled(policies, "n1", 2))
    calls_before = _calls(operator)

    for beat in range(25):  # heartbeat-like status changes, label changes, non-GPU allocatable
        core_v1.patch_node_status(
            "n1-a",
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": f"KubeletReady{beat}",
                            "lastHeartbeatTime": f"2026-01-01T00:00:{beat:02d}Z",
                        }
                    ]
                }
            },
        )
        core_v1.patch_node("n1-a", {"metadata": {"labels": {"heartbeat": str(beat)}}})
        gpu_nodes.set_allocatable("n1-a", {"nvidia.com/gpu": 4, "cpu": str(8 - beat % 2)})
    # A real change after the noise: once its limit lands, the noise before it was handled.
    gpu_nodes.set_allocatable("n1-a", {"nvidia.com/gpu": 3, "cpu": "8"})
    expect_limits(prefect_limits, "gpu:n1-", {"gpu:n1-a": 3, "gpu:n1-b": 2})
    made = {op: count - calls_before[op] for op, count in _calls(operator).items()}
    # Nothing for the noise; for the real change the one update.
    assert {op: count for op, count in made.items() if count} == {"update": 1}

    node = core_v1.read_node("n1-b")
    assert node.metadata.resource_version == untouched.metadata.resource_version
    for name in ("n1-a", "n1-b"):
        metadata = core_v1.read_node(name).metadata
        assert not metadata.finalizers
        written = [k for k in metadata.annotations or {} if "kopf" in k or "prefectgpu" in k]
        assert written == []


def _calls(operator: OperatorProcess) -> dict[str, float]:
    metric = "prefect_gpu_operator_prefect_api_calls_total"
    operations = ("list", "read", "create", "update", "delete")
    return {op: operator.metric(metric, operation=op) for op in operations}
