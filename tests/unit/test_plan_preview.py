"""``plan``'s preview through in-memory Kubernetes and Prefect (tests/support/fakes.py): what a
full reconcile would write, why some limits are left alone, and that nothing is written."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from prefect_gpu_operator.cli.plan import render_json, render_table
from prefect_gpu_operator.domain.plan import ObservedLimit
from prefect_gpu_operator.runtime.plan_preview import (
    LimitWrite,
    PolicyNotFound,
    PolicyPlan,
    preview,
)
from prefect_gpu_operator.settings import OperatorSettings
from tests.support.fakes import FakeKube, FakePrefect, Journal

API_URL = "http://prefect.test/api"


class ListingKube(FakeKube):
    """FakeKube that also lists policies and pods, as ``plan`` does."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.policies: list[dict[str, Any]] = []
        self.pods: list[dict[str, Any]] = []

    def node(self, name: str, gpus: int) -> None:
        allocatable = {"cpu": "8", "nvidia.com/gpu": str(gpus)}
        self.nodes[name] = {"metadata": {"name": name}, "status": {"allocatable": allocatable}}

    def policy(
        self,
        name: str,
        ledger: dict[str, int] | None = None,
        created: str = "2026-11-01T00:00:00Z",
        **metadata: Any,
    ) -> None:
        limits = [
            {"name": limit, "node": limit.removeprefix("gpu:"), "limit": slots}
            for limit, slots in (ledger or {}).items()
        ]
        self.policies.append(
            {
                "metadata": {"name": name, "creationTimestamp": created, **metadata},
                "spec": {"server": {"remoteApiUrl": API_URL}},
                "status": {"limits": limits},
            }
        )

    async def list_policies(self) -> list[dict[str, Any]]:
        self.journal.append("kube list policies")
        return self.policies

    async def list_pods(self, label_selector: str) -> list[dict[str, Any]]:
        self.journal.append(f"kube list pods {label_selector}")
        return self.pods


@pytest.fixture
def journal() -> Journal:
    return Journal()


@pytest.fixture
def kube(journal: Journal) -> ListingKube:
    return ListingKube(journal)


@pytest.fixture
def prefect(journal: Journal) -> FakePrefect:
    return FakePrefect(journal, API_URL)


def plans(kube: ListingKube, prefect: FakePrefect, only: str | None = None) -> list[PolicyPlan]:
    return asyncio.run(preview(kube, OperatorSettings(), prefect.connect, only=only))


def test_creates_updates_and_deletes_what_a_reconcile_would_and_writes_nothing(
    kube: ListingKube, prefect: FakePrefect, journal: Journal
) -> None:
    kube.node("a", 4)  # in sync
    kube.node("b", 2)  # its limit drifted to 4
    kube.node("c", 1)  # a user made gpu:c by hand
    kube.node("d", 2)  # new
    kube.policy("p", {"gpu:a": 4, "gpu:b": 4, "gpu:gone": 1})
    for name, limit in {"gpu:a": 4, "gpu:b": 4, "gpu:c": 3, "gpu:gone": 1}.items():
        prefect.limits[name] = ObservedLimit(name, limit)

    (plan,) = plans(kube, prefect)

    assert plan.writes == (
        LimitWrite("create", "gpu:d", "d", None, 2),
        LimitWrite("update", "gpu:b", "b", 4, 2),
        LimitWrite("delete", "gpu:gone", "gone", 1, None),
    )
    assert plan.unchanged == 1
    assert plan.notes == ("gpu:c: exists in Prefect and no policy owns it: left alone",)
    assert plan.error is None
    assert prefect.writes() == 0
    assert prefect.calls["list"] == 1
    assert not kube.patches
    assert not any(call.startswith("kube list pods") for call in journal)  # nobody counts pods


def test_a_held_limit_drains_instead_of_dropping(kube: ListingKube, prefect: FakePrefect) -> None:
    kube.node("a", 0)
    kube.policy("p", {"gpu:a": 4})
    prefect.limits["gpu:a"] = ObservedLimit("gpu:a", 4, active_slots=3)

    (plan,) = plans(kube, prefect)

    assert plan.writes == (LimitWrite("update", "gpu:a", "a", 4, 1, draining_to=0),)


def test_a_policy_being_deleted_plans_its_finalizer(
    kube: ListingKube, prefect: FakePrefect
) -> None:
    kube.node("a", 4)
    kube.policy("p", {"gpu:a": 4}, deletionTimestamp="2026-12-01T00:00:00Z")
    prefect.limits["gpu:a"] = ObservedLimit("gpu:a", 4)

    (plan,) = plans(kube, prefect)

    assert plan.writes == (LimitWrite("delete", "gpu:a", "a", 4, None),)


def test_the_younger_of_two_policies_is_told_who_owns_a_name(
    kube: ListingKube, prefect: FakePrefect
) -> None:
    kube.node("a", 4)
    kube.policy("old", {"gpu:a": 4})
    kube.policy("young", created="2026-11-02T00:00:00Z")
    prefect.limits["gpu:a"] = ObservedLimit("gpu:a", 4)

    old, young = plans(kube, prefect)

    assert (old.policy, old.writes, old.unchanged) == ("old", (), 1)
    assert young.notes == ("gpu:a: owned by the older policy old",)
    assert prefect.calls["list"] == 1  # one listing per server, not per policy


def test_one_named_policy_or_none(kube: ListingKube, prefect: FakePrefect) -> None:
    kube.node("a", 4)
    kube.policy("p")
    kube.policy("q")
    assert [plan.policy for plan in plans(kube, prefect, only="q")] == ["q"]
    with pytest.raises(PolicyNotFound, match="'r' not found"):
        plans(kube, prefect, only="r")


def test_an_unreachable_server_is_the_policys_error(
    kube: ListingKube, prefect: FakePrefect
) -> None:
    kube.node("a", 4)
    kube.policy("p")
    prefect.down = True

    (plan,) = plans(kube, prefect)

    assert plan.error == f"Prefect unreachable: list on {API_URL}: ConnectError"
    assert plan.writes == ()


def test_the_table_and_the_json() -> None:
    drained = LimitWrite("update", "gpu:b", "b", 4, 3, draining_to=1)
    found = [
        PolicyPlan("p", API_URL, (LimitWrite("create", "gpu:a", "a", None, 4), drained), 2),
        PolicyPlan("q", API_URL, notes=("gpu:c: owned by the older policy p",)),
        PolicyPlan("r", "http://down.test/api", error="Prefect unreachable: ..."),
    ]

    assert render_table(found).splitlines() == [
        "POLICY   ACTION   LIMIT   NODE   NOW   PLANNED",
        "p        create   gpu:a   a      -     4",
        "p        update   gpu:b   b      4     3 (draining to 1 as slots are released)",
        "",
        "q: gpu:c: owned by the older policy p",
        "",
        "Plan: 1 to create, 1 to update, 0 to delete, 2 unchanged, 1 policy not planned. "
        "Nothing was written.",
    ]
    assert render_table([]) == "No GPULimitPolicy in the cluster.\n"
    policies = json.loads(render_json(found))["policies"]
    assert policies[0]["changes"][1] == {
        "action": "update",
        "limit": "gpu:b",
        "node": "b",
        "current": 4,
        "planned": 3,
        "drainingTo": 1,
    }
    assert policies[2]["error"] == "Prefect unreachable: ..."
