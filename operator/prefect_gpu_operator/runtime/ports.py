"""What the runtime needs of Kubernetes and of Prefect, as Protocols.

The adapters (``adapters/kube.py``, ``adapters/prefect_limits.py``) implement them; the unit tests
implement them again in memory, counting calls, so the reconcile is tested without servers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from prefect_gpu_operator.adapters.prefect_limits import PrefectConnection
from prefect_gpu_operator.domain.desired import GPUNode
from prefect_gpu_operator.domain.plan import ObservedLimit
from prefect_gpu_operator.domain.pod_leases import PodLease

__all__ = ["ClusterReader", "ConnectPrefect", "KubeApi", "LimitsApi"]


class LimitsApi(Protocol):
    """Global concurrency limits on one Prefect API. Failures raise ``PrefectUnreachable``, or
    its subclass ``PrefectRateLimited`` when the API throttles the operator."""

    @property
    def api_url(self) -> str: ...

    async def list_all(self) -> dict[str, ObservedLimit]: ...

    async def read(self, name: str) -> ObservedLimit | None: ...

    async def create(self, name: str, limit: int, slot_decay_per_second: float) -> None: ...

    async def update(self, name: str, limit: int, slot_decay_per_second: float) -> None: ...

    async def delete(self, name: str) -> None: ...

    async def settings(self) -> dict[str, Any] | None: ...

    async def pod_leases(self, pod_uid: str) -> list[PodLease]: ...

    async def revoke_lease(self, lease_id: str) -> None: ...

    async def forget_lease(self, variable: str) -> None: ...

    async def close(self) -> None: ...


class ConnectPrefect(Protocol):
    """Opens a ``LimitsApi`` for an API URL and the credentials, headers and CA to use. Raises
    ``PrefectUnreachable`` for values it cannot use (a CA bundle without a certificate)."""

    def __call__(self, connection: PrefectConnection, *, timeout: float) -> LimitsApi: ...


class KubeApi(Protocol):
    """The Kubernetes calls besides kopf's watches. ``read_secret_key`` and
    ``read_config_map_key`` raise ``SecretNotFound``; ``patch_policy_status`` raises
    ``StatusNotWritten``."""

    async def list_gpu_nodes(self) -> list[GPUNode]: ...

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str: ...

    async def read_config_map_key(self, namespace: str, name: str, key: str) -> str: ...

    async def patch_policy_status(self, name: str, status: Mapping[str, Any]) -> None: ...

    async def read_peering(self, name: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


class ClusterReader(KubeApi, Protocol):
    """What a plan reads besides ``KubeApi``: every policy, and pods by label, as the API server
    stores them. Failures raise ``KubeUnavailable``."""

    async def list_policies(self) -> list[dict[str, Any]]: ...

    async def list_pods(self, label_selector: str) -> list[dict[str, Any]]: ...
