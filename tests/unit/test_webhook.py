"""Which pods get WORKER_ID and the JSONPatch that adds it, without a cluster."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from prefect_gpu_operator.settings import OperatorSettings
from prefect_gpu_operator.status import Outcome, build_status
from prefect_gpu_operator.webhook import WEBHOOK_PATH, Injection, LabelTerm
from prefect_gpu_operator.workers import WorkerPods, worker_entries

WORKER_ID_VAR = {
    "name": "WORKER_ID",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
}
DEFAULT = Injection.from_settings(OperatorSettings(namespace="ops"))


def _pod(
    labels: dict[str, str] | None = None,
    namespace: str = "default",
    containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers or [{"name": "main", "image": "prefect"}]}
    if init_containers is not None:
        spec["initContainers"] = init_containers
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": namespace, "labels": labels or {}},
        "spec": spec,
    }


def _admitted(pod: dict[str, Any], injection: Injection = DEFAULT) -> dict[str, Any]:
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, injection.patch(pod))
    return patched


WORKER = {"app.kubernetes.io/name": "prefect-worker", "app.kubernetes.io/instance": "gpu"}


@pytest.mark.parametrize(
    ("labels", "namespace", "selected"),
    [
        (WORKER, "default", True),
        ({"app.kubernetes.io/component": "worker"}, "default", True),
        ({"prefect.io/flow-run-id": "8c1f", "job-name": "x"}, "default", True),
        ({"prefectgpu.io/inject-worker-id": "true"}, "default", True),
        ({**WORKER, "prefectgpu.io/inject-worker-id": "false"}, "default", False),
        ({"app.kubernetes.io/name": "prefect-server"}, "default", False),
        ({}, "default", False),
        (WORKER, "kube-system", False),
        ({"prefectgpu.io/inject-worker-id": "true"}, "ops", False),  # the operator's own
    ],
)
def test_which_pods(labels: dict[str, str], namespace: str, selected: bool) -> None:
    assert DEFAULT.selects(_pod(labels, namespace)) is selected
    assert bool(DEFAULT.patch(_pod(labels, namespace))) is selected


def test_namespace_from_the_request_when_the_body_has_none() -> None:
    pod = _pod(WORKER)
    del pod["metadata"]["namespace"]
    assert DEFAULT.selects(pod, "kube-system") is False
    assert DEFAULT.selects(pod, "default") is True


def test_only_worker_id_is_added_to_every_container() -> None:
    pod = _pod(
        WORKER,
        containers=[
            {"name": "a", "image": "i", "env": [{"name": "X", "value": "$(WORKER_ID)-x"}]},
            {"name": "b", "image": "i"},
        ],
        init_containers=[{"name": "init", "image": "i", "env": []}],
    )
    before = copy.deepcopy(pod)
    after = _admitted(pod)
    assert pod == before  # the patch is built, not applied, by the pure function
    expected = copy.deepcopy(before)
    # First in the list, so the container's own variables can refer to $(WORKER_ID).
    expected["spec"]["containers"][0]["env"].insert(0, WORKER_ID_VAR)
    expected["spec"]["containers"][1]["env"] = [WORKER_ID_VAR]
    expected["spec"]["initContainers"][0]["env"] = [WORKER_ID_VAR]
    assert after == expected


@pytest.mark.parametrize(
    "own",
    [
        {"name": "WORKER_ID", "value": "gpu-7"},
        {"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ],
)
def test_existing_worker_id_is_kept(own: dict[str, Any]) -> None:
    pod = _pod(
        WORKER,
        containers=[{"name": "a", "image": "i", "env": [own]}, {"name": "b", "image": "i"}],
    )
    after = _admitted(pod)
    assert after["spec"]["containers"][0]["env"] == [own]
    assert after["spec"]["containers"][1]["env"] == [WORKER_ID_VAR]


def test_readmission_is_idempotent() -> None:
    once = _admitted(_pod(WORKER, init_containers=[{"name": "init", "image": "i"}]))
    assert DEFAULT.patch(once) == []


def test_extra_env_and_custom_selectors_from_settings() -> None:
    settings = OperatorSettings(
        namespace="ops",
        inject_pod_selectors=["team=ml", "gpu"],
        inject_excluded_namespaces=["batch"],
        inject_extra_env={"POD_NAME": "metadata.name", "WORKER_ID": "ignored"},
    )
    injection = Injection.from_settings(settings)
    assert injection.selectors == (LabelTerm("team", "ml"), LabelTerm("gpu"))
    assert not injection.selects(_pod(WORKER))
    assert injection.selects(_pod({"gpu": ""}))
    assert not injection.selects(_pod({"team": "ml"}, namespace="batch"))
    assert not injection.selects(_pod({"team": "ml"}, namespace="ops"))
    pod = _pod(
        {"team": "ml"},
        containers=[{"name": "a", "image": "i", "env": [{"name": "POD_NAME", "value": "mine"}]}],
    )
    env = _admitted(pod, injection)["spec"]["containers"][0]["env"]
    assert env == [WORKER_ID_VAR, {"name": "POD_NAME", "value": "mine"}]
    env = _admitted(_pod({"team": "ml"}), injection)["spec"]["containers"][0]["env"]
    assert env == [
        WORKER_ID_VAR,
        {
            "name": "POD_NAME",
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
        },
    ]


def test_patch_is_json_patch_with_explicit_paths() -> None:
    pod = _pod(WORKER, containers=[{"name": "a", "image": "i", "env": [{"name": "A"}]}])
    assert DEFAULT.patch(pod) == [
        {"op": "add", "path": "/spec/containers/0/env/0", "value": WORKER_ID_VAR}
    ]


def test_bad_selector_and_webhook_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="no key"):
        LabelTerm.parse("=x")
    with pytest.raises(ValueError, match="webhook_cert_file"):
        OperatorSettings(webhook_enabled=True)
    assert WEBHOOK_PATH == "/inject-worker-id"  # the chart's clientConfig.service.path


def _scheduled(uid: str, node: str | None, labels: dict[str, str] = WORKER) -> dict[str, Any]:
    pod = _admitted(_pod(labels))
    pod["metadata"]["uid"] = uid
    if node:
        pod["spec"]["nodeName"] = node
    return pod


def test_worker_pods_track_nodes_and_warn_once() -> None:
    pods = WorkerPods(DEFAULT)
    assert not pods.observe(_scheduled("u1", None))  # pending: no node yet
    assert pods.first_sighting(_scheduled("u1", None)) is None
    assert pods.observe(_scheduled("u1", "gpu-1"))
    assert pods.first_sighting(_scheduled("u1", "gpu-1")) == "gpu-1"
    assert pods.first_sighting(_scheduled("u1", "gpu-1")) is None  # warned once
    assert not pods.observe(_scheduled("u2", "gpu-1"))  # same node set
    unselected = _pod({})
    unselected["metadata"]["uid"], unselected["spec"]["nodeName"] = "u3", "cpu-1"
    assert not pods.observe(unselected)
    no_worker_id = _pod({"app.kubernetes.io/name": "prefect-worker"})
    no_worker_id["metadata"]["uid"], no_worker_id["spec"]["nodeName"] = "u4", "cpu-1"
    assert not pods.observe(no_worker_id)  # admitted while the webhook was down
    assert pods.nodes() == {"gpu-1"}
    assert not pods.observe(_scheduled("u1", "gpu-1"), deleted=True)
    assert pods.observe(_scheduled("u2", "gpu-1"), deleted=True)
    assert pods.nodes() == frozenset()


def test_worker_entries_in_status() -> None:
    limits = [{"name": "gpu:gpu-1", "node": "gpu-1", "limit": 4}]
    assert worker_entries({"gpu-1", "cpu-1"}, limits) == [
        {"node": "cpu-1"},
        {"node": "gpu-1", "limit": "gpu:gpu-1"},
    ]
    status = build_status(
        Outcome(1, prefect_error="down", workers=frozenset({"gpu-1"})), {"limits": limits}, "now"
    )
    assert status["workers"] == [{"node": "gpu-1", "limit": "gpu:gpu-1"}]
