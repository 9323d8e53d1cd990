"""Where Prefect pods run, what GPUs they request, and which of them deserve a warning.

Fed by a read-only pod watch that the API server filters to pods labelled ``WORKER_LABEL`` (the
webhook labels every pod it gives ``WORKER_ID``; a pod that sets ``WORKER_ID`` itself, like the
chart's GPU worker, carries the label in its template). A Prefect pod counts once it is
scheduled (``spec.nodeName``) and until it has finished. GPU tasks in it acquire
``gpu:<WORKER_ID>``, so a GPU pod on a node without a limit, or one that sees fewer GPUs than its
node's limit counts, is worth a warning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect_gpu_operator.api.policy import LimitEntry, WorkerNode
from prefect_gpu_operator.domain.injection import defines_worker_id
from prefect_gpu_operator.domain.quantities import QuantityError, parse_quantity

__all__ = ["WorkerPod", "WorkerPods", "worker_entries", "worker_pod"]

_FINISHED = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class WorkerPod:
    """A scheduled Prefect pod: where it runs and the extended resources it was given."""

    uid: str
    namespace: str
    name: str
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus: Mapping[str, int] = field(default_factory=dict)  # extended resource -> devices

    @property
    def reference(self) -> str:
        return f"{self.namespace}/{self.name}"

    def gpus_of(self, resources: Iterable[str]) -> int:
        return sum(self.gpus.get(resource, 0) for resource in resources)


def _granted(pod: Mapping[str, Any]) -> dict[str, int]:
    """Devices per extended resource over the pod's containers (an extended resource's request
    equals its limit, and either may be written)."""
    granted: dict[str, int] = {}
    for container in (pod.get("spec") or {}).get("containers") or ():
        resources = container.get("resources") or {}
        amounts = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
        for name, amount in amounts.items():
            if "/" not in name:
                continue  # cpu, memory, ...: not a device
            try:
                granted[name] = granted.get(name, 0) + parse_quantity(str(amount))
            except QuantityError:
                continue  # the API server would not have admitted it; nothing to count
    return granted


def worker_pod(pod: Mapping[str, Any]) -> WorkerPod | None:
    """The pod as a Prefect worker pod, or None if it is not one (yet, or any more)."""
    metadata = pod.get("metadata") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    phase = (pod.get("status") or {}).get("phase")
    if not node or phase in _FINISHED or not defines_worker_id(pod):
        return None
    return WorkerPod(
        uid=str(metadata.get("uid") or f"{metadata.get('namespace')}/{metadata.get('name')}"),
        namespace=str(metadata.get("namespace") or ""),
        name=str(metadata.get("name") or ""),
        node=str(node),
        labels=dict(metadata.get("labels") or {}),
        gpus=_granted(pod),
    )


@dataclass
class WorkerPods:
    """The scheduled Prefect pods by uid, and the pods already warned about."""

    pods: dict[str, WorkerPod] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def observe(self, body: Mapping[str, Any], deleted: bool = False) -> bool:
        """Record a pod event; True when a Prefect pod appeared, changed or went."""
        uid = str((body.get("metadata") or {}).get("uid"))
        pod = None if deleted else worker_pod(body)
        before = self.pods.pop(uid, None)
        if pod is not None:
            self.pods[pod.uid] = pod
        if deleted:
            self.warned.discard(uid)
        return pod != before

    def nodes(self) -> frozenset[str]:
        return frozenset(pod.node for pod in self.pods.values())

    def on(self, node: str) -> list[WorkerPod]:
        return [pod for pod in self.pods.values() if pod.node == node]

    def first_sighting(self, uid: str) -> WorkerPod | None:
        """The pod if it was not warned about yet (then it is marked), else None."""
        pod = self.pods.get(uid)
        if pod is None or uid in self.warned:
            return None
        self.warned.add(uid)
        return pod


def worker_entries(nodes: Iterable[str], ledger: Iterable[LimitEntry]) -> tuple[WorkerNode, ...]:
    """Status ``workers``: each node running Prefect pods, with the policy's limit for it if any."""
    limit_of = {entry.node: entry.name for entry in ledger}
    return tuple(WorkerNode(node=node, limit=limit_of.get(node)) for node in sorted(nodes))
