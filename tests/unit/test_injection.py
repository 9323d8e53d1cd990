"""The JSONPatch that adds WORKER_ID, the pods it spares, and where Prefect pods run."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from prefect_gpu_operator.domain.injection import Injection
from prefect_gpu_operator.domain.worker_pods import WorkerPods

WORKER_ID_VAR = {
    "name": "WORKER_ID",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
}
POD_UID_VAR = {
    "name": "PREFECT_GPU_POD_UID",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}},
}
DEFAULT = Injection(excluded_namespaces=frozenset({"kube-system", "ops"}))


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
    ("labels", "namespace", "changed"),
    [
        # Which pods reach the webhook is the configuration's objectSelectors' choice: whatever
        # it sends is changed, custom selectors included, unless the pod opted out ...
        (WORKER, "default", True),
        ({"team": "ml"}, "default", True),
        ({}, "default", True),
        ({"prefectgpu.io/inject-worker-id": "true"}, "default", True),
        ({**WORKER, "prefectgpu.io/inject-worker-id": "false"}, "default", False),
        # ... or lives in an excluded namespace, the operator's own among them.
        (WORKER, "kube-system", False),
        ({"prefectgpu.io/inject-worker-id": "true"}, "ops", False),
    ],
)
def test_which_pods_are_changed(labels: dict[str, str], namespace: str, changed: bool) -> None:
    assert DEFAULT.allows(_pod(labels, namespace)) is changed
    assert bool(DEFAULT.patch(_pod(labels, namespace))) is changed


def test_namespace_from_the_request_when_the_body_has_none() -> None:
    pod = _pod(WORKER)
    del pod["metadata"]["namespace"]
    assert DEFAULT.allows(pod, "kube-system") is False
    assert DEFAULT.allows(pod, "default") is True


def test_only_worker_id_and_the_pod_uid_are_added_to_every_container() -> None:
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
    expected["spec"]["containers"][0]["env"][:0] = [WORKER_ID_VAR, POD_UID_VAR]
    expected["spec"]["containers"][1]["env"] = [WORKER_ID_VAR, POD_UID_VAR]
    expected["spec"]["initContainers"][0]["env"] = [WORKER_ID_VAR, POD_UID_VAR]
    expected["metadata"]["labels"]["prefectgpu.io/has-worker-id"] = "true"  # for the pod watch
    assert after == expected


def test_a_pod_with_its_own_variables_is_labelled_and_nothing_else() -> None:
    own = {"name": "WORKER_ID", "value": "gpu-7"}
    uid = {"name": "PREFECT_GPU_POD_UID", "value": "u"}
    pod = _pod(WORKER, containers=[{"name": "a", "image": "i", "env": [own, uid]}])
    assert DEFAULT.patch(pod) == [
        {"op": "add", "path": "/metadata/labels/prefectgpu.io~1has-worker-id", "value": "true"}
    ]
    unlabelled = copy.deepcopy(pod)
    del unlabelled["metadata"]["labels"]
    assert DEFAULT.patch(unlabelled) == [
        {"op": "add", "path": "/metadata/labels", "value": {"prefectgpu.io/has-worker-id": "true"}}
    ]


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
    assert after["spec"]["containers"][0]["env"] == [POD_UID_VAR, own]  # the added go first
    assert after["spec"]["containers"][1]["env"] == [WORKER_ID_VAR, POD_UID_VAR]


def test_readmission_is_idempotent() -> None:
    once = _admitted(_pod(WORKER, init_containers=[{"name": "init", "image": "i"}]))
    assert DEFAULT.patch(once) == []


def test_extra_env_is_added_like_worker_id_but_never_replaces_it() -> None:
    injection = Injection(
        excluded_namespaces=frozenset(),
        extra_env=(
            ("POD_NAME", "metadata.name"),
            ("WORKER_ID", "ignored"),
            ("PREFECT_GPU_POD_UID", "ignored"),
        ),
    )
    pod = _pod(
        {"team": "ml"},
        containers=[{"name": "a", "image": "i", "env": [{"name": "POD_NAME", "value": "mine"}]}],
    )
    env = _admitted(pod, injection)["spec"]["containers"][0]["env"]
    assert env == [WORKER_ID_VAR, POD_UID_VAR, {"name": "POD_NAME", "value": "mine"}]
    env = _admitted(_pod({"team": "ml"}), injection)["spec"]["containers"][0]["env"]
    assert env == [
        WORKER_ID_VAR,
        POD_UID_VAR,
        {
            "name": "POD_NAME",
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
        },
    ]


def test_patch_is_json_patch_with_explicit_paths() -> None:
    pod = _pod(WORKER, containers=[{"name": "a", "image": "i", "env": [{"name": "A"}]}])
    assert DEFAULT.patch(pod) == [
        {"op": "add", "path": "/spec/containers/0/env/0", "value": WORKER_ID_VAR},
        {"op": "add", "path": "/spec/containers/0/env/1", "value": POD_UID_VAR},
        {"op": "add", "path": "/metadata/labels/prefectgpu.io~1has-worker-id", "value": "true"},
    ]


def _scheduled(uid: str, node: str | None, labels: dict[str, str] = WORKER) -> dict[str, Any]:
    pod = _admitted(_pod(labels))
    pod["metadata"]["uid"] = uid
    if node:
        pod["spec"]["nodeName"] = node
    return pod


def test_worker_pods_track_nodes_and_warn_once() -> None:
    pods = WorkerPods()
    assert not pods.observe(_scheduled("u1", None))  # pending: no node yet
    assert pods.first_sighting("u1") is None
    assert pods.observe(_scheduled("u1", "gpu-1"))
    sighted = pods.first_sighting("u1")
    assert sighted is not None
    assert (sighted.node, sighted.reference) == ("gpu-1", "default/p")
    assert pods.first_sighting("u1") is None  # warned once
    assert pods.observe(_scheduled("u2", "gpu-1"))
    assert pods.nodes() == {"gpu-1"}
    own = _pod({}, containers=[{"name": "a", "image": "i", "env": [{"name": "WORKER_ID"}]}])
    own["metadata"]["uid"], own["spec"]["nodeName"] = "u3", "cpu-1"
    assert pods.observe(own)  # sets WORKER_ID itself: a Prefect pod all the same
    assert pods.observe(own, deleted=True)
    no_worker_id = _pod({"app.kubernetes.io/name": "prefect-worker"})
    no_worker_id["metadata"]["uid"], no_worker_id["spec"]["nodeName"] = "u4", "cpu-1"
    assert not pods.observe(no_worker_id)  # admitted while the webhook was down
    assert pods.observe(_scheduled("u1", "gpu-1"), deleted=True)
    finished = _scheduled("u2", "gpu-1")
    finished["status"] = {"phase": "Succeeded"}
    assert pods.observe(finished)  # a finished flow-run pod no longer runs anything
    assert pods.nodes() == frozenset()


def test_worker_pods_count_the_devices_their_containers_were_given() -> None:
    pod = _scheduled("u1", "gpu-1")
    pod["spec"]["containers"] = [
        {"name": "a", "resources": {"limits": {"nvidia.com/gpu": "2", "cpu": "4"}}},
        {"name": "b", "resources": {"requests": {"nvidia.com/gpu": 1, "amd.com/gpu": "1"}}},
        {"name": "c", "env": [{"name": "WORKER_ID"}]},
    ]
    pods = WorkerPods()
    assert pods.observe(pod)
    (worker,) = pods.on("gpu-1")
    assert worker.gpus == {"nvidia.com/gpu": 3, "amd.com/gpu": 1}
    assert worker.gpus_of(["nvidia.com/gpu"]) == 3
    pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "4"
    assert pods.observe(pod)  # resized (a new pod of the same name is a new uid, too)
    assert pods.on("gpu-1")[0].gpus_of(["nvidia.com/gpu"]) == 5
