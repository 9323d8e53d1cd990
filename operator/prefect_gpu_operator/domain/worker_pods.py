"""Where Prefect pods run: nodes of pods that carry ``WORKER_ID``, and which of them lack a limit.

Fed by a read-only pod watch. A Prefect pod is one with ``WORKER_ID`` in a container (the webhook
injected it, or the pod sets it itself); it counts once it is scheduled (``spec.nodeName`` set).
GPU tasks in it acquire ``gpu:<WORKER_ID>``, so a pod on a node without a limit is worth a warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect_gpu_operator.domain.injection import defines_worker_id

__all__ = ["WorkerPods", "no_limit_message", "worker_entries"]


@dataclass
class WorkerPods:
    """The scheduled Prefect pods, by uid → node, and the pods already warned about."""

    nodes_by_pod: dict[str, str] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def observe(self, pod: Mapping[str, Any], deleted: bool = False) -> bool:
        """Record a pod event; True when the set of nodes running Prefect pods changed."""
        metadata = pod.get("metadata") or {}
        uid = str(metadata.get("uid") or f"{metadata.get('namespace')}/{metadata.get('name')}")
        node = (pod.get("spec") or {}).get("nodeName")
        before = self.nodes()
        if deleted or not node or not defines_worker_id(pod):
            self.nodes_by_pod.pop(uid, None)
            if deleted:
                self.warned.discard(uid)
        else:
            self.nodes_by_pod[uid] = str(node)
        return self.nodes() != before

    def nodes(self) -> frozenset[str]:
        return frozenset(self.nodes_by_pod.values())

    def first_sighting(self, pod: Mapping[str, Any]) -> str | None:
        """The node of a scheduled Prefect pod not warned about yet (then marked), else None."""
        uid = str((pod.get("metadata") or {}).get("uid"))
        node = self.nodes_by_pod.get(uid)
        if node is None or uid in self.warned:
            return None
        self.warned.add(uid)
        return node


def worker_entries(
    nodes: Iterable[str], limits: Iterable[Mapping[str, Any]]
) -> list[dict[str, str]]:
    """Status ``workers``: each node running Prefect pods, with the policy's limit for it if any."""
    limit_of = {str(entry["node"]): str(entry["name"]) for entry in limits}
    return [
        {"node": node, **({"limit": limit_of[node]} if node in limit_of else {})}
        for node in sorted(nodes)
    ]


def no_limit_message(node: str) -> str:
    return (
        f"node {node} has no GPU concurrency limit: no GPULimitPolicy selects it with a GPU "
        f"resource it has, so GPU tasks in this pod (which acquire the limit for "
        f"WORKER_ID={node}) will fail. Schedule the pod on a GPU node a policy selects, or "
        f"widen a policy's nodeSelector/resources."
    )
