"""The fake GPU device plugin on a real kubelet: the node's allocatable ``nvidia.com/gpu`` is what
it advertises and follows a change of its count, and the kubelet's allocations reach containers
as ``NVIDIA_VISIBLE_DEVICES``, one distinct device UUID per GPU pod, as NVIDIA's plugin does."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_sandbox.node import GPU_RESOURCE, NodeCluster
from prefect_gpu_sandbox.on_node import kubectl_exec
from prefect_gpu_sandbox.waiting import eventually
from tests.e2e.conftest import FAKE_GPUS

pytestmark = pytest.mark.e2e


def _expected_uuid(seed: str, index: int) -> str:
    """The plugin's documented UUID: stable for a node name and a device index."""
    digest = hashlib.sha1(f"{seed}/{index}".encode()).hexdigest()
    parts = (digest[0:8], digest[8:12], digest[12:16], digest[16:20], digest[20:32])
    return "GPU-" + "-".join(parts)


def _gpu_pod(image: str) -> dict[str, Any]:
    container = {
        "name": "gpu",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", 'trap "exit 0" TERM; sleep inf & wait'],
        "resources": {"limits": {GPU_RESOURCE: "1"}},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"gpu-{uuid.uuid4().hex[:6]}"},
        "spec": {"containers": [container], "terminationGracePeriodSeconds": 1},
    }


def test_allocatable_gpus_follow_the_plugins_count(node: NodeCluster) -> None:
    assert node.allocatable_gpus() == FAKE_GPUS
    try:
        node.set_fake_gpus(FAKE_GPUS + 1)
        eventually(
            lambda: node.allocatable_gpus() == FAKE_GPUS + 1, timeout=60, what="one GPU more"
        )
        node.set_fake_gpus(FAKE_GPUS - 1)
        eventually(
            lambda: node.allocatable_gpus() == FAKE_GPUS - 1, timeout=60, what="two GPUs fewer"
        )
    finally:
        node.set_fake_gpus(FAKE_GPUS)
        eventually(lambda: node.allocatable_gpus() == FAKE_GPUS, timeout=60, what="restored")


@pytest.fixture
def gpu_pods(
    node_core_v1: client.CoreV1Api, node_namespace: str, busybox_image: str
) -> Iterator[list[client.V1Pod]]:
    """Two running pods, each holding one fake GPU."""
    names = [
        node_core_v1.create_namespaced_pod(node_namespace, _gpu_pod(busybox_image)).metadata.name
        for _ in range(2)
    ]

    def running() -> list[client.V1Pod]:
        pods = [node_core_v1.read_namespaced_pod(name, node_namespace) for name in names]
        assert [pod.status.phase for pod in pods] == ["Running"] * 2, [p.status for p in pods]
        return pods

    try:
        yield eventually(running, timeout=120, what="two GPU pods Running")
    finally:
        for name in names:
            node_core_v1.delete_namespaced_pod(name, node_namespace)


def test_each_gpu_pod_sees_its_own_device_uuid(
    node: NodeCluster, gpu_pods: list[client.V1Pod]
) -> None:
    advertised = {_expected_uuid(node.node_name, index) for index in range(FAKE_GPUS)}
    seen = [kubectl_exec(node, pod, 'echo "$NVIDIA_VISIBLE_DEVICES"').strip() for pod in gpu_pods]
    assert set(seen) <= advertised, seen
    assert len(set(seen)) == 2, seen
