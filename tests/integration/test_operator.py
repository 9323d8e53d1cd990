"""The operator against a real kube-apiserver and a real Prefect server: one GCL per GPU node."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import (
    OperatorProcess,
    Policies,
    PrefectLimitsReader,
    expect_limits,
)

pytestmark = pytest.mark.integration


def _spec(prefect_api_url: str, pool: str, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"remoteApiUrl": prefect_api_url},
        "nodeSelector": {"matchLabels": {"pool": pool}},
        **extra,
    }


def test_gpu_nodes_get_limits(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("t1-a", 4, labels={"pool": "t1"})
    gpu_nodes.create("t1-b", 2, labels={"pool": "t1"})
    gpu_nodes.create("t1-cpu", resources={}, labels={"pool": "t1"})  # no GPU: no limit
    gpu_nodes.create("t1-other", 8, labels={"pool": "elsewhere"})  # outside the selector
    policies.create("t1", _spec(prefect_api_url, "t1"))

    expect_limits(prefect_limits, "gpu:t1-", {"gpu:t1-a": 4, "gpu:t1-b": 2})

    def status_settled() -> dict[str, Any]:
        status = policies.status("t1")
        assert status.get("nodes") == 2
        return status

    status = eventually(status_settled)
    assert status["totalSlots"] == 6
    assert status["observedGeneration"] == 1
    assert sorted(status["limits"], key=lambda e: e["name"]) == [
        {"name": "gpu:t1-a", "node": "t1-a", "limit": 4},
        {"name": "gpu:t1-b", "node": "t1-b", "limit": 2},
    ]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["PrefectReachable"]["status"] == "True"
    assert conditions["Conflict"]["status"] == "False"
    eventually(lambda: _assert_in("LimitCreated", policies.events("t1")))


def _assert_in(item: str, items: list[str]) -> None:
    assert item in items


def test_allocatable_changes_follow(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("t2-a", 4, labels={"pool": "t2"})
    policies.create("t2", _spec(prefect_api_url, "t2"))
    expect_limits(prefect_limits, "gpu:t2-", {"gpu:t2-a": 4})
    # 0 is a deliberate limit: running holders keep their slots, new acquirers wait for GPUs.
    for gpus in (2, 0, 8):
        gpu_nodes.set_gpus("t2-a", gpus)
        expect_limits(prefect_limits, "gpu:t2-", {"gpu:t2-a": gpus}, timeout=5)


@pytest.mark.parametrize(("deletion_policy", "kept"), [("Delete", {}), ("Retain", {"gpu:t3-a": 4})])
def test_node_and_policy_deletion(
    deletion_policy: str,
    kept: dict[str, int],
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("t3-a", 4, labels={"pool": "t3"})
    gpu_nodes.create("t3-b", 2, labels={"pool": "t3"})
    policies.create("t3", _spec(prefect_api_url, "t3", deletionPolicy=deletion_policy))
    expect_limits(prefect_limits, "gpu:t3-", {"gpu:t3-a": 4, "gpu:t3-b": 2})

    gpu_nodes.delete("t3-b")
    expect_limits(prefect_limits, "gpu:t3-", {"gpu:t3-a": 4, **({"gpu:t3-b": 2} if kept else {})})
    eventually(lambda: _assert_equal(policies.status("t3")["nodes"], 1))

    policies.delete("t3")  # the finalizer applies the deletion policy before the policy goes
    expect_limits(prefect_limits, "gpu:t3-", {**kept, **({"gpu:t3-b": 2} if kept else {})})
    for name in list(prefect_limits.limits("gpu:t3-")):
        prefect_limits.delete(name)


def _assert_equal(left: object, right: object) -> None:
    assert left == right


def test_drift_is_repaired(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("t4-a", 4, labels={"pool": "t4"})
    gpu_nodes.create("t4-b", 2, labels={"pool": "t4"})
    policies.create("t4", _spec(prefect_api_url, "t4"))
    expect_limits(prefect_limits, "gpu:t4-", {"gpu:t4-a": 4, "gpu:t4-b": 2})

    prefect_limits.set_limit("gpu:t4-a", 99)  # someone edits it in the UI
    prefect_limits.delete("gpu:t4-b")  # someone deletes it
    # The operator's resync is 2 s here: both are repaired within it (plus one reconcile).
    expect_limits(prefect_limits, "gpu:t4-", {"gpu:t4-a": 4, "gpu:t4-b": 2}, timeout=6)


def test_user_limits_are_never_touched(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    prefect_limits.create("gpu:manual", 3)
    prefect_limits.create("gpu:t5-a", 1)  # made by hand before the policy existed
    gpu_nodes.create("t5-a", 4, labels={"pool": "t5"})
    gpu_nodes.create("t5-b", 2, labels={"pool": "t5"})
    policies.create("t5", _spec(prefect_api_url, "t5"))
    expect_limits(prefect_limits, "gpu:t5-", {"gpu:t5-a": 1, "gpu:t5-b": 2})

    def conflict() -> dict[str, Any]:
        condition = policies.condition("t5", "Conflict")
        assert condition["status"] == "True"
        return condition

    assert "gpu:t5-a" in eventually(conflict)["message"]
    assert [e["name"] for e in policies.status("t5")["limits"]] == ["gpu:t5-b"]

    policies.delete("t5")
    assert prefect_limits.limits("gpu:t5-") == {"gpu:t5-a": 1}
    assert prefect_limits.limits("gpu:manual") == {"gpu:manual": 3}
    prefect_limits.delete("gpu:t5-a")
    prefect_limits.delete("gpu:manual")


def test_two_policies_claiming_one_name(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("t6-a", 4, labels={"pool": "t6"})
    policies.create("t6-first", _spec(prefect_api_url, "t6"))
    expect_limits(prefect_limits, "gpu:t6-", {"gpu:t6-a": 4})
    policies.create("t6-second", _spec(prefect_api_url, "t6", slotsPerGpu=2))

    def conflict() -> dict[str, Any]:
        condition = policies.condition("t6-second", "Conflict")
        assert condition["status"] == "True"
        return condition

    assert "t6-first" in eventually(conflict)["message"]
    assert policies.condition("t6-first", "Conflict")["status"] == "False"
    assert prefect_limits.limits("gpu:t6-") == {"gpu:t6-a": 4}  # the older policy keeps it


def test_other_resources_slots_per_gpu_and_dotted_names(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create(
        "t7-1.example.com", resources={"nvidia.com/mig-1g.10gb": 7}, labels={"pool": "t7"}
    )
    gpu_nodes.create("t7-2.example.com", resources={"amd.com/gpu": 2}, labels={"pool": "t7"})
    gpu_nodes.create("t7-3.example.com", 4, labels={"pool": "t7"})  # nvidia.com/gpu: not listed
    spec = _spec(
        prefect_api_url, "t7", resources=["nvidia.com/mig-1g.10gb", "amd.com/gpu"], slotsPerGpu=3
    )
    policies.create("t7", spec)
    expect_limits(
        prefect_limits, "gpu:t7-", {"gpu:t7-1.example.com": 21, "gpu:t7-2.example.com": 6}
    )
    policies.patch_spec("t7", {"slotsPerGpu": 1, "limitNameTemplate": "gpu:{node}"})
    expect_limits(prefect_limits, "gpu:t7-", {"gpu:t7-1.example.com": 7, "gpu:t7-2.example.com": 2})
    eventually(lambda: _assert_equal(policies.status("t7").get("observedGeneration"), 2))
