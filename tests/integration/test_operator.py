"""The operator against a real kube-apiserver and a real Prefect server: one GCL per GPU node."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_gpu_sandbox.waiting import eventually
from tests.support.operator import Scene, expect_limits
from tests.support.policies import ledger, pool_spec

pytestmark = pytest.mark.integration


def test_gpu_nodes_get_limits(scene: Scene) -> None:
    scene.nodes.create("t1-a", 4, labels={"pool": "t1"})
    scene.nodes.create("t1-b", 2, labels={"pool": "t1"})
    scene.nodes.create("t1-cpu", resources={}, labels={"pool": "t1"})  # no GPU: no limit
    scene.nodes.create("t1-other", 8, labels={"pool": "elsewhere"})  # outside the selector
    scene.policies.create("t1", pool_spec(scene.api_url, "t1"))

    expect_limits(scene.limits, "gpu:t1-", {"gpu:t1-a": 4, "gpu:t1-b": 2})

    def status_settled() -> dict[str, Any]:
        status = scene.policies.status("t1")
        assert status.get("nodes") == 2
        return status

    status = eventually(status_settled)
    assert status["totalSlots"] == 6
    assert status["observedGeneration"] == 1
    assert sorted(ledger(status), key=lambda e: e["name"]) == [
        {"name": "gpu:t1-a", "node": "t1-a", "limit": 4},
        {"name": "gpu:t1-b", "node": "t1-b", "limit": 2},
    ]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["PrefectReachable"]["status"] == "True"
    assert conditions["Conflict"]["status"] == "False"
    eventually(lambda: "LimitCreated" in scene.policies.events("t1"))


def test_allocatable_changes_follow(scene: Scene) -> None:
    scene.nodes.create("t2-a", 4, labels={"pool": "t2"})
    scene.policies.create("t2", pool_spec(scene.api_url, "t2"))
    expect_limits(scene.limits, "gpu:t2-", {"gpu:t2-a": 4})
    # 0 is a deliberate limit: running holders keep their slots, new acquirers wait for GPUs.
    for gpus in (2, 0, 8):
        scene.nodes.set_gpus("t2-a", gpus)
        expect_limits(scene.limits, "gpu:t2-", {"gpu:t2-a": gpus}, timeout=5)


@pytest.mark.parametrize(("deletion_policy", "kept"), [("Delete", {}), ("Retain", {"gpu:t3-a": 4})])
def test_node_and_policy_deletion(deletion_policy: str, kept: dict[str, int], scene: Scene) -> None:
    scene.nodes.create("t3-a", 4, labels={"pool": "t3"})
    scene.nodes.create("t3-b", 2, labels={"pool": "t3"})
    scene.policies.create("t3", pool_spec(scene.api_url, "t3", deletionPolicy=deletion_policy))
    expect_limits(scene.limits, "gpu:t3-", {"gpu:t3-a": 4, "gpu:t3-b": 2})

    scene.nodes.delete("t3-b")
    expect_limits(scene.limits, "gpu:t3-", {"gpu:t3-a": 4, **({"gpu:t3-b": 2} if kept else {})})
    eventually(lambda: scene.policies.status("t3")["nodes"] == 1)

    scene.policies.delete("t3")  # the finalizer applies the deletion policy before the policy goes
    expect_limits(scene.limits, "gpu:t3-", {**kept, **({"gpu:t3-b": 2} if kept else {})})
    for name in list(scene.limits.limits("gpu:t3-")):
        scene.limits.delete(name)


def test_drift_is_repaired(scene: Scene) -> None:
    scene.nodes.create("t4-a", 4, labels={"pool": "t4"})
    scene.nodes.create("t4-b", 2, labels={"pool": "t4"})
    scene.policies.create("t4", pool_spec(scene.api_url, "t4"))
    expect_limits(scene.limits, "gpu:t4-", {"gpu:t4-a": 4, "gpu:t4-b": 2})

    scene.limits.set_limit("gpu:t4-a", 99)  # someone edits it in the UI
    scene.limits.delete("gpu:t4-b")  # someone deletes it
    # The operator's resync is 2 s here: both are repaired within it (plus one reconcile).
    expect_limits(scene.limits, "gpu:t4-", {"gpu:t4-a": 4, "gpu:t4-b": 2}, timeout=6)


def test_user_limits_are_never_touched(scene: Scene) -> None:
    scene.limits.create("gpu:manual", 3)
    scene.limits.create("gpu:t5-a", 1)  # made by hand before the policy existed
    scene.nodes.create("t5-a", 4, labels={"pool": "t5"})
    scene.nodes.create("t5-b", 2, labels={"pool": "t5"})
    scene.policies.create("t5", pool_spec(scene.api_url, "t5"))
    expect_limits(scene.limits, "gpu:t5-", {"gpu:t5-a": 1, "gpu:t5-b": 2})

    def conflict() -> dict[str, Any]:
        condition = scene.policies.condition("t5", "Conflict")
        assert condition["status"] == "True"
        return condition

    assert "gpu:t5-a" in eventually(conflict)["message"]
    assert [e["name"] for e in ledger(scene.policies.status("t5"))] == ["gpu:t5-b"]

    scene.policies.delete("t5")
    assert scene.limits.limits("gpu:t5-") == {"gpu:t5-a": 1}
    assert scene.limits.limits("gpu:manual") == {"gpu:manual": 3}
    scene.limits.delete("gpu:t5-a")
    scene.limits.delete("gpu:manual")


def test_two_policies_claiming_one_name(scene: Scene) -> None:
    scene.nodes.create("t6-a", 4, labels={"pool": "t6"})
    scene.policies.create("t6-first", pool_spec(scene.api_url, "t6"))
    expect_limits(scene.limits, "gpu:t6-", {"gpu:t6-a": 4})
    scene.policies.create("t6-second", pool_spec(scene.api_url, "t6", slotsPerGpu=2))

    def conflict() -> dict[str, Any]:
        condition = scene.policies.condition("t6-second", "Conflict")
        assert condition["status"] == "True"
        return condition

    assert "t6-first" in eventually(conflict)["message"]
    assert scene.policies.condition("t6-first", "Conflict")["status"] == "False"
    assert scene.limits.limits("gpu:t6-") == {"gpu:t6-a": 4}  # the older policy keeps it


def test_other_resources_slots_per_gpu_and_dotted_names(scene: Scene) -> None:
    scene.nodes.create(
        "t7-1.example.com", resources={"nvidia.com/mig-1g.10gb": 7}, labels={"pool": "t7"}
    )
    scene.nodes.create("t7-2.example.com", resources={"amd.com/gpu": 2}, labels={"pool": "t7"})
    scene.nodes.create("t7-3.example.com", 4, labels={"pool": "t7"})  # nvidia.com/gpu: not listed
    spec = pool_spec(
        scene.api_url, "t7", resources=["nvidia.com/mig-1g.10gb", "amd.com/gpu"], slotsPerGpu=3
    )
    scene.policies.create("t7", spec)
    expect_limits(scene.limits, "gpu:t7-", {"gpu:t7-1.example.com": 21, "gpu:t7-2.example.com": 6})
    scene.policies.patch_spec("t7", {"slotsPerGpu": 1, "limitNameTemplate": "gpu:{node}"})
    expect_limits(scene.limits, "gpu:t7-", {"gpu:t7-1.example.com": 7, "gpu:t7-2.example.com": 2})
    eventually(lambda: scene.policies.status("t7").get("observedGeneration") == 2)
