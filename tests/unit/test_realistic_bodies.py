"""The realistic node and pod bodies the cluster benchmark creates: sizes as in real clusters.

That the API server accepts them is shown by the benchmark itself, which creates thousands.
"""

from __future__ import annotations

import json

from prefect_gpu_operator.adapters.kube import gpu_node
from tests.support.realistic import (
    GFD_TIMESTAMP,
    WORKER_LABEL,
    realistic_node_body,
    realistic_pod_body,
)


def _size(body: object) -> int:
    return len(json.dumps(body, separators=(",", ":")))


def test_gpu_and_cpu_nodes_are_about_15_kb() -> None:
    gpu = realistic_node_body("gpu-0001", 1, {"nvidia.com/gpu": 8})
    cpu = realistic_node_body("cpu-0002", 2)
    assert 13_000 <= _size(gpu) <= 18_000
    assert 13_000 <= _size(cpu) <= 18_000
    assert len(gpu["status"]["images"]) == 50  # type: ignore[index]


def test_gpu_nodes_carry_gfd_labels_and_their_gpus() -> None:
    body = realistic_node_body("gpu-0007", 7, {"nvidia.com/gpu": 4})
    node = gpu_node(body)
    assert node.allocatable == {"nvidia.com/gpu": "4"}
    assert node.labels["nvidia.com/gpu.count"] == "4"
    assert node.labels["nvidia.com/gpu.product"].startswith("NVIDIA-")
    assert GFD_TIMESTAMP in node.labels
    assert node.labels["topology.kubernetes.io/zone"].startswith("us-east-1")


def test_cpu_nodes_have_no_gpu_resource_nor_gfd_labels() -> None:
    node = gpu_node(realistic_node_body("cpu-0003", 3))
    assert node.allocatable == {}
    assert not any(key.startswith("nvidia.com/") for key in node.labels)


def test_worker_pods_are_labelled_and_request_gpus_ordinary_pods_are_not() -> None:
    worker = realistic_pod_body("w-1", "gpu-0001", worker=True, gpus=2)
    plain = realistic_pod_body("p-1", "cpu-0001")
    assert worker["metadata"]["labels"][WORKER_LABEL] == "true"  # type: ignore[index]
    assert worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"  # type: ignore[index]
    assert WORKER_LABEL not in plain["metadata"]["labels"]  # type: ignore[index]
    assert "nvidia.com/gpu" not in plain["spec"]["containers"][0]["resources"]["limits"]  # type: ignore[index]
    for pod in (worker, plain):
        assert pod["spec"]["nodeName"] in {"gpu-0001", "cpu-0001"}  # type: ignore[index]
        assert 1_000 <= _size(pod) <= 4_000
