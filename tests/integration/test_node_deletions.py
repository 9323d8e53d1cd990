"""Nodes deleted out of the operator's sight lose their limits within one resync.

kopf reports a deletion only if its watch sees it: a node deleted while the operator is stopped,
or while its watch is being restarted (after 410 Gone kopf lists again, and a listing reports no
deletions), is noticed only because every resync lists the nodes again and prunes the gone.
A standby replica's case is in test_operator_ha.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from prefect_gpu_operator.api.crd import CRD_FILE
from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.tools import tools_bin
from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies, pool_spec
from tests.support.proxy import Proxy, kubeconfig_through

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RESYNC = 2.0


@pytest.fixture
def own_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane of this test's own, whose API server it restarts."""
    with ControlPlane(tmp_path / "cluster") as plane:
        kubectl = [str(tools_bin() / "kubectl"), f"--kubeconfig={plane.kubeconfig}"]
        subprocess.run(
            [*kubectl, "apply", "-f", str(REPO / CRD_FILE)], check=True, capture_output=True
        )
        subprocess.run(
            [*kubectl, "create", "namespace", "prefect-gpu-operator"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "--timeout=60s",
             "crd/gpulimitpolicies.prefectgpu.io"],
            check=True, capture_output=True,
        )  # fmt: skip
        yield plane


def test_a_node_deleted_while_the_watch_restarts(
    own_plane: ControlPlane,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
    tmp_path: Path,
) -> None:
    api = config.new_client_from_config(config_file=str(own_plane.kubeconfig))
    nodes, policies = NodeFactory(client.CoreV1Api(api)), Policies(api)
    with Proxy(("127.0.0.1", own_plane.apiserver_port)) as line:
        through = kubeconfig_through(own_plane.kubeconfig, line, tmp_path / "kubeconfig")
        operator = OperatorProcess(through, tmp_path / "operator.log", resync_seconds=RESYNC)
        operator.start()
        try:
            nodes.create("gw-a", 4, labels={"pool": "gw"})
            nodes.create("gw-b", 2, labels={"pool": "gw"})
            policies.create("gw", pool_spec(prefect_api_url, "gw"))
            expect_limits(prefect_limits, "gpu:gw-", {"gpu:gw-a": 4, "gpu:gw-b": 2})
            line.cut()  # the operator's watches break and cannot resume ...
            nodes.delete("gw-b")
            own_plane.restart_apiserver()  # ... and when they do, their resourceVersion is gone
            line.restore()
            expect_limits(prefect_limits, "gpu:gw-", {"gpu:gw-a": 4}, timeout=RESYNC + 30)
            assert operator.process.running()
        finally:
            policies.delete_all()
            operator.stop()
            api.close()


def test_a_node_deleted_while_the_operator_was_stopped(
    crd: Path,
    operator_namespace: str,
    kubeconfig: Path,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_limits: PrefectLimitsReader,
    prefect_api_url: str,
    tmp_path: Path,
) -> None:
    operator = OperatorProcess(kubeconfig, tmp_path / "first.log", resync_seconds=RESYNC).start()
    gpu_nodes.create("gs-a", 4, labels={"pool": "gs"})
    gpu_nodes.create("gs-b", 2, labels={"pool": "gs"})
    policies.create("gs", pool_spec(prefect_api_url, "gs"))
    expect_limits(prefect_limits, "gpu:gs-", {"gpu:gs-a": 4, "gpu:gs-b": 2})
    operator.kill()
    gpu_nodes.delete("gs-b")
    operator = OperatorProcess(kubeconfig, tmp_path / "second.log", resync_seconds=RESYNC).start()
    try:
        expect_limits(prefect_limits, "gpu:gs-", {"gpu:gs-a": 4}, timeout=RESYNC + 15)
        eventually(lambda: policies.status("gs").get("nodes") == 1, timeout=10)
    finally:
        policies.delete_all()
        operator.stop()
