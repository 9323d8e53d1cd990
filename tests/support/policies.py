"""GPULimitPolicies for tests: specs, and a factory that deletes what it created."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from prefect_gpu_operator.api.policy import GROUP, KIND, PLURAL, VERSION, GPULimitPolicyStatus
from prefect_gpu_sandbox.waiting import eventually

__all__ = ["Policies", "ledger", "pool_spec"]


def ledger(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A status's ledger with every entry named, as the operator reads it (on the wire, names
    that follow ``limitNameTemplate`` are left out)."""
    entries = GPULimitPolicyStatus.model_validate(status).limits
    return [entry.model_dump(by_alias=True, exclude_none=True) for entry in entries]


def pool_spec(api_url: str, pool: str, **extra: Any) -> dict[str, Any]:
    """A policy spec for the nodes labelled ``pool=<pool>``, writing to ``api_url``."""
    return {
        "server": {"remoteApiUrl": api_url},
        "nodeSelector": {"matchLabels": {"pool": pool}},
        **extra,
    }


class Policies:
    """Create, read and delete GPULimitPolicies; deletes what it created."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.created: list[str] = []

    def create(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name},
            "spec": dict(spec),
        }
        created: dict[str, Any] = self.custom.create_cluster_custom_object(
            GROUP, VERSION, PLURAL, body
        )
        self.created.append(name)
        return created

    def get(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        return found

    def patch_spec(self, name: str, spec: Mapping[str, Any]) -> None:
        self.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": dict(spec)})

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        for condition in self.status(name).get("conditions") or []:
            if condition["type"] == kind:
                return dict(condition)
        raise AssertionError(f"{name} has no {kind} condition yet")

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def delete(self, name: str, *, wait: float = 30.0) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        except ApiException as error:
            if error.status != 404:
                raise
        eventually(lambda: not self.exists(name), timeout=wait, what=f"deletion of {name}")
        if name in self.created:
            self.created.remove(name)

    def events(self, name: str) -> list[str]:
        """Reasons of the Events on the policy, oldest first."""
        found = self.core.list_event_for_all_namespaces(
            field_selector=f"involvedObject.name={name},involvedObject.kind=GPULimitPolicy"
        )
        return [event.reason or "" for event in found.items]

    def event_messages(self, name: str) -> dict[str, list[str]]:
        """Messages of the Events on the policy, by reason."""
        found = self.core.list_event_for_all_namespaces(
            field_selector=f"involvedObject.name={name},involvedObject.kind=GPULimitPolicy"
        )
        messages: dict[str, list[str]] = {}
        for event in found.items:
            messages.setdefault(event.reason or "", []).append(event.message or "")
        return messages

    def delete_all(self) -> None:
        for name in list(self.created):
            self.delete(name)
