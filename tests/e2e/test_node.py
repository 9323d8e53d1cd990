"""A real node runs pods: scheduled, started by containerd and runc, networked by the CNI bridge,
given WORKER_ID by the Downward API, and able to reach Services through kube-proxy and the
node's Prefect server."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_sandbox.node import NodeCluster
from prefect_gpu_sandbox.on_node import kubectl_exec
from prefect_gpu_sandbox.waiting import eventually

pytestmark = pytest.mark.e2e

# Exits at once on SIGTERM (a shell as PID 1 ignores it otherwise), so deletion is quick.
_PRINT_AND_WAIT = 'trap "exit 0" TERM; echo "WORKER_ID=$WORKER_ID"; sleep inf & wait'


def _probe(image: str) -> dict[str, Any]:
    labels = {"app": "probe"}
    container = {
        "name": "probe",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", _PRINT_AND_WAIT],
        "env": [{"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "probe"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


@pytest.fixture(scope="module")
def probe_pod(
    node_apps_v1: client.AppsV1Api,
    node_core_v1: client.CoreV1Api,
    node_namespace: str,
    busybox_image: str,
) -> Iterator[client.V1Pod]:
    """The running pod of a Deployment that prints its WORKER_ID."""
    node_apps_v1.create_namespaced_deployment(node_namespace, _probe(busybox_image))

    def running() -> client.V1Pod:
        pods = node_core_v1.list_namespaced_pod(node_namespace, label_selector="app=probe").items
        assert [pod.status.phase for pod in pods] == ["Running"], [p.status for p in pods]
        return pods[0]

    yield eventually(running, timeout=120, what="the probe Deployment's pod Running")
    node_apps_v1.delete_namespaced_deployment("probe", node_namespace)


def test_pod_reads_worker_id_from_the_downward_api(
    node: NodeCluster, node_core_v1: client.CoreV1Api, probe_pod: client.V1Pod
) -> None:
    assert probe_pod.spec.node_name == node.node_name

    def logged() -> None:
        log = node_core_v1.read_namespaced_pod_log(
            probe_pod.metadata.name, probe_pod.metadata.namespace
        )
        assert log.splitlines() == [f"WORKER_ID={node.node_name}"]

    eventually(logged, timeout=30, what="the pod's log")
    assert kubectl_exec(node, probe_pod, 'echo "$WORKER_ID"').strip() == node.node_name


def test_pod_gets_an_ip_from_the_pods_bridge(node: NodeCluster, probe_pod: client.V1Pod) -> None:
    address = ipaddress.ip_address(probe_pod.status.pod_ip)
    assert address in ipaddress.ip_network(node.network.pod_subnet)


def test_pod_mounts_its_service_account_token(node: NodeCluster, probe_pod: client.V1Pod) -> None:
    mounted = kubectl_exec(node, probe_pod, "ls /var/run/secrets/kubernetes.io/serviceaccount")
    assert mounted.split() == ["ca.crt", "namespace", "token"]


def test_pod_reaches_the_kubernetes_service_through_kube_proxy(
    node: NodeCluster, probe_pod: client.V1Pod
) -> None:
    # Plain HTTP to the Service's TLS port: only a Go TLS server (the API server) answers so.
    service = node.network.kubernetes_service_ip
    script = f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 5 {service} 443'
    answer = kubectl_exec(node, probe_pod, script)
    assert "Client sent an HTTP request to an HTTPS server." in answer


def test_pod_reaches_the_prefect_server(node: NodeCluster, probe_pod: client.V1Pod) -> None:
    health = kubectl_exec(node, probe_pod, f"wget -q -O - {node.pod_prefect_api_url}/health")
    assert health.strip() == "true"


def test_only_the_relay_listens_on_this_machine_and_only_on_loopback(node: NodeCluster) -> None:
    pids = {process.pid: process.name for process in node.processes}
    listing = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    listeners = {
        (pids[int(pid)], line.split()[3])
        for line in listing.splitlines()
        for pid in re.findall(r"pid=(\d+)", line)
        if int(pid) in pids
    }
    ports = (node.network.apiserver_port, node.prefect_port)
    assert listeners == {("relay", f"127.0.0.1:{port}") for port in ports}
