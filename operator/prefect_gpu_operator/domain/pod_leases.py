"""The Prefect leases a pod's processes hold, and when a pod is gone for good: pure readings.

Prefect 3.9 lets a lease name only a run as its holder (``type`` flow_run/task_run/deployment
and ``id``), and no endpoint lists a limit's leases. So ``gpu_slot()`` publishes the lease of each
slot a pod uses as a Prefect variable ``prefect-gpu-lease_<pod uid>_<slot>`` whose value is
``{"lease_id": ..., "limit": ...}`` (``prefect_gpu_flows._gcl.register``). A slot's variable is
rewritten whenever the slot takes a new lease, so it may name a lease already released: revoking
that is a no-op on the server.

A pod whose containers have all stopped (deleted, or phase Succeeded/Failed) holds nothing any
more: its leases are revoked at once instead of being left to expire.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["LEASE_VARIABLE_PREFIX", "DeadPod", "PodLease", "dead_pod", "pod_leases", "prefix_of"]

LEASE_VARIABLE_PREFIX = "prefect-gpu-lease_"
"""The same prefix as ``prefect_gpu_flows._gcl.LEASE_VARIABLE_PREFIX``."""
_FINISHED = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class DeadPod:
    """A scheduled pod none of whose processes can hold a slot any more."""

    uid: str
    node: str
    reference: str  # namespace/name, for messages


@dataclass(frozen=True)
class PodLease:
    """One slot's published lease: the variable that names it, and the lease."""

    variable: str
    lease_id: str
    limit: str | None


def dead_pod(body: Mapping[str, Any], deleted: bool) -> DeadPod | None:
    """The pod if it was scheduled and is deleted or finished; None otherwise (a pod that never
    reached a node ran nothing)."""
    metadata = body.get("metadata") or {}
    uid = metadata.get("uid")
    node = (body.get("spec") or {}).get("nodeName")
    phase = (body.get("status") or {}).get("phase")
    if not uid or not node or not (deleted or phase in _FINISHED):
        return None
    reference = f"{metadata.get('namespace')}/{metadata.get('name')}"
    return DeadPod(str(uid).lower(), str(node), reference)


def prefix_of(pod_uid: str) -> str:
    """What the names of a pod's lease variables start with."""
    return f"{LEASE_VARIABLE_PREFIX}{pod_uid.lower()}_"


def pod_leases(pod_uid: str, variables: Iterable[Mapping[str, Any]]) -> list[PodLease]:
    """The pod's published leases among ``variables`` (Prefect's variable objects; a name filter
    with ``like`` also matches others, since ``_`` is a wildcard there). Malformed ones are left
    out: they name no lease that could be revoked."""
    prefix = prefix_of(pod_uid)
    found: list[PodLease] = []
    for variable in variables:
        name = variable.get("name")
        if not isinstance(name, str) or not name.startswith(prefix):
            continue
        if not name.removeprefix(prefix).isdigit():
            continue
        value = variable.get("value")
        if not isinstance(value, Mapping):
            continue
        try:
            lease_id = str(uuid.UUID(str(value.get("lease_id"))))
        except ValueError:
            continue
        limit = value.get("limit")
        found.append(PodLease(name, lease_id, limit if isinstance(limit, str) else None))
    return sorted(found, key=lambda lease: lease.variable)
