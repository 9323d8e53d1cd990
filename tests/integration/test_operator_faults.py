"""Faults: Prefect down while nodes change, a SIGKILL mid-reconcile, API keys from Secrets."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies, ledger, pool_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server this module may stop and restart on the same port and database."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-faults"))
    server.start()
    yield server
    server.stop()


def _condition_status(policies: Policies, name: str, kind: str, expected: str) -> dict[str, str]:
    condition = policies.condition(name, kind)
    assert condition["status"] == expected
    return condition


def test_prefect_outage_is_reported_and_survived(
    operator: OperatorProcess,
    own_prefect: PrefectServer,
    policies: Policies,
    gpu_nodes: NodeFactory,
) -> None:
    reader = PrefectLimitsReader(own_prefect.api_url)
    gpu_nodes.create("f1-a", 4, labels={"pool": "f1"})
    gpu_nodes.create("f1-b", 2, labels={"pool": "f1"})
    spec = pool_spec(own_prefect.api_url, "f1")
    policies.create("f1", spec)
    expect_limits(reader, "gpu:f1-", {"gpu:f1-a": 4, "gpu:f1-b": 2})

    own_prefect.stop()
    outage_started = time.monotonic()
    gpu_nodes.set_gpus("f1-a", 1)
    gpu_nodes.create("f1-c", 8, labels={"pool": "f1"})
    gpu_nodes.delete("f1-b")
    down = eventually(
        lambda: _condition_status(policies, "f1", "PrefectReachable", "False"), timeout=30
    )
    assert own_prefect.api_url.split("/api")[0] in down["message"]
    assert policies.condition("f1", "Ready")["status"] == "False"
    assert "PrefectUnreachable" in policies.events("f1")
    # Stay down for 30 s in all; the operator must keep running and keep retrying.
    eventually(lambda: _elapsed(outage_started, 30), timeout=40, interval=1)
    assert operator.process.running()
    assert operator.healthy()

    own_prefect.start()
    reader = PrefectLimitsReader(own_prefect.api_url)
    expect_limits(reader, "gpu:f1-", {"gpu:f1-a": 1, "gpu:f1-c": 8}, timeout=30)
    eventually(lambda: _condition_status(policies, "f1", "PrefectReachable", "True"), timeout=10)
    eventually(lambda: _condition_status(policies, "f1", "Ready", "True"), timeout=10)
    assert sorted(e["name"] for e in ledger(policies.status("f1"))) == ["gpu:f1-a", "gpu:f1-c"]
    reader.close()


def _elapsed(since: float, seconds: float) -> None:
    assert time.monotonic() - since >= seconds


def test_sigkill_mid_reconcile_converges_without_duplicates_or_orphans(
    crd: Path,
    kubeconfig: Path,
    operator_namespace: str,
    own_prefect: PrefectServer,
    policies: Policies,
    gpu_nodes: NodeFactory,
    tmp_path: Path,
) -> None:
    reader = PrefectLimitsReader(own_prefect.api_url)
    expected = {}
    for index in range(50):
        gpu_nodes.create(f"f2-{index:02d}", 1 + index % 8, labels={"pool": "f2"})
        expected[f"gpu:f2-{index:02d}"] = 1 + index % 8
    first = OperatorProcess(kubeconfig, tmp_path / "first.log", resync_seconds=600).start()
    spec = pool_spec(own_prefect.api_url, "f2")
    policies.create("f2", spec)

    def some_created() -> int:
        count = len(reader.limits("gpu:f2-"))
        assert count > 0
        return count

    created_at_kill = eventually(some_created, timeout=30, interval=0.005)
    first.kill()
    assert created_at_kill < 50, "the kill landed after the reconcile; the test proves less"

    second = OperatorProcess(kubeconfig, tmp_path / "second.log", resync_seconds=600).start()
    try:
        expect_limits(reader, "gpu:f2-", expected, timeout=30)
        eventually(lambda: _ledger_is(policies, "f2", set(expected)), timeout=10)
        # Deleting the policy removes exactly what it owns: nothing orphaned.
        policies.delete("f2")
        assert reader.limits("gpu:f2-") == {}
    finally:
        second.stop()
        reader.close()


def _ledger_is(policies: Policies, name: str, names: set[str]) -> None:
    assert {entry["name"] for entry in ledger(policies.status(name))} == names


def test_api_key_comes_from_the_secret_and_is_never_logged(
    operator: OperatorProcess,
    own_prefect: PrefectServer,
    operator_namespace: str,
    core_v1: client.CoreV1Api,
    policies: Policies,
    gpu_nodes: NodeFactory,
) -> None:
    api_key = "pnu_test-key-that-must-never-be-logged-4f1c"
    core_v1.create_namespaced_secret(
        operator_namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="prefect-api-key"),
            data={"key": base64.b64encode(api_key.encode()).decode()},
        ),
    )
    reader = PrefectLimitsReader(own_prefect.api_url)
    try:
        gpu_nodes.create("f3-a", 2, labels={"pool": "f3"})
        server = {
            "remoteApiUrl": own_prefect.api_url,
            "apiKey": {"valueFrom": {"secretKeyRef": {"name": "prefect-api-key", "key": "key"}}},
        }
        policies.create("f3", {"server": server, "nodeSelector": {"matchLabels": {"pool": "f3"}}})
        expect_limits(reader, "gpu:f3-", {"gpu:f3-a": 2})

        missing = {
            **server,
            "apiKey": {"valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}},
        }
        gpu_nodes.create("f3-b", 2, labels={"pool": "f3b"})
        policies.create(
            "f3b", {"server": missing, "nodeSelector": {"matchLabels": {"pool": "f3b"}}}
        )
        condition = eventually(
            lambda: _condition_status(policies, "f3b", "PrefectReachable", "False"), timeout=15
        )
        assert f"Secret {operator_namespace}/absent not found" in condition["message"]
        assert reader.limits("gpu:f3-b") == {}
        assert api_key not in operator.log()
    finally:
        # The policies go first: releasing f3's limits needs the key.
        policies.delete_all()
        core_v1.delete_namespaced_secret("prefect-api-key", operator_namespace)
        reader.close()
