"""Pods for the WORKER_ID webhook against a real kube-apiserver: created through the API (as
plain dicts), their WORKER_ID definitions, and the settings of an operator that makes its own
certificate. The webhook endpoint itself is the sandbox's (``prefect_gpu_sandbox.webhook``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_sandbox.webhook import WebhookEndpoint

__all__ = [
    "POD_UID_VAR",
    "WORKER_ID_VAR",
    "Pods",
    "WebhookEndpoint",
    "made_tls_files",
    "worker_ids",
]

WORKER_ID_VAR = {
    "name": "WORKER_ID",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
}
POD_UID_VAR = {
    "name": "PREFECT_GPU_POD_UID",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.uid"}},
}


def made_tls_files(directory: Path) -> dict[str, str]:
    """Operator settings: write the certificate it makes (webhook_tls_secret) under ``directory``,
    instead of reading an endpoint's own files."""
    return {
        "PREFECT_GPU_OPERATOR_WEBHOOK_CERT_FILE": str(directory / "tls" / "tls.crt"),
        "PREFECT_GPU_OPERATOR_WEBHOOK_KEY_FILE": str(directory / "tls" / "tls.key"),
    }


def worker_ids(pod: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each container's (init containers first) WORKER_ID definitions, by container name."""
    spec = pod["spec"]
    return {
        container["name"]: [var for var in container.get("env") or [] if var["name"] == "WORKER_ID"]
        for container in [*(spec.get("initContainers") or []), *spec["containers"]]
    }


class Pods:
    """Creates pods through the API (as plain dicts) and deletes them at the end."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.created: list[tuple[str, str]] = []

    def create(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        *,
        namespace: str = "default",
        containers: Sequence[Mapping[str, Any]] = ({"name": "main", "image": "prefect"},),
        init_containers: Sequence[Mapping[str, Any]] = (),
        node: str | None = None,
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {"containers": [dict(c) for c in containers]}
        if init_containers:
            spec["initContainers"] = [dict(c) for c in init_containers]
        if node:
            spec["nodeName"] = node  # "scheduled": no scheduler runs here
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": spec,
        }
        created = self.core.create_namespaced_pod(namespace, body)
        self.created.append((namespace, name))
        pod: dict[str, Any] = self.api.sanitize_for_serialization(created)
        return pod

    def delete(self, name: str, namespace: str = "default") -> None:
        self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        self.created.remove((namespace, name))

    def delete_all(self) -> None:
        for namespace, name in self.created:
            try:
                self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
            except ApiException as error:
                if error.status != 404:
                    raise
        self.created.clear()
