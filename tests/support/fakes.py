"""In-memory stand-ins for the runtime's ports (``prefect_gpu_operator.runtime.ports``).

They keep just enough state to answer like the real servers do, count every call, and write each
one into a shared ``Journal`` so a test can assert the order of Kubernetes and Prefect calls.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from prefect_gpu_operator.adapters.kube import SecretNotFound, StatusNotWritten, gpu_node
from prefect_gpu_operator.adapters.prefect_limits import (
    PrefectConnection,
    PrefectRateLimited,
    PrefectUnreachable,
)
from prefect_gpu_operator.domain.desired import GPUNode
from prefect_gpu_operator.domain.plan import ObservedLimit
from prefect_gpu_operator.domain.pod_leases import LEASE_VARIABLE_PREFIX, PodLease, pod_leases
from tests.support.policies import ledger

__all__ = ["FakeKube", "FakePrefect", "Journal"]


class Journal(list[str]):
    """Every call made through the fakes, in order: ``"prefect create gpu:a"``,
    ``"status p limits=gpu:a"``."""


class FakePrefect:
    """One Prefect API's global concurrency limits. ``down`` makes every call fail the way an
    unreachable server does; from call number ``throttled_from`` on, every call is refused
    with a 429; ``calls`` counts calls by operation. With ``latency`` each write takes that
    long (so concurrent writes overlap; ``max_in_flight`` is the most seen at once), and a write
    to a name in ``failing`` fails like an outage."""

    def __init__(self, journal: Journal, api_url: str = "http://prefect.test/api") -> None:
        self.api_url = api_url
        self.journal = journal
        self.limits: dict[str, ObservedLimit] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.down = False
        self.throttled_from: int | None = None
        self.connections: list[PrefectConnection] = []  # every connection opened
        self.latency = 0.0
        self.failing: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.reported_settings: dict[str, Any] | None = None
        self.leases: dict[str, str] = {}  # lease id -> limit name
        self.variables: dict[str, Any] = {}  # name -> value, as gpu_slot() publishes leases

    def connect(self, connection: PrefectConnection, *, timeout: float) -> FakePrefect:
        """The runtime's ``ConnectPrefect``: every connection reaches this one server."""
        assert connection.api_url == self.api_url
        self.connections.append(connection)
        return self

    def writes(self) -> int:
        return self.calls["create"] + self.calls["update"] + self.calls["delete"]

    def _call(self, operation: str, name: str = "") -> None:
        self.calls[operation] += 1
        self.journal.append(f"prefect {operation} {name}".rstrip())
        if self.down:
            raise PrefectUnreachable(f"{operation} on {self.api_url}: ConnectError")
        if self.throttled_from is not None and self.calls.total() >= self.throttled_from:
            raise PrefectRateLimited(f"{operation} on {self.api_url}: HTTP 429", 1.0)

    async def _write(self, operation: str, name: str) -> None:
        self._call(operation, name)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if name in self.failing:
            raise PrefectUnreachable(f"{operation} {name} on {self.api_url}: ReadTimeout")

    async def settings(self) -> dict[str, Any] | None:
        """What the server reports of itself (``reported_settings``: None reports nothing)."""
        self._call("settings")
        return self.reported_settings

    async def list_all(self) -> dict[str, ObservedLimit]:
        self._call("list")
        return dict(self.limits)

    async def read(self, name: str) -> ObservedLimit | None:
        self._call("read", name)
        return self.limits.get(name)

    async def create(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        await self._write("create", name)
        self.limits[name] = ObservedLimit(name, limit, True, slot_decay_per_second)

    async def update(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        await self._write("update", name)
        before = self.limits.get(name) or ObservedLimit(name, limit)
        self.limits[name] = replace(
            before, limit=limit, slot_decay_per_second=slot_decay_per_second
        )

    def hold(self, name: str, slots: int) -> None:
        """Holders now keep ``slots`` of the limit (what flow runs' leases would do)."""
        self.limits[name] = replace(self.limits[name], active_slots=slots)

    async def delete(self, name: str) -> None:
        await self._write("delete", name)
        self.limits.pop(name, None)

    def lease(self, name: str, pod_uid: str, slot: int) -> str:
        """A holder in pod ``pod_uid`` takes a slot of ``name`` and publishes its lease."""
        lease_id = str(uuid.uuid4())
        self.leases[lease_id] = name
        before = self.limits[name]
        self.limits[name] = replace(before, active_slots=before.active_slots + 1)
        variable = f"{LEASE_VARIABLE_PREFIX}{pod_uid}_{slot}"
        self.variables[variable] = {"lease_id": lease_id, "limit": name}
        return lease_id

    async def pod_leases(self, pod_uid: str) -> list[PodLease]:
        self._call("pod-leases", pod_uid)
        found = [{"name": name, "value": value} for name, value in self.variables.items()]
        return pod_leases(pod_uid, found)

    async def revoke_lease(self, lease_id: str) -> None:
        await self._write("revoke-lease", lease_id)
        name = self.leases.pop(lease_id, None)  # an unknown lease is a no-op, as on the server
        if name is not None and name in self.limits:
            before = self.limits[name]
            self.limits[name] = replace(before, active_slots=max(0, before.active_slots - 1))

    async def forget_lease(self, variable: str) -> None:
        await self._write("forget-lease", variable)
        self.variables.pop(variable, None)

    async def close(self) -> None:
        pass


class FakeKube:
    """Nodes to list, Secrets and ConfigMaps to read, and the policy status patches the API
    server received. ``refuse_status`` makes status writes fail (as a 5xx or a conflict would);
    while ``status_gate`` is set but not yet open, status writes wait in flight (a slow API)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.nodes: dict[str, dict[str, Any]] = {}  # Node objects by name, as the API has them
        self.secrets: dict[tuple[str, str, str], str] = {}  # (namespace, name, key) -> value
        self.config_maps: dict[tuple[str, str, str], str] = {}  # (namespace, name, key) -> value
        self.patches: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.secret_reads = 0
        self.config_map_reads = 0
        self.refuse_status = False
        self.status_gate: asyncio.Event | None = None
        self.while_listing: Callable[[], object] | None = None  # a watch event mid-listing
        self.peering: dict[str, Any] = {}  # the ClusterKopfPeering object

    def status(self, policy: str) -> dict[str, Any]:
        """The policy's status as the API server would store it after every merge patch."""
        merged: dict[str, Any] = {}
        for patch in self.patches[policy]:
            merged.update(patch)
        return merged

    async def list_gpu_nodes(self) -> list[GPUNode]:
        self.journal.append("kube list nodes")
        listed = [gpu_node(body) for body in self.nodes.values()]
        if self.while_listing is not None:
            self.while_listing()  # happens after the snapshot was taken, before it arrives
        return listed

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        self.secret_reads += 1
        try:
            return self.secrets[namespace, name, key]
        except KeyError:
            raise SecretNotFound(f"Secret {namespace}/{name} not found") from None

    async def read_config_map_key(self, namespace: str, name: str, key: str) -> str:
        self.config_map_reads += 1
        try:
            return self.config_maps[namespace, name, key]
        except KeyError:
            raise SecretNotFound(f"ConfigMap {namespace}/{name} not found") from None

    async def patch_policy_status(self, name: str, status: Mapping[str, Any]) -> None:
        limits = ",".join(entry["name"] for entry in ledger(status))
        self.journal.append(f"status {name} limits={limits}")
        if self.status_gate is not None:
            await self.status_gate.wait()
        if self.refuse_status:
            raise StatusNotWritten("500 Internal Server Error")
        self.patches[name].append(dict(status))

    async def read_peering(self, name: str) -> dict[str, Any]:
        self.journal.append(f"kube read peering {name}")
        return dict(self.peering)

    def close(self) -> None:
        pass
