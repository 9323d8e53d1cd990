"""The operator's door to Kubernetes besides kopf's watches: status patches, Secrets and
ConfigMaps, listings.

The official client is synchronous; calls run in a worker thread so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.api.policy import GROUP, KIND, PLURAL, VERSION
from prefect_gpu_operator.domain.desired import GPUNode

__all__ = [
    "IN_CLUSTER",
    "Kube",
    "KubeUnavailable",
    "NoClusterConfig",
    "SecretNotFound",
    "StatusNotWritten",
    "api_client",
    "check_reachable",
    "gpu_node",
    "load_cluster_config",
]

_T = TypeVar("_T")


PAGE_SIZE = 500
"""Objects per list request: bounded memory per page, few requests for a large cluster."""


class SecretNotFound(LookupError):
    """A Secret or ConfigMap (or its key) that a policy references does not exist."""


class StatusNotWritten(RuntimeError):
    """The API server refused or failed a policy status write (worth retrying later)."""


class NoClusterConfig(RuntimeError):
    """Neither a pod's ServiceAccount nor a usable kubeconfig: nothing to connect with."""


class KubeUnavailable(RuntimeError):
    """A Kubernetes API call failed: the server unreachable (``status`` None), or the request
    refused with an HTTP ``status``. The message is one line."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _not_readable(error: KubeUnavailable, what: str) -> Exception:
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


IN_CLUSTER = "in-cluster"


def load_cluster_config() -> str:
    """Configure the client: in a cluster the pod's ServiceAccount, outside it the kubeconfig.

    Returns ``IN_CLUSTER`` or the kubeconfig's path. Raises ``NoClusterConfig`` saying what to
    fix. Only files are read (and a kubeconfig's credential plugin run): no request is made.
    """
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return IN_CLUSTER
    except config.ConfigException:
        pass
    paths = os.environ.get("KUBECONFIG", "~/.kube/config")  # the client's own default
    if not any(Path(path).expanduser().is_file() for path in paths.split(os.pathsep) if path):
        raise NoClusterConfig(
            f"no Kubernetes configuration: not running in a cluster, and no kubeconfig at "
            f"{paths or repr(paths)} (set KUBECONFIG to a kubeconfig file)"
        )
    try:
        config.load_kube_config(config_file=paths)  # type: ignore[no-untyped-call]
    except config.ConfigException as error:
        raise NoClusterConfig(f"kubeconfig {paths} is not usable: {error}") from None
    except Exception:  # the client trips over a file that is not a kubeconfig (TypeError etc.)
        raise NoClusterConfig(f"kubeconfig {paths} is not a kubeconfig file") from None
    return paths


def api_client() -> client.ApiClient:
    """In the cluster: the pod's ServiceAccount; outside it: the kubeconfig."""
    load_cluster_config()
    return client.ApiClient()


def _unavailable(error: ApiException | urllib3.exceptions.HTTPError, host: str) -> KubeUnavailable:
    if isinstance(error, ApiException):
        try:  # the API server's Status says why, e.g. 'nodes is forbidden: User "x" cannot list'
            message = json.loads(error.body or "")["message"]
        except (TypeError, ValueError, KeyError):
            message = error.reason
        return KubeUnavailable(f"Kubernetes API at {host}: {error.status} {message}", error.status)
    reason = getattr(error, "reason", None) or error
    # The innermost cause reads best: "[Errno 111] Connection refused".
    return KubeUnavailable(
        f"cannot reach the Kubernetes API server at {host}: {reason.__cause__ or reason}"
    )


def check_reachable(*, timeout: float = 5.0) -> None:
    """One ``/version`` request with the loaded configuration. Raises ``KubeUnavailable`` if the
    API server cannot be reached; any answer, even a refusal, means it can."""
    api = client.ApiClient()
    try:
        client.VersionApi(api).get_code(_request_timeout=timeout)
    except ApiException:
        return
    except urllib3.exceptions.HTTPError as error:
        raise _unavailable(error, api.configuration.host) from None
    finally:
        api.close()  # type: ignore[no-untyped-call]


class Kube:
    """Reads nodes, Secrets and ConfigMaps, writes policy status (the runtime's ``KubeApi``)."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    async def _call(self, call: Callable[..., _T], *args: Any, **options: Any) -> _T:
        """A client call in a worker thread; its failure as one ``KubeUnavailable`` line."""
        try:
            return await asyncio.to_thread(call, *args, **options)
        except (ApiException, urllib3.exceptions.HTTPError) as error:
            raise _unavailable(error, self.api.configuration.host) from None

    async def _pages(
        self, list_call: Callable[..., Any], **options: Any
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The items of a list call, page by page, as plain JSON (the client's models of
        thousands of large objects would cost more memory than the operator keeps of them)."""
        token: str | None = None
        while True:
            paging = {"_continue": token} if token else {}
            response: Any = await self._call(
                list_call, limit=PAGE_SIZE, _preload_content=False, **options, **paging
            )  # raw: an HTTP response, not models
            page: dict[str, Any] = json.loads(response.data)
            yield page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return

    async def list_gpu_nodes(self) -> list[GPUNode]:
        """Every node, as much of it as the operator keeps."""
        nodes: list[GPUNode] = []
        async for page in self._pages(self.core.list_node):
            nodes += [gpu_node(item) for item in page]
        return nodes

    async def list_pods(self, label_selector: str) -> list[dict[str, Any]]:
        """The pods of every namespace that ``label_selector`` selects."""
        pods: list[dict[str, Any]] = []
        async for page in self._pages(
            self.core.list_pod_for_all_namespaces, label_selector=label_selector
        ):
            pods += page
        return pods

    async def list_policies(self) -> list[dict[str, Any]]:
        """Every GPULimitPolicy as the API server stores it."""
        try:
            listed: Any = await self._call(
                self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL
            )
        except KubeUnavailable as error:
            if error.status == 404:
                raise KubeUnavailable(
                    f"the {KIND} CRD is not installed "
                    "(prefect-gpu-operator crd | kubectl apply -f -)",
                    404,
                ) from None
            raise
        items: list[dict[str, Any]] = listed.get("items") or []
        return items

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded. The value is never logged or put in an error."""
        try:
            secret = await self._call(self.core.read_namespaced_secret, name, namespace)
        except KubeUnavailable as error:
            raise _not_readable(error, f"Secret {namespace}/{name}") from None
        data = secret.data or {}
        if key not in data:
            raise SecretNotFound(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode().strip()

    async def read_config_map_key(self, namespace: str, name: str, key: str) -> str:
        """One key of a ConfigMap (``data``, or ``binaryData`` decoded)."""
        try:
            config_map = await self._call(self.core.read_namespaced_config_map, name, namespace)
        except KubeUnavailable as error:
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
