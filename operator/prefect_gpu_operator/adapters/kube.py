"""The operator's door to Kubernetes besides kopf's watches: status patches, Secrets and
ConfigMaps, node lists.

The official client is synchronous; calls run in a worker thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.api.policy import GROUP, PLURAL, VERSION
from prefect_gpu_operator.domain.desired import GPUNode

__all__ = [
    "Kube",
    "SecretNotFound",
    "StatusNotWritten",
    "api_client",
    "gpu_node",
]


NODE_PAGE_SIZE = 500
"""Nodes per list request: bounded memory per page, few requests for a large cluster."""


class SecretNotFound(LookupError):
    """A Secret or ConfigMap (or its key) that a policy references does not exist."""


class StatusNotWritten(RuntimeError):
    """The API server refused or failed a policy status write (worth retrying later)."""


def _not_readable(error: ApiException, what: str) -> Exception:
    """A policy's reference that cannot be read, as the policy's problem (reported in its
    status) when it is missing or forbidden; anything else is the API server's."""
    if error.status == 404:
        return SecretNotFound(f"{what} not found")
    if error.status == 403:
        return SecretNotFound(f"{what} cannot be read: forbidden (RBAC)")
    return error


def gpu_node(body: Mapping[str, Any]) -> GPUNode:
    """What matters of a Node: name, labels, and its extended resources (GPUs are among them).

    Heartbeats, conditions, cpu/memory and images are dropped, so an update that changes only
    those compares equal and triggers nothing. Label keys and values are interned: GPU nodes carry
    dozens of identical feature-discovery labels, kept once instead of once per node.
    """
    metadata = body.get("metadata") or {}
    allocatable = (body.get("status") or {}).get("allocatable") or {}
    labels = metadata.get("labels") or {}
    return GPUNode(
        name=metadata["name"],
        labels={sys.intern(key): sys.intern(str(value)) for key, value in labels.items()},
        allocatable={
            sys.intern(key): str(value) for key, value in allocatable.items() if "/" in key
        },
    )


def api_client() -> client.ApiClient:
    """In the cluster: the pod's ServiceAccount; outside it: the kubeconfig."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


class Kube:
    """Reads nodes, Secrets and ConfigMaps, writes policy status (the runtime's ``KubeApi``)."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    async def list_gpu_nodes(self) -> list[GPUNode]:
        """Every node, listed in pages as plain JSON (the client's models of thousands of large
        nodes would cost more memory than the operator keeps of them)."""
        nodes: list[GPUNode] = []
        token: str | None = None
        while True:
            page = await asyncio.to_thread(self._node_page, token)
            nodes += [gpu_node(item) for item in page.get("items") or ()]
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return nodes

    def _node_page(self, token: str | None) -> dict[str, Any]:
        options: dict[str, Any] = {"limit": NODE_PAGE_SIZE, "_preload_content": False}
        if token:
            options["_continue"] = token
        response: Any = self.core.list_node(**options)  # raw: an HTTP response, not models
        page: dict[str, Any] = json.loads(response.data)
        return page

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded. The value is never logged or put in an error."""
        try:
            secret = await asyncio.to_thread(self.core.read_namespaced_secret, name, namespace)
        except ApiException as error:
            raise _not_readable(error, f"Secret {namespace}/{name}") from None
        data = secret.data or {}
        if key not in data:
            raise SecretNotFound(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode().strip()

    async def read_config_map_key(self, namespace: str, name: str, key: str) -> str:
        """One key of a ConfigMap (``data``, or ``binaryData`` decoded)."""
        try:
            config_map = await asyncio.to_thread(
                self.core.read_namespaced_config_map, name, namespace
            )
        except ApiException as error:
            raise _not_readable(error, f"ConfigMap {namespace}/{name}") from None
        data, binary = config_map.data or {}, config_map.binary_data or {}
        if key in data:
            return str(data[key]).strip()
        if key in binary:
            return base64.b64decode(binary[key]).decode().strip()
        raise SecretNotFound(f"ConfigMap {namespace}/{name} has no key {key!r}")

    async def patch_policy_status(self, name: str, status: Mapping[str, Any]) -> None:
        try:
            await asyncio.to_thread(
                self.custom.patch_cluster_custom_object_status,
                GROUP,
                VERSION,
                PLURAL,
                name,
                {"status": dict(status)},
            )
        except ApiException as error:
            raise StatusNotWritten(f"{error.status} {error.reason}") from None

    async def read_peering(self, name: str) -> dict[str, Any]:
        """The kopf peering object (cluster-scoped) with every replica's keepalive."""
        peering = await asyncio.to_thread(
            self.custom.get_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", name
        )
        return dict(cast(dict[str, Any], peering))

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]
