"""The local control plane is a real kube-apiserver: nodes, status, RBAC, kubectl, helm."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from prefect_gpu_sandbox.controlplane import ControlPlane
from prefect_gpu_sandbox.tools import K8S_VERSION, tools_bin
from tests.support.nodes import NodeFactory
from tests.support.sockets import answers, listening_addresses

pytestmark = pytest.mark.integration


def _run(*argv: str, kubeconfig: Path | None = None) -> str:
    env_args = [f"--kubeconfig={kubeconfig}"] if kubeconfig else []
    tool, *rest = argv
    result = subprocess.run(
        [str(tools_bin() / tool), *env_args, *rest],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_gpu_node_round_trips(gpu_nodes: NodeFactory, core_v1: client.CoreV1Api) -> None:
    gpu_nodes.create("node-a", gpus=4)
    node = core_v1.read_node("node-a")
    assert node.status.allocatable["nvidia.com/gpu"] == "4"
    assert node.status.capacity["nvidia.com/gpu"] == "4"


def test_allocatable_changes_through_status_subresource(
    gpu_nodes: NodeFactory, core_v1: client.CoreV1Api
) -> None:
    gpu_nodes.create("node-b", gpus=4)
    before = core_v1.read_node("node-b").metadata.resource_version
    gpu_nodes.set_gpus("node-b", 2)
    node = core_v1.read_node("node-b")
    assert node.status.allocatable["nvidia.com/gpu"] == "2"
    assert node.metadata.resource_version != before
    # A plain update cannot change status: only the subresource can, as on a real cluster.
    core_v1.patch_node("node-b", {"status": {"allocatable": {"nvidia.com/gpu": "9"}}})
    assert core_v1.read_node("node-b").status.allocatable["nvidia.com/gpu"] == "2"


def test_other_gpu_resources(gpu_nodes: NodeFactory, core_v1: client.CoreV1Api) -> None:
    gpu_nodes.create("gpu-1.example.com", resources={"nvidia.com/mig-1g.10gb": 7, "amd.com/gpu": 2})
    allocatable = core_v1.read_node("gpu-1.example.com").status.allocatable
    assert (allocatable["nvidia.com/mig-1g.10gb"], allocatable["amd.com/gpu"]) == ("7", "2")


def test_kubectl_get_nodes(gpu_nodes: NodeFactory, kubeconfig: Path) -> None:
    gpu_nodes.create("node-c", gpus=1)
    names = _run("kubectl", "get", "nodes", "-o", "name", kubeconfig=kubeconfig).split()
    assert "node/node-c" in names


def test_versions_are_stamped(kubeconfig: Path) -> None:
    versions = json.loads(_run("kubectl", "version", "-o", "json", kubeconfig=kubeconfig))
    assert versions["clientVersion"]["gitVersion"] == K8S_VERSION
    assert versions["serverVersion"]["gitVersion"] == K8S_VERSION
    assert _run("helm", "version", "--short").startswith("v3.")


def test_rbac_is_enforced(kube_api: client.ApiClient, gpu_nodes: NodeFactory) -> None:
    gpu_nodes.create("node-rbac", gpus=1)
    # A user with no bindings is authenticated by impersonation but authorized for nothing.
    kube_api.set_default_header("Impersonate-User", "nobody")
    try:
        with pytest.raises(ApiException) as error:
            client.CoreV1Api(kube_api).list_node()
        assert error.value.status == 403
    finally:
        kube_api.default_headers.pop("Impersonate-User")
    names = [node.metadata.name for node in client.CoreV1Api(kube_api).list_node().items]
    assert "node-rbac" in names  # the admin the kubeconfig names may


def test_binds_loopback_only(control_plane: ControlPlane) -> None:
    for port in (control_plane.apiserver_port, control_plane.etcd_port):
        assert answers("127.0.0.1", port)
        assert listening_addresses(port) == {"127.0.0.1"}
