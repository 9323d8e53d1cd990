"""Prefect worker pods on the real API server: capacity taken from the GPUs they were given,
warnings for GPU pods that see fewer GPUs than their node's limit, and none for CPU pods.

No kubelet runs: "scheduled" means spec.nodeName. The pods set WORKER_ID and the label the
webhook would add themselves, as the chart's GPU worker does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_sandbox.waiting import eventually
from tests.support.operator import Scene, expect_limits
from tests.support.policies import pool_spec
from tests.support.webhook import Pods

pytestmark = pytest.mark.integration

WORKER_LABELS = {"app.kubernetes.io/name": "prefect-worker", "prefectgpu.io/has-worker-id": "true"}


@pytest.fixture
def pods(kube_api: client.ApiClient) -> Iterator[Pods]:
    created = Pods(kube_api)
    yield created
    created.delete_all()


def _worker(gpus: int) -> list[dict[str, Any]]:
    container: dict[str, Any] = {
        "name": "worker",
        "image": "prefect",
        "env": [{"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return [container]


def _events(core_v1: client.CoreV1Api, pod: str) -> list[Any]:
    found = core_v1.list_namespaced_event(
        "default", field_selector=f"involvedObject.name={pod},involvedObject.kind=Pod"
    )
    return list(found.items)


def test_capacity_from_worker_pods_follows_them(scene: Scene, pods: Pods) -> None:
    scene.nodes.create("wc-a", 8, labels={"pool": "wc"})
    scene.policies.create("wc", pool_spec(scene.api_url, "wc", capacityFrom="WorkerPods"))
    expect_limits(scene.limits, "gpu:wc-", {"gpu:wc-a": 0})  # no worker pod yet
    pods.create("wc-worker-1", WORKER_LABELS, containers=_worker(2), node="wc-a")
    expect_limits(scene.limits, "gpu:wc-", {"gpu:wc-a": 2})
    # Resized: extended resources cannot change in place, so a new pod replaces the old one.
    pods.delete("wc-worker-1")
    pods.create("wc-worker-2", WORKER_LABELS, containers=_worker(4), node="wc-a")
    expect_limits(scene.limits, "gpu:wc-", {"gpu:wc-a": 4})
    pods.delete("wc-worker-2")
    expect_limits(scene.limits, "gpu:wc-", {"gpu:wc-a": 0})


def test_a_gpu_pod_that_sees_fewer_gpus_than_its_limit_is_reported(
    scene: Scene, pods: Pods, core_v1: client.CoreV1Api
) -> None:
    scene.nodes.create("ws-a", 4, labels={"pool": "ws"})
    scene.nodes.create("ws-cpu", resources={}, labels={"pool": "ws"})
    scene.policies.create("ws", pool_spec(scene.api_url, "ws"))
    expect_limits(scene.limits, "gpu:ws-", {"gpu:ws-a": 4})
    pods.create("ws-short", WORKER_LABELS, containers=_worker(1), node="ws-a")
    pods.create("ws-flow-run", WORKER_LABELS, containers=_worker(0), node="ws-cpu")

    def warned() -> Any:
        events = _events(core_v1, "ws-short")
        assert len(events) == 1
        return events[0]

    event = eventually(warned, timeout=15)
    assert (event.type, event.reason) == ("Warning", "WorkerSeesFewerGPUs")
    assert "node ws-a: pod default/ws-short was given 1 GPU(s)" in event.message
    assert "gpu:ws-a counts 4" in event.message

    def condition() -> dict[str, Any]:
        found = scene.policies.condition("ws", "WorkersMatchLimits")
        assert found["status"] == "False"
        return found

    assert "pod default/ws-short was given 1 GPU(s)" in eventually(condition)["message"]
    # A CPU flow-run pod on a CPU node asks nothing of the GPUs: no NoGPULimit warning for it.
    assert _events(core_v1, "ws-flow-run") == []
    pods.delete("ws-short")
    eventually(lambda: scene.policies.condition("ws", "WorkersMatchLimits")["status"] == "True")
