"""Simulated GPU nodes: created through the API with status, changed via /status."""

from __future__ import annotations

from collections.abc import Mapping

from kubernetes import client
from kubernetes.client.exceptions import ApiException

__all__ = ["NodeFactory", "gpu_node_body"]

_BASE_RESOURCES = {"cpu": "8", "memory": "32Gi", "pods": "110"}


def gpu_node_body(
    name: str,
    resources: Mapping[str, int | str],
    labels: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """A Node manifest whose capacity and allocatable carry ``resources`` (e.g. nvidia.com/gpu)."""
    quantities = {**_BASE_RESOURCES, **{key: str(value) for key, value in resources.items()}}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        # No kubelet runs: keep the scheduler and anything else off these nodes.
        "spec": {"taints": [{"key": "prefectgpu.io/simulated", "effect": "NoSchedule"}]},
        # The API server accepts status on create, and only through /status afterwards.
        "status": {"capacity": quantities, "allocatable": dict(quantities)},
    }


class NodeFactory:
    """Creates GPU nodes for one test and deletes them afterwards."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core
        self.created: list[str] = []

    def create(
        self,
        name: str,
        gpus: int = 4,
        *,
        resources: Mapping[str, int | str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> client.V1Node:
        wanted = dict(resources) if resources is not None else {"nvidia.com/gpu": gpus}
        body = gpu_node_body(name, wanted, labels)  # a plain dict, which the client sends as it is
        node: client.V1Node = self.core.create_node(body)  # type: ignore[arg-type]
        self.created.append(name)
        return node

    def set_allocatable(self, name: str, resources: Mapping[str, int | str]) -> client.V1Node:
        """Change allocatable (and capacity) through the status subresource, as a kubelet would."""
        quantities = {key: str(value) for key, value in resources.items()}
        body = {"status": {"allocatable": quantities, "capacity": quantities}}
        node: client.V1Node = self.core.patch_node_status(name, body)
        return node

    def set_gpus(self, name: str, gpus: int) -> client.V1Node:
        return self.set_allocatable(name, {"nvidia.com/gpu": gpus})

    def delete(self, name: str) -> None:
        try:
            self.core.delete_node(name)
        except ApiException as error:
            if error.status != 404:
                raise
        if name in self.created:
            self.created.remove(name)

    def delete_all(self) -> None:
        for name in list(self.created):
            self.delete(name)
