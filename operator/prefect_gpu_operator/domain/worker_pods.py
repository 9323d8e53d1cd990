"""Where Prefect pods run: nodes of pods that carry ``WORKER_ID``, and which of them lack a limit.

Fed by a read-only pod watch. A Prefect pod is one with ``WORKER_ID`` in a container (the webhook
injected it, or the pod sets it itself); it counts once it is scheduled (``spec.nodeName`` set).
GPU tasks in it acquire ``gpu:<WORKER_ID>``, so a pod on a node without a limit is worth a warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect_gpu_operator.api.policy import LimitEntry, WorkerNode
from prefect_gpu_operator.domain.injection import defines_worker_id

__all__ = ["WorkerPods", "worker_entries"]


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


def worker_entries(nodes: Iterable[str], ledger: Iterable[LimitEntry]) -> tuple[WorkerNode, ...]:
    """Status ``workers``: each node running Prefect pods, with the policy's limit for it if any."""
    limit_of = {entry.node: entry.name for entry in ledger}
    return tuple(WorkerNode(node=node, limit=limit_of.get(node)) for node in sorted(nodes))
