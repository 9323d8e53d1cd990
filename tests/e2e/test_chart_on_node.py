"""The chart on a real node: ``helm install`` with the image built from the repository's
Dockerfile, in a namespace whose real admission enforces restricted Pod Security; the operator's
two replicas become Ready through their own probes, and a GPULimitPolicy turns what the node's
fake GPU device plugin advertises into the ``gpu:<node>`` limit on the node's Prefect server."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_sandbox.image_builder import build_image
from prefect_gpu_sandbox.images import IMAGES
from prefect_gpu_sandbox.node import NodeCluster
from prefect_gpu_sandbox.paths import CHART
from prefect_gpu_sandbox.tools import tools_bin
from prefect_gpu_sandbox.waiting import eventually
from tests.e2e.conftest import FAKE_GPUS
from tests.support.kubectl import kubectl_exec
from tests.support.operator import PrefectLimitsReader
from tests.support.policies import Policies, pool_spec

pytestmark = pytest.mark.e2e

_RELEASE = "gpu-operator"
_POOL = "e2e"


def _helm(node: NodeCluster, *args: str) -> str:
    helm = [str(tools_bin() / "helm"), f"--kubeconfig={node.kubeconfig}", *args]
    done = subprocess.run(helm, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def operator_image(node: NodeCluster) -> str:
    """The operator image built offline from the Dockerfile, in the node's containerd."""
    built = build_image(IMAGES["operator"])
    node.import_image(built.archive)
    return built.reference


@pytest.fixture(scope="module")
def release(
    node: NodeCluster, node_core_v1: client.CoreV1Api, operator_image: str
) -> Iterator[str]:
    """The chart installed into a restricted namespace; its namespace."""
    namespace = f"gpu-operator-{uuid.uuid4().hex[:6]}"
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    metadata = client.V1ObjectMeta(name=namespace, labels=labels)
    node_core_v1.create_namespace(client.V1Namespace(metadata=metadata))
    repository, tag = operator_image.rsplit(":", 1)
    values = [
        f"operator.image.repository={repository}",
        f"operator.image.tag={tag}",
        "operator.image.pullPolicy=Never",  # no registry: the imported image or nothing
    ]
    _helm(node, "install", _RELEASE, str(CHART), f"--namespace={namespace}",
          *(f"--set={value}" for value in values))  # fmt: skip
    try:
        yield namespace
    finally:
        _helm(node, "uninstall", _RELEASE, f"--namespace={namespace}", "--wait")
        node_core_v1.delete_namespace(namespace)


def _operator_deployment(apps: client.AppsV1Api, namespace: str) -> client.V1Deployment:
    deployments = apps.list_namespaced_deployment(namespace).items
    assert len(deployments) == 1, [d.metadata.name for d in deployments]
    return deployments[0]


def _wait_ready(apps: client.AppsV1Api, namespace: str) -> None:
    def ready() -> None:
        status = _operator_deployment(apps, namespace).status
        assert status.ready_replicas == 2, status

    eventually(ready, timeout=240, what="the operator's 2 replicas Ready")


def test_operator_replicas_become_ready_through_their_probes(
    node_apps_v1: client.AppsV1Api, node_core_v1: client.CoreV1Api, release: str
) -> None:
    _wait_ready(node_apps_v1, release)
    pods = node_core_v1.list_namespaced_pod(release).items
    containers = [c for pod in pods for c in pod.spec.containers]
    assert len(containers) == 2
    assert all(c.readiness_probe and c.liveness_probe for c in containers)
    # The restricted profile admitted them: each runs as non-root with no privilege escalation.
    for container in containers:
        context = container.security_context
        assert context.run_as_non_root or pods[0].spec.security_context.run_as_non_root
        assert context.allow_privilege_escalation is False


def test_restricted_admission_rejects_a_privileged_pod(
    node_core_v1: client.CoreV1Api, release: str, busybox_image: str
) -> None:
    # The namespace's label is enforced by the API server's real admission, not just declared.
    container = {"name": "bad", "image": busybox_image, "securityContext": {"privileged": True}}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
            "spec": {"containers": [container]}}  # fmt: skip
    with pytest.raises(client.exceptions.ApiException) as rejected:
        node_core_v1.create_namespaced_pod(release, body)
    assert rejected.value.status == 403
    assert "restricted" in str(rejected.value.body)


@pytest.fixture
def policy(node: NodeCluster, node_core_v1: client.CoreV1Api, release: str) -> Iterator[str]:
    """A GPULimitPolicy for the node, writing to the node's Prefect server as pods reach it."""
    node_core_v1.patch_node(node.node_name, {"metadata": {"labels": {"pool": _POOL}}})
    policies = Policies(node.api)
    policies.create("e2e", pool_spec(node.pod_prefect_api_url, _POOL))
    try:
        yield "e2e"
    finally:
        policies.delete_all()


def test_node_limit_follows_the_device_plugin(node: NodeCluster, release: str, policy: str) -> None:
    limits = PrefectLimitsReader(node.prefect_api_url)  # through the relay, from this machine
    name = f"gpu:{node.node_name}"

    def limit_is(count: int) -> None:
        assert limits.limits("gpu:").get(name) == count, limits.limits("gpu:")

    eventually(lambda: limit_is(FAKE_GPUS), timeout=120, what=f"{name} = {FAKE_GPUS}")
    try:
        node.set_fake_gpus(FAKE_GPUS + 1)
        eventually(lambda: limit_is(FAKE_GPUS + 1), timeout=120, what=f"{name} follows")
    finally:
        node.set_fake_gpus(FAKE_GPUS)
        eventually(lambda: node.allocatable_gpus() == FAKE_GPUS, timeout=60, what="restored")


def _opted_in_deployment(image: str) -> dict[str, Any]:
    """A Deployment whose pods opt in to WORKER_ID injection and set no WORKER_ID themselves."""
    labels = {"app": "opted-in", "prefectgpu.io/inject-worker-id": "true"}
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", 'trap "exit 0" TERM; sleep inf & wait'],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "opted-in"},
        "spec": {
            "selector": {"matchLabels": {"app": "opted-in"}},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def test_webhook_gives_a_deployments_pod_its_node_as_worker_id(
    node: NodeCluster,
    node_apps_v1: client.AppsV1Api,
    node_core_v1: client.CoreV1Api,
    node_namespace: str,
    release: str,
    busybox_image: str,
) -> None:
    _wait_ready(node_apps_v1, release)  # the webhook is served by the operator's pods
    node_apps_v1.create_namespaced_deployment(node_namespace, _opted_in_deployment(busybox_image))
    try:

        def running() -> client.V1Pod:
            selector = "app=opted-in"
            pods = node_core_v1.list_namespaced_pod(node_namespace, label_selector=selector).items
            assert [pod.status.phase for pod in pods] == ["Running"], [p.status for p in pods]
            return pods[0]

        pod = eventually(running, timeout=120, what="the opted-in pod Running")
        assert kubectl_exec(node, pod, 'echo "$WORKER_ID"').strip() == node.node_name
    finally:
        node_apps_v1.delete_namespaced_deployment("opted-in", node_namespace)


def _active_replica(node: NodeCluster, release: str) -> str:
    """The pod kopf's peering makes active: the live peer of the highest priority."""
    peering = client.CustomObjectsApi(node.api).get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", _peering_name(node, release)
    )
    peers: dict[str, Any] = peering.get("status") or {}
    pods = {p.metadata.name for p in client.CoreV1Api(node.api).list_namespaced_pod(release).items}
    # A peer's id is "<POD_NAME>/<pid>/<random>" (kopf's identity from POD_NAME).
    alive = {peer.split("/")[0]: info for peer, info in peers.items()}
    alive = {pod: info for pod, info in alive.items() if pod in pods}
    assert len(alive) == 2, peers
    return max(alive, key=lambda pod: int(alive[pod]["priority"]))


def _peering_name(node: NodeCluster, release: str) -> str:
    deployment = _operator_deployment(client.AppsV1Api(node.api), release)
    env = deployment.spec.template.spec.containers[0].env
    return next(str(var.value) for var in env if var.name == "PREFECT_GPU_OPERATOR_PEERING")


def _admitted_with_worker_id(core: client.CoreV1Api, namespace: str, image: str) -> None:
    """The webhook admits an opted-in pod now and injects WORKER_ID (a server-side dry run goes
    through admission, webhooks included, and stores nothing); raises if it does not."""
    pod = _opted_in_deployment(image)["spec"]["template"]
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {**pod["metadata"], "name": "dry"},
            "spec": pod["spec"]}  # fmt: skip
    created = core.create_namespaced_pod(namespace, body, dry_run="All")
    names = [var.name for var in created.spec.containers[0].env or []]
    # Not an AssertionError: `eventually` would retry it, and no admission may miss.
    if "WORKER_ID" not in names:
        raise RuntimeError(f"admitted without WORKER_ID: {created.spec.containers[0].env}")


def test_standby_takes_over_and_reconciles_a_change_made_meanwhile(
    node: NodeCluster,
    node_apps_v1: client.AppsV1Api,
    node_core_v1: client.CoreV1Api,
    node_namespace: str,
    release: str,
    policy: str,
    busybox_image: str,
) -> None:
    _wait_ready(node_apps_v1, release)
    limits = PrefectLimitsReader(node.prefect_api_url)
    name = f"gpu:{node.node_name}"
    eventually(lambda: limits.limits("gpu:").get(name) == FAKE_GPUS, timeout=120, what=name)
    active = eventually(lambda: _active_replica(node, release), timeout=60, what="peers")
    standby = next(
        p.metadata.name for p in node_core_v1.list_namespaced_pod(release).items
        if p.metadata.name != active
    )  # fmt: skip
    try:
        node_core_v1.delete_namespaced_pod(active, release)
        node.set_fake_gpus(FAKE_GPUS + 1)  # while no replica may be active

        def followed() -> None:
            _admitted_with_worker_id(node_core_v1, node_namespace, busybox_image)
            assert limits.limits("gpu:").get(name) == FAKE_GPUS + 1

        eventually(followed, timeout=120, interval=1.0, what=f"{name} after the takeover")
        remaining = {p.metadata.name for p in node_core_v1.list_namespaced_pod(release).items}
        assert active not in remaining
        assert standby in remaining  # the change was reconciled by the replica that stayed
    finally:
        node.set_fake_gpus(FAKE_GPUS)
        eventually(lambda: node.allocatable_gpus() == FAKE_GPUS, timeout=60, what="restored")
