"""One real node (kubelet, containerd, kube-proxy, its control plane and Prefect in namespaces of
their own) shared by every end-to-end test, and stopped after the last of them, so it does not
load the machine while other tests run. It needs root, as CI has. Its fake GPU device plugin
advertises ``FAKE_GPUS`` devices."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client

from prefect_gpu_sandbox.node import NodeCluster
from tests.support.node_traces import lasting_traces

# What the node's fake GPU device plugin advertises at first.
FAKE_GPUS = 2


@pytest.fixture(scope="package")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    """A Ready node; after the end-to-end tests it is stopped, and nothing of it may remain."""
    if os.geteuid() != 0:
        pytest.skip("a real node needs root (network namespaces, mounts, cgroups)")
    cluster = NodeCluster(tmp_path_factory.mktemp("node"), fake_gpus=FAKE_GPUS)
    try:
        cluster.start()
        pids = [process.pid for process in cluster.processes]
        yield cluster
    finally:
        cluster.stop()
    assert not lasting_traces(cluster.directory, cluster.netns.name, pids)


@pytest.fixture(scope="package")
def node_core_v1(node: NodeCluster) -> client.CoreV1Api:
    return client.CoreV1Api(node.api)


@pytest.fixture(scope="package")
def node_apps_v1(node: NodeCluster) -> client.AppsV1Api:
    return client.AppsV1Api(node.api)


@pytest.fixture(scope="package")
def busybox_image(node: NodeCluster) -> str:
    """A busybox image in the node's containerd (no registry: pull policy Never)."""
    return node.import_busybox_image()


@pytest.fixture(scope="module")
def node_namespace(node_core_v1: client.CoreV1Api) -> Iterator[str]:
    """A namespace of the module's own on the node, deleted after it."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    node_core_v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    node_core_v1.delete_namespace(name)
