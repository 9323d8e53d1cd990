"""Two replicas with kopf peering: one reconciles; kill it and the other takes over."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.tools import tools_bin
from prefect_gpu_sandbox.waiting import eventually, holds
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess, PrefectLimitsReader, expect_limits
from tests.support.policies import Policies, pool_spec
from tests.support.proxy import Proxy, kubeconfig_through

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PEERING = "ha-test"
LIFETIME = 5  # seconds a silent replica stays "alive" in the peering object
RESYNC = 2.0  # the test operators' resync interval


@pytest.fixture
def peering(kubeconfig: Path, crd: Path) -> str:
    kubectl = [str(tools_bin() / "kubectl"), f"--kubeconfig={kubeconfig}"]
    crds = REPO / "charts" / "prefect-gpu-operator" / "crds" / "kopf-peering.yaml"
    subprocess.run([*kubectl, "apply", "-f", str(crds)], check=True, capture_output=True)
    subprocess.run(
        [
            *kubectl,
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/clusterkopfpeerings.kopf.dev",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*kubectl, "apply", "-f", "-"],
        input=f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata:\n  name: {PEERING}\n",
        text=True,
        check=True,
        capture_output=True,
    )
    return PEERING


def _reconciles(operator: OperatorProcess) -> float:
    return operator.metric("prefect_gpu_operator_reconciles_total")


def test_one_replica_reconciles_and_the_other_takes_over(
    peering: str,
    kubeconfig: Path,
    operator_namespace: str,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_api_url: str,
    tmp_path: Path,
) -> None:
    env = {
        "PREFECT_GPU_OPERATOR_PEERING": peering,
        "PREFECT_GPU_OPERATOR_PEERING_LIFETIME_SECONDS": str(LIFETIME),
    }
    replicas = [
        OperatorProcess(
            kubeconfig,
            tmp_path / "first.log",
            extra_env={**env, "PREFECT_GPU_OPERATOR_PEERING_PRIORITY": "200"},
        ),
        OperatorProcess(
            kubeconfig,
            tmp_path / "second.log",
            extra_env={**env, "PREFECT_GPU_OPERATOR_PEERING_PRIORITY": "100"},
        ),
    ]
    reader = PrefectLimitsReader(prefect_api_url)
    try:
        gpu_nodes.create("ha-a", 4, labels={"pool": "ha"})
        gpu_nodes.create("ha-gone", 1, labels={"pool": "ha"})  # both replicas start seeing it
        for replica in replicas:
            replica.start()
        active, standby = replicas
        policies.create("ha", pool_spec(prefect_api_url, "ha"))
        expect_limits(reader, "gpu:ha-", {"gpu:ha-a": 4, "gpu:ha-gone": 1}, timeout=30)
        gpu_nodes.set_gpus("ha-a", 3)
        gpu_nodes.delete("ha-gone")  # the standby's watch is paused: it never hears of it
        expect_limits(reader, "gpu:ha-", {"gpu:ha-a": 3})
        assert _reconciles(active) > 0
        assert _reconciles(standby) == 0  # paused: the higher priority replica does the work

        active.kill()
        killed = time.monotonic()
        gpu_nodes.set_gpus("ha-a", 2)
        gpu_nodes.create("ha-b", 8, labels={"pool": "ha"})
        expect_limits(reader, "gpu:ha-", {"gpu:ha-a": 2, "gpu:ha-b": 8}, timeout=LIFETIME + 30)
        takeover = time.monotonic() - killed
        assert _reconciles(standby) > 0
        # SIGKILL leaves the killed replica's peering record behind (a SIGTERM would remove it):
        # the standby resumes only once that record expires, then converges. The record was
        # refreshed at most ~1 s before the kill (kopf's keepalive for a short lifetime).
        assert LIFETIME - 2 <= takeover < LIFETIME + 20, f"takeover took {takeover:.1f} s"
        print(f"\ntakeover after SIGKILL: {takeover:.1f} s (peering lifetime {LIFETIME} s)")
        eventually(lambda: _nodes(policies, 2), timeout=10)
        # The node deleted while it was standby is not brought back: its first resync listed
        # the nodes again before reconciling.
        holds(lambda: "gpu:ha-gone" not in reader.limits("gpu:ha-"), duration=2 * RESYNC)
        policies.delete_all()  # the standby, now active, releases the limits
        assert reader.limits("gpu:ha-") == {}
    finally:
        policies.delete_all()
        for replica in replicas:
            replica.stop()
        reader.close()


def _nodes(policies: Policies, expected: int) -> None:
    assert policies.status("ha").get("nodes") == expected


def _writes(operator: OperatorProcess) -> float:
    return sum(
        operator.metric("prefect_gpu_operator_prefect_api_calls_total", operation=operation)
        for operation in ("create", "update", "delete")
    )


def test_a_replica_cut_off_from_the_api_server_stops_writing(
    peering: str,
    control_plane: ControlPlane,
    kubeconfig: Path,
    operator_namespace: str,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_api_url: str,
    tmp_path: Path,
) -> None:
    """It cannot hear that another replica took over, and its resyncs would write back what its
    stale view wants: it must stop writing to Prefect before its peering record expires."""
    env = {
        "PREFECT_GPU_OPERATOR_PEERING": peering,
        "PREFECT_GPU_OPERATOR_PEERING_LIFETIME_SECONDS": str(LIFETIME),
    }
    reader = PrefectLimitsReader(prefect_api_url)
    with Proxy(("127.0.0.1", control_plane.apiserver_port)) as line:
        through = kubeconfig_through(kubeconfig, line, tmp_path / "cut-kubeconfig")
        active = OperatorProcess(
            through,
            tmp_path / "active.log",
            extra_env={**env, "PREFECT_GPU_OPERATOR_PEERING_PRIORITY": "200"},
        )
        standby = OperatorProcess(
            kubeconfig,
            tmp_path / "standby.log",
            extra_env={**env, "PREFECT_GPU_OPERATOR_PEERING_PRIORITY": "100"},
        )
        try:
            active.start()
            standby.start()
            gpu_nodes.create("hf-a", 4, labels={"pool": "hf"})
            policies.create("hf", pool_spec(prefect_api_url, "hf"))
            expect_limits(reader, "gpu:hf-", {"gpu:hf-a": 4}, timeout=30)
            assert _reconciles(standby) == 0

            line.cut()  # the active replica's line to the API server goes down
            gpu_nodes.set_gpus("hf-a", 2)  # only the standby will see it, once it takes over
            expect_limits(reader, "gpu:hf-", {"gpu:hf-a": 2}, timeout=LIFETIME + 30)
            written = _writes(active)
            # The cut replica still believes in 4 GPUs and reaches Prefect every resync: without
            # its fence it would write 4 back; it writes nothing.
            holds(lambda: reader.limits("gpu:hf-") == {"gpu:hf-a": 2}, duration=3 * RESYNC)
            assert _writes(active) == written
            assert "not writing to Prefect" in active.log()
        finally:
            line.restore()  # so the cut replica can stop cleanly
            policies.delete_all()
            for replica in (active, standby):
                replica.stop()
            reader.close()
