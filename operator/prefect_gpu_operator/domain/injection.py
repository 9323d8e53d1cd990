"""The JSONPatch that gives a pod ``WORKER_ID``: a pure function of the pod.

``WORKER_ID`` is the node name, but a pod is not scheduled yet when it is admitted, so the value
is a Downward API reference (``fieldRef: spec.nodeName``) that the kubelet resolves at start.
``PREFECT_GPU_POD_UID`` (``metadata.uid``) comes with it: gpu_slot() publishes its leases under
it, so that the operator can revoke them when the pod dies (``domain/pod_leases``).
Which pods reach the webhook is the MutatingWebhookConfiguration's business (its objectSelectors,
rendered from the chart's ``webhook.podSelectors``): the one place pods are selected. Here only
the opt-out label and the excluded namespaces are honoured again, and a pod that already has the
variables is left as it is. Every pod that ends up with ``WORKER_ID`` is labelled
``WORKER_LABEL``, so the operator's pod watch can ask the API server for these pods only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONTAINER_KINDS",
    "OPT_LABEL",
    "POD_UID",
    "WEBHOOK_ID",
    "WEBHOOK_PATH",
    "WORKER_ID",
    "WORKER_LABEL",
    "Injection",
    "defines_worker_id",
    "env_names",
]

WEBHOOK_ID = "inject-worker-id"
# kopf routes POST /<handler id> to the handler: the webhook configuration's path must be this.
WEBHOOK_PATH = f"/{WEBHOOK_ID}"
WORKER_ID = "WORKER_ID"
POD_UID = "PREFECT_GPU_POD_UID"
OPT_LABEL = "prefectgpu.io/inject-worker-id"
WORKER_LABEL = "prefectgpu.io/has-worker-id"
"""Marks a pod whose containers know their node through WORKER_ID (value "true")."""
# Ephemeral containers are added through a subresource, never on CREATE: nothing to inject there.
CONTAINER_KINDS = ("initContainers", "containers")

JsonPatch = list[dict[str, Any]]


def env_names(container: Mapping[str, Any]) -> set[str]:
    return {str(var.get("name")) for var in container.get("env") or ()}


def _containers(pod: Mapping[str, Any]) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
    spec = pod.get("spec") or {}
    for kind in CONTAINER_KINDS:
        for index, container in enumerate(spec.get(kind) or ()):
            yield kind, index, container


def defines_worker_id(pod: Mapping[str, Any]) -> bool:
    """Whether a container of the pod has ``WORKER_ID`` (injected or its own)."""
    return any(WORKER_ID in env_names(container) for _, _, container in _containers(pod))


@dataclass(frozen=True)
class Injection:
    """Which Downward API variables a pod gets (``WORKER_ID`` first, then
    ``PREFECT_GPU_POD_UID``), and where never."""

    excluded_namespaces: frozenset[str]
    extra_env: tuple[tuple[str, str], ...] = ()  # (name, fieldPath) besides the two

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        builtin = ((WORKER_ID, "spec.nodeName"), (POD_UID, "metadata.uid"))
        extra = tuple(
            (name, path) for name, path in self.extra_env if name not in (WORKER_ID, POD_UID)
        )
        return (*builtin, *extra)

    def allows(self, pod: Mapping[str, Any], namespace: str | None = None) -> bool:
        """False for a pod that opted out or lives in an excluded namespace.

        ``namespace`` is the admission request's, for a body that does not carry its own.
        """
        metadata = pod.get("metadata") or {}
        if (metadata.get("namespace") or namespace) in self.excluded_namespaces:
            return False
        labels: Mapping[str, str] = metadata.get("labels") or {}
        return labels.get(OPT_LABEL) != "false"

    def patch(self, pod: Mapping[str, Any], namespace: str | None = None) -> JsonPatch:
        """RFC 6902 operations adding the missing variables; empty when nothing is to be done.

        A container's own definition (literal or valueFrom) always wins. The variables go to the
        front of ``env`` so the container's own variables can refer to ``$(WORKER_ID)``:
        Kubernetes expands only references to variables defined earlier in the list.
        """
        if not self.allows(pod, namespace):
            return []
        ops: JsonPatch = []
        for kind, index, container in _containers(pod):
            defined = env_names(container)
            missing = [_env_var(name, path) for name, path in self.env if name not in defined]
            if not missing:
                continue
            env_path = f"/spec/{kind}/{index}/env"
            if "env" not in container or container["env"] is None:
                ops.append({"op": "add", "path": env_path, "value": missing})
            else:
                ops.extend(
                    {"op": "add", "path": f"{env_path}/{position}", "value": var}
                    for position, var in enumerate(missing)
                )
        if ops or defines_worker_id(pod):
            ops += _label(pod)
        return ops


def _label(pod: Mapping[str, Any]) -> JsonPatch:
    labels = (pod.get("metadata") or {}).get("labels")
    if labels is None:
        return [{"op": "add", "path": "/metadata/labels", "value": {WORKER_LABEL: "true"}}]
    if labels.get(WORKER_LABEL) == "true":
        return []
    key = WORKER_LABEL.replace("~", "~0").replace("/", "~1")  # a JSON Pointer token
    return [{"op": "add", "path": f"/metadata/labels/{key}", "value": "true"}]


def _env_var(name: str, field_path: str) -> dict[str, Any]:
    # apiVersion is what the API server would default: the stored pod shows exactly this.
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}
