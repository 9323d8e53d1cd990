"""The WORKER_ID webhook through the real admission path: kube-apiserver → kopf → JSONPatch.

The operator subprocess serves the webhook on 127.0.0.1 with a certificate made here; the
MutatingWebhookConfiguration is registered with the API server like the chart's (URL instead of
Service). Pods are created through the API; no kubelet runs, so "scheduled" means spec.nodeName.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess
from tests.support.policies import Policies, pool_spec
from tests.support.webhook import POD_UID_VAR, WORKER_ID_VAR, Pods, WebhookEndpoint, worker_ids

pytestmark = pytest.mark.integration

WORKER = {"app.kubernetes.io/name": "prefect-worker", "app.kubernetes.io/component": "worker"}
FLOW_RUN = {"prefect.io/flow-run-id": "0e5d6c1b", "prefect.io/flow-run-name": "gentle-otter"}
OPT_IN = {"prefectgpu.io/inject-worker-id": "true"}
OPT_OUT = {**WORKER, "prefectgpu.io/inject-worker-id": "false"}
_probes = itertools.count()


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> WebhookEndpoint:
    return WebhookEndpoint(tmp_path_factory.mktemp("webhook"))


@pytest.fixture(scope="module")
def webhook_operator(
    crd: Path,
    kubeconfig: Path,
    operator_namespace: str,
    endpoint: WebhookEndpoint,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        kubeconfig,
        tmp_path_factory.mktemp("operator") / "operator.log",
        namespace=operator_namespace,
        extra_env=endpoint.operator_env(),
    )
    process.start()
    try:
        process.process.wait_ready(endpoint.serving, timeout=30)
        yield process
    finally:
        process.stop()


@pytest.fixture
def pods(kube_api: client.ApiClient) -> Iterator[Pods]:
    created = Pods(kube_api)
    yield created
    created.delete_all()


@pytest.fixture(scope="module")
def webhook(
    kube_api: client.ApiClient,
    webhook_operator: OperatorProcess,
    endpoint: WebhookEndpoint,
    operator_namespace: str,
) -> Iterator[WebhookEndpoint]:
    """The MWC registered and in effect (the API server picks it up asynchronously)."""
    endpoint.register(kube_api, operator_namespace)
    probes = Pods(kube_api)
    try:

        def active() -> None:
            pod = probes.create(f"probe-{next(_probes)}", OPT_IN)
            assert worker_ids(pod)["main"] == [WORKER_ID_VAR]

        eventually(active, timeout=20, interval=0.5)
        yield endpoint
    finally:
        probes.delete_all()
        endpoint.unregister(kube_api)


def test_worker_flow_run_and_opted_in_pods_get_worker_id(
    webhook: WebhookEndpoint, pods: Pods
) -> None:
    for name, labels in (("worker", WORKER), ("flow-run", FLOW_RUN), ("opted-in", OPT_IN)):
        pod = pods.create(name, labels)
        assert worker_ids(pod) == {"main": [WORKER_ID_VAR]}, name


def test_other_pods_are_left_alone(webhook: WebhookEndpoint, pods: Pods) -> None:
    assert worker_ids(pods.create("opted-out", OPT_OUT)) == {"main": []}
    assert worker_ids(pods.create("plain", {"app": "nginx"})) == {"main": []}
    airflow = {"app.kubernetes.io/name": "airflow", "app.kubernetes.io/component": "worker"}
    assert worker_ids(pods.create("airflow-worker", airflow)) == {"main": []}
    assert worker_ids(pods.create("system", WORKER, namespace="kube-system")) == {"main": []}


def test_nothing_but_worker_id_and_the_pod_uid_change(webhook: WebhookEndpoint, pods: Pods) -> None:
    containers = [
        {"name": "a", "image": "i", "env": [{"name": "GREETING", "value": "on $(WORKER_ID)"}]},
        {"name": "b", "image": "i", "env": [{"name": "WORKER_ID", "value": "pinned"}]},
        {"name": "c", "image": "i"},
    ]
    init = [
        {"name": "init-a", "image": "i"},
        {
            "name": "init-b",
            "image": "i",
            "env": [
                {
                    "name": "WORKER_ID",
                    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
                }
            ],
        },
    ]
    mutated = pods.create("many", WORKER, containers=containers, init_containers=init)
    # The same pod, opted out: what the API server alone makes of it (defaults and all).
    twin = pods.create("many-twin", OPT_OUT, containers=containers, init_containers=init)
    assert worker_ids(mutated) == {
        "init-a": [WORKER_ID_VAR],
        "init-b": [init[1]["env"][0]],
        "a": [WORKER_ID_VAR],
        "b": [{"name": "WORKER_ID", "value": "pinned"}],
        "c": [WORKER_ID_VAR],
    }
    assert mutated["spec"]["containers"][0]["env"][0] == WORKER_ID_VAR  # $(WORKER_ID) resolves
    expected = copy.deepcopy(twin["spec"])
    for kind in ("initContainers", "containers"):
        for container in expected[kind]:
            if container["name"] in ("init-a", "a", "c"):
                container["env"] = [WORKER_ID_VAR, POD_UID_VAR, *container.get("env", [])]
            else:  # its own WORKER_ID stays; the pod's uid comes all the same
                container["env"] = [POD_UID_VAR, *container.get("env", [])]
    assert mutated["spec"] == expected
    labels = dict(twin["metadata"]["labels"])
    del labels["prefectgpu.io/inject-worker-id"]
    # The one label the webhook adds: the operator's pod watch asks for these pods only.
    assert mutated["metadata"]["labels"] == {**labels, "prefectgpu.io/has-worker-id": "true"}
    assert set(mutated["metadata"]) == set(twin["metadata"])  # no annotation or finalizer added


def test_injection_is_counted(webhook: WebhookEndpoint, webhook_operator: OperatorProcess) -> None:
    name = "prefect_gpu_operator_webhook_admissions_total"
    assert webhook_operator.metric(name, result="injected") >= 1
    assert webhook_operator.metric(name, result="error") == 0
    assert webhook_operator.metric("prefect_gpu_operator_webhook_admission_seconds_count") >= 1


def _events(core_v1: client.CoreV1Api, pod: str) -> list[Any]:
    found = core_v1.list_namespaced_event(
        "default", field_selector=f"involvedObject.name={pod},involvedObject.kind=Pod"
    )
    return list(found.items)


def test_worker_nodes_in_status_and_a_warning_without_limit(
    webhook: WebhookEndpoint,
    pods: Pods,
    policies: Policies,
    gpu_nodes: NodeFactory,
    core_v1: client.CoreV1Api,
    prefect_api_url: str,
) -> None:
    gpu_nodes.create("w1-gpu", 2, labels={"pool": "w1"})
    gpu_nodes.create("w1-cpu", resources={}, labels={"pool": "w1"})
    policies.create(
        "w1",
        pool_spec(prefect_api_url, "w1"),
    )
    eventually(lambda: _assert_equal(policies.status("w1").get("nodes"), 1))
    pods.create("w1-on-gpu", WORKER, node="w1-gpu")
    gpu_pod = [
        {"name": "main", "image": "prefect", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    ]
    pods.create("w1-on-cpu", WORKER, containers=gpu_pod, node="w1-cpu")  # wants a GPU there
    pods.create("w1-cpu-flow-run", FLOW_RUN, node="w1-cpu")  # CPU work: nothing to warn about
    pods.create("w1-pending", FLOW_RUN)  # not scheduled: not on any node yet
    pods.create("w1-other", {"app": "nginx"}, node="w1-cpu")  # not a Prefect pod

    eventually(
        lambda: _assert_equal(
            policies.status("w1").get("workers"),
            [{"node": "w1-cpu"}, {"node": "w1-gpu", "limit": "gpu:w1-gpu"}],
        )
    )

    def warned() -> Any:
        events = _events(core_v1, "w1-on-cpu")
        assert [e.reason for e in events] == ["NoGPULimit"]
        return events[0]

    event = eventually(warned)
    assert event.type == "Warning"
    assert "w1-cpu has no GPU concurrency limit" in event.message
    assert "will fail" in event.message
    assert _events(core_v1, "w1-on-gpu") == []
    assert _events(core_v1, "w1-cpu-flow-run") == []
    assert _events(core_v1, "w1-other") == []
    pod = core_v1.read_namespaced_pod("w1-on-gpu", "default")
    assert not pod.metadata.finalizers
    assert not [k for k in pod.metadata.annotations or {} if "kopf" in k or "prefectgpu" in k]

    pods.delete_all()
    eventually(lambda: _assert_equal(policies.status("w1").get("workers"), []))


def _assert_equal(left: object, right: object) -> None:
    assert left == right


def test_the_charts_custom_pod_selector_is_the_only_selector(
    kube_api: client.ApiClient, webhook: WebhookEndpoint, operator_namespace: str, pods: Pods
) -> None:
    """webhook.podSelectors reaches the API server (objectSelector) and nothing re-filters it:
    a pod that only a custom selector matches gets WORKER_ID."""
    name = "prefect-gpu-operator-custom-selector"
    values = {"webhook": {"podSelectors": [{"matchLabels": {"team": "ml"}}]}}
    (entry,) = webhook.configuration(operator_namespace, values, name=name)["webhooks"]
    assert entry["objectSelector"]["matchLabels"] == {"team": "ml"}
    assert worker_ids(pods.create("team-ml-before", {"team": "ml"})) == {"main": []}
    webhook.register(kube_api, operator_namespace, values, name=name)
    try:

        def injected() -> None:
            pod = pods.create(f"team-ml-{len(pods.created)}", {"team": "ml"})
            assert worker_ids(pod) == {"main": [WORKER_ID_VAR]}

        eventually(injected, timeout=20, interval=0.5)
    finally:
        webhook.unregister(kube_api, name=name)


def test_pods_are_created_while_the_operator_is_down(
    webhook: WebhookEndpoint, webhook_operator: OperatorProcess, pods: Pods
) -> None:
    """Last in the module: with failurePolicy Ignore a dead webhook costs WORKER_ID, not the pod."""
    webhook_operator.stop()
    started = time.monotonic()
    pod = pods.create("while-down", WORKER)
    assert time.monotonic() - started < 5  # connection refused is immediate, not a timeout
    assert worker_ids(pod) == {"main": []}
