"""``prefect-gpu-operator plan`` against the real API server and Prefect: the creates, updates and
deletes a reconcile would make, and that planning wrote nothing (Prefect's limits, down to their
``updated`` stamps, and the policy, down to its resourceVersion, stay as they were)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_gpu_sandbox.processes import free_port
from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies, pool_spec

pytestmark = pytest.mark.integration

NAMESPACE = "prefect-gpu-operator"


def plan(kubeconfig: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PREFECT_GPU_OPERATOR_NAMESPACE": NAMESPACE}
    return subprocess.run(
        [sys.executable, "-m", "prefect_gpu_operator", "plan", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def planned(kubeconfig: Path, policy: str) -> dict[str, Any]:
    """The JSON plan of one policy; the command must succeed."""
    result = plan(kubeconfig, policy, "-o", "json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    (found,) = json.loads(result.stdout)["policies"]
    assert found["name"] == policy
    return dict(found)


def writes(found: dict[str, Any]) -> list[tuple[str, str, int | None, int | None]]:
    return [(c["action"], c["limit"], c["current"], c["planned"]) for c in found["changes"]]


class Untouched:
    """What plan must not change: the policy object and every Prefect limit of a prefix."""

    def __init__(self, policies: Policies, limits: PrefectLimitsReader, policy: str) -> None:
        self.read = lambda: (
            policies.get(policy),
            {name: item for name, item in limits.all().items() if name.startswith("gpu:")},
        )
        self.before = self.read()

    def check(self) -> None:
        assert self.read() == self.before


class Operator:
    """The operator, started and stopped by the test; running again while its policies are
    deleted (their finalizer needs it)."""

    def __init__(self, kubeconfig: Path, log: Path, policies: Policies) -> None:
        self.kubeconfig, self.log, self.policies = kubeconfig, log, policies
        self.process: OperatorProcess | None = None

    def start(self) -> None:
        self.process = OperatorProcess(self.kubeconfig, self.log).start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def close(self) -> None:
        if self.process is None:
            self.start()
        self.policies.delete_all()
        self.stop()


@pytest.fixture
def operator_at_hand(
    kubeconfig: Path,
    crd: Path,
    operator_namespace: str,
    policies: Policies,
    gpu_nodes: NodeFactory,
    tmp_path: Path,
) -> Iterator[Operator]:
    operator = Operator(kubeconfig, tmp_path / "operator.log", policies)
    yield operator
    operator.close()


def test_plan_shows_the_creates_of_a_new_policy_and_writes_nothing(
    kubeconfig: Path,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("plan-a1", 4, labels={"pool": "plan-a"})
    gpu_nodes.create("plan-a2", 2, labels={"pool": "plan-a"})
    gpu_nodes.create("plan-x", 8, labels={"pool": "elsewhere"})
    policies.create("plan-a", pool_spec(prefect_api_url, "plan-a"))
    untouched = Untouched(policies, prefect_limits, "plan-a")

    found = planned(kubeconfig, "plan-a")
    assert writes(found) == [
        ("create", "gpu:plan-a1", None, 4),
        ("create", "gpu:plan-a2", None, 2),
    ]
    assert found["server"] == prefect_api_url
    table = plan(kubeconfig, "plan-a")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines() == [
        "POLICY   ACTION   LIMIT         NODE      NOW   PLANNED",
        "plan-a   create   gpu:plan-a1   plan-a1   -     4",
        "plan-a   create   gpu:plan-a2   plan-a2   -     2",
        "",
        "Plan: 2 to create, 0 to update, 0 to delete, 0 unchanged. Nothing was written.",
    ]

    untouched.check()
    assert policies.status("plan-a") == {}
    assert prefect_limits.limits("gpu:plan-") == {}


def test_plan_shows_updates_after_a_node_change_and_deletes_after_a_node_deletion(
    kubeconfig: Path,
    operator_at_hand: Operator,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("plan-b1", 4, labels={"pool": "plan-b"})
    gpu_nodes.create("plan-b2", 2, labels={"pool": "plan-b"})
    policies.create("plan-b", pool_spec(prefect_api_url, "plan-b"))
    operator_at_hand.start()
    expect_limits(prefect_limits, "gpu:plan-b", {"gpu:plan-b1": 4, "gpu:plan-b2": 2})
    eventually(lambda: policies.status("plan-b").get("totalSlots") == 6, what="status written")
    assert writes(planned(kubeconfig, "plan-b")) == []  # the operator is done
    operator_at_hand.stop()

    gpu_nodes.set_gpus("plan-b1", 1)
    untouched = Untouched(policies, prefect_limits, "plan-b")
    found = planned(kubeconfig, "plan-b")
    assert writes(found) == [("update", "gpu:plan-b1", 4, 1)]
    assert found["unchanged"] == 1

    gpu_nodes.delete("plan-b2")
    found = planned(kubeconfig, "plan-b")
    assert writes(found) == [("update", "gpu:plan-b1", 4, 1), ("delete", "gpu:plan-b2", 2, None)]
    assert found["changes"][1]["node"] == "plan-b2"
    untouched.check()

    operator_at_hand.start()  # what the plan said is what the operator does
    expect_limits(prefect_limits, "gpu:plan-b", {"gpu:plan-b1": 1})


def test_plan_says_when_prefect_is_unreachable(
    kubeconfig: Path, policies: Policies, gpu_nodes: NodeFactory, crd: Path
) -> None:
    gpu_nodes.create("plan-c1", 4, labels={"pool": "plan-c"})
    unreachable = f"http://127.0.0.1:{free_port()}/api"
    policies.create("plan-c", pool_spec(unreachable, "plan-c"))

    result = plan(kubeconfig, "plan-c")

    assert result.returncode == 1
    assert result.stderr.startswith(
        f"prefect-gpu-operator: error: policy plan-c: Prefect unreachable: list on {unreachable}: "
    )
    assert result.stderr.count("\n") == 1
    assert "1 policy not planned" in result.stdout


def test_plan_of_a_policy_that_does_not_exist(kubeconfig: Path, crd: Path) -> None:
    result = plan(kubeconfig, "plan-nobody")
    assert result.returncode == 1
    assert result.stderr == "prefect-gpu-operator: error: GPULimitPolicy 'plan-nobody' not found\n"
