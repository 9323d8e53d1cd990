"""The chart on a real node: ``helm install`` with the image built from the repository's
Dockerfile, in a namespace whose real admission enforces restricted Pod Security; the operator's
two replicas become Ready through their own probes, and a GPULimitPolicy turns what the node's
fake GPU device plugin advertises into the ``gpu:<node>`` limit on the node's Prefect server.
The webhook is reached through its Service with each offline TLS source (helm, then operator,
the last test, by ``helm upgrade``). The chart's GPU worker running flow runs is
``test_demo_cluster``'s."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_sandbox.node import NodeCluster
from prefect_gpu_sandbox.on_node import (
    Release,
    image_values,
    kubectl_exec,
    load_images,
    opted_in_deployment,
    restricted_namespace,
    running_pod,
)
from prefect_gpu_sandbox.waiting import eventually
from tests.e2e.conftest import FAKE_GPUS
from tests.support.operator import PrefectLimitsReader
from tests.support.policies import Policies, pool_spec

pytestmark = pytest.mark.e2e

_POOL = "e2e"


@pytest.fixture(scope="module")
def release(node: NodeCluster, node_core_v1: client.CoreV1Api) -> Iterator[Release]:
    """The chart installed into a restricted namespace, with the operator image built offline
    from the Dockerfile and loaded into the node's containerd."""
    images = load_images(node, ("operator",))
    namespace = f"gpu-operator-{uuid.uuid4().hex[:6]}"
    restricted_namespace(node_core_v1, namespace)
    installed = Release(node, namespace)
    installed.install({"operator": {"image": image_values(images["operator"])}})
    try:
        yield installed
    finally:
        installed.uninstall()
        node_core_v1.delete_namespace(namespace)


def test_operator_replicas_become_ready_through_their_probes(
    node_core_v1: client.CoreV1Api, release: Release
) -> None:
    release.wait_operator_ready()
    pods = node_core_v1.list_namespaced_pod(release.namespace).items
    containers = [c for pod in pods for c in pod.spec.containers]
    assert len(containers) == 2
    assert all(c.readiness_probe and c.liveness_probe for c in containers)
    # The restricted profile admitted them: each runs as non-root with no privilege escalation.
    for container in containers:
        context = container.security_context
        assert context.run_as_non_root or pods[0].spec.security_context.run_as_non_root
        assert context.allow_privilege_escalation is False


def test_restricted_admission_rejects_a_privileged_pod(
    node_core_v1: client.CoreV1Api, release: Release, busybox_image: str
) -> None:
    # The namespace's label is enforced by the API server's real admission, not just declared.
    container = {"name": "bad", "image": busybox_image, "securityContext": {"privileged": True}}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"},
            "spec": {"containers": [container]}}  # fmt: skip
    with pytest.raises(client.exceptions.ApiException) as rejected:
        node_core_v1.create_namespaced_pod(release.namespace, body)
    assert rejected.value.status == 403
    assert "restricted" in str(rejected.value.body)


@pytest.fixture
def policy(node: NodeCluster, node_core_v1: client.CoreV1Api, release: Release) -> Iterator[str]:
    """A GPULimitPolicy for the node, writing to the node's Prefect server as pods reach it."""
    node_core_v1.patch_node(node.node_name, {"metadata": {"labels": {"pool": _POOL}}})
    policies = Policies(node.api)
    policies.create("e2e", pool_spec(node.pod_prefect_api_url, _POOL))
    try:
        yield "e2e"
    finally:
        policies.delete_all()


def test_node_limit_follows_the_device_plugin(
    node: NodeCluster, release: Release, policy: str
) -> None:
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


def test_webhook_gives_a_deployments_pod_its_node_as_worker_id(
    node: NodeCluster,
    node_apps_v1: client.AppsV1Api,
    node_core_v1: client.CoreV1Api,
    node_namespace: str,
    release: Release,
    busybox_image: str,
) -> None:
    release.wait_operator_ready()  # the webhook is served by the operator's pods
    node_apps_v1.create_namespaced_deployment(node_namespace, opted_in_deployment(busybox_image))
    try:
        pod = running_pod(node_core_v1, node_namespace, "app=opted-in")
        assert kubectl_exec(node, pod, 'echo "$WORKER_ID"').strip() == node.node_name
    finally:
        node_apps_v1.delete_namespaced_deployment("opted-in", node_namespace)


def _peers(node: NodeCluster, release: Release) -> dict[str, dict[str, Any]]:
    """kopf's live peers by pod name (a peer's id is "<POD_NAME>/<pid>/<random>")."""
    peering = client.CustomObjectsApi(node.api).get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", _peering_name(release)
    )
    peers: dict[str, Any] = peering.get("status") or {}
    pods = {p.metadata.name for p in client.CoreV1Api(node.api).list_namespaced_pod(
        release.namespace).items}  # fmt: skip
    by_pod = {peer.split("/")[0]: info for peer, info in peers.items()}
    return {pod: info for pod, info in by_pod.items() if pod in pods}


def _active_replica(node: NodeCluster, release: Release) -> str:
    """The pod kopf's peering makes active: the live peer of the highest priority."""
    alive = _peers(node, release)
    assert len(alive) == 2, alive
    return max(alive, key=lambda pod: int(alive[pod]["priority"]))


def _peering_name(release: Release) -> str:
    env = release.operator_deployment().spec.template.spec.containers[0].env
    return next(str(var.value) for var in env if var.name == "PREFECT_GPU_OPERATOR_PEERING")


def _pod_names(core: client.CoreV1Api, namespace: str) -> set[str]:
    return {pod.metadata.name for pod in core.list_namespaced_pod(namespace).items}


def _admitted_with_worker_id(core: client.CoreV1Api, namespace: str, image: str) -> None:
    """The webhook admits an opted-in pod now and injects WORKER_ID (a server-side dry run goes
    through admission, webhooks included, and stores nothing); raises if it does not."""
    pod = opted_in_deployment(image)["spec"]["template"]
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {**pod["metadata"], "name": "dry"},
            "spec": pod["spec"]}  # fmt: skip
    created = core.create_namespaced_pod(namespace, body, dry_run="All")
    names = [var.name for var in created.spec.containers[0].env or []]
    # Not an AssertionError: `eventually` would retry it, and no admission may miss.
    if "WORKER_ID" not in names:
        raise RuntimeError(f"admitted without WORKER_ID: {created.spec.containers[0].env}")


@dataclass
class _Admissions:
    made: int = 0
    missed: list[str] = field(default_factory=list)  # without WORKER_ID, or failed


@contextlib.contextmanager
def _admitting_throughout(
    core: client.CoreV1Api, namespace: str, image: str
) -> Iterator[_Admissions]:
    """Dry-run admissions, one after another, for as long as the block runs."""
    admissions = _Admissions()
    done = threading.Event()

    def admit() -> None:
        while not done.wait(0.2):
            try:
                _admitted_with_worker_id(core, namespace, image)
            except Exception as error:
                admissions.missed.append(f"{time.strftime('%H:%M:%S')} {error}")
            admissions.made += 1

    prober = threading.Thread(target=admit, name="admissions", daemon=True)
    prober.start()
    try:
        yield admissions
    finally:
        done.set()
        prober.join(timeout=30)


_RESUMED = "Resuming operations after the pause"  # kopf's peering, as a paused replica resumes


def test_standby_takes_over_and_reconciles_a_change_made_meanwhile(
    node: NodeCluster,
    node_core_v1: client.CoreV1Api,
    node_namespace: str,
    release: Release,
    policy: str,
    busybox_image: str,
) -> None:
    release.wait_operator_ready()
    limits = PrefectLimitsReader(node.prefect_api_url)
    name = f"gpu:{node.node_name}"
    eventually(lambda: limits.limits("gpu:").get(name) == FAKE_GPUS, timeout=120, what=name)
    active = eventually(lambda: _active_replica(node, release), timeout=60, what="peers")
    standby = next(
        p.metadata.name for p in node_core_v1.list_namespaced_pod(release.namespace).items
        if p.metadata.name != active
    )  # fmt: skip

    def standby_log() -> str:
        return str(node_core_v1.read_namespaced_pod_log(standby, release.namespace))

    resumed = standby_log().count(_RESUMED)  # paused now (it resumed before only if the active
    # replica restarted meanwhile, e.g. a liveness restart on a loaded machine)
    try:
        # Admissions go on while the active replica stops, each with WORKER_ID.
        with _admitting_throughout(node_core_v1, node_namespace, busybox_image) as admissions:
            node_core_v1.delete_namespaced_pod(active, release.namespace)
            node.set_fake_gpus(FAKE_GPUS + 1)  # while no replica may be active
            eventually(
                lambda: limits.limits("gpu:").get(name) == FAKE_GPUS + 1,
                timeout=120,
                what=f"{name} after the takeover",
            )
            eventually(
                lambda: active not in _pod_names(node_core_v1, release.namespace),
                timeout=120,
                what=f"{active} gone",
            )
        assert admissions.missed == [], admissions
        assert admissions.made >= 10, admissions  # it ran through the takeover
        # The replica that stayed took over: kopf resumed it once the active one was gone.
        assert standby_log().count(_RESUMED) > resumed
    finally:
        node.set_fake_gpus(FAKE_GPUS)
        eventually(lambda: node.allocatable_gpus() == FAKE_GPUS, timeout=60, what="restored")


def test_webhook_with_the_certificate_the_operator_makes(
    node_core_v1: client.CoreV1Api, node_namespace: str, release: Release, busybox_image: str
) -> None:
    # Last in the module: it switches the release to the TLS source manifests/ use.
    release.upgrade({"webhook": {"tls": {"source": "operator"}}})

    def rolled_out() -> None:
        deployment = release.operator_deployment()
        status = deployment.status
        assert status.observed_generation == deployment.metadata.generation, status
        assert status.updated_replicas == status.ready_replicas == status.replicas == 2, status

    eventually(rolled_out, timeout=240, what="the operator rolled out with tls.source=operator")
    env = release.operator_deployment().spec.template.spec.containers[0].env
    values = {var.name: var.value for var in env}
    secret = node_core_v1.read_namespaced_secret(
        values["PREFECT_GPU_OPERATOR_WEBHOOK_TLS_SECRET"], release.namespace
    )
    assert secret.metadata.name.endswith("-webhook-tls-operator")  # the operator's, not helm's
    ca = base64.b64decode(secret.data["ca.crt"])
    admission = client.AdmissionregistrationV1Api(node_core_v1.api_client)
    name = values["PREFECT_GPU_OPERATOR_WEBHOOK_CONFIGURATION"]

    def injected() -> None:
        webhooks = admission.read_mutating_webhook_configuration(name).webhooks
        assert all(base64.b64decode(w.client_config.ca_bundle or "") == ca for w in webhooks)

    eventually(injected, timeout=60, what="the operator's CA in the webhook configuration")

    def admitted() -> None:
        # The API server's webhook view may lag the injection a moment: retried, as a miss.
        try:
            _admitted_with_worker_id(node_core_v1, node_namespace, busybox_image)
        except RuntimeError as missed:
            raise AssertionError(str(missed)) from missed

    eventually(admitted, timeout=60, what="admission through the operator's certificate")
