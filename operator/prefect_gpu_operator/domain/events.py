"""The Kubernetes Events the operator posts, and their words: pure values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Event",
    "fenced",
    "invalid_limit_name",
    "invalid_spec",
    "limit_created",
    "limit_deleted",
    "limit_updated",
    "no_gpu_limit",
    "prefect_rate_limited",
    "prefect_unreachable",
    "status_write_failed",
    "worker_sees_fewer_gpus",
]


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on an object."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str

    @property
    def warning(self) -> bool:
        return self.type == "Warning"


def limit_created(name: str, limit: int, node: str) -> Event:
    return Event("Normal", "LimitCreated", f"{name}: limit {limit} for node {node}")


def limit_updated(name: str, before: int | None, limit: int, draining_to: int | None) -> Event:
    was = "?" if before is None else str(before)
    message = f"{name}: limit {was} -> {limit}"
    if draining_to is not None:
        message += f", draining to {draining_to} once the slots still held are released"
    return Event("Normal", "LimitUpdated", message)


def limit_deleted(name: str) -> Event:
    return Event("Normal", "LimitDeleted", f"{name}: node gone or deselected")


def invalid_spec(error: str | None) -> Event:
    return Event("Warning", "InvalidSpec", error or "invalid spec")


def invalid_limit_name(error: str) -> Event:
    return Event("Warning", "InvalidLimitName", error)


def status_write_failed() -> Event:
    return Event("Warning", "StatusWriteFailed", "could not record new limits")


def fenced(error: str) -> Event:
    return Event("Warning", "Fenced", error)


def prefect_unreachable(error: str) -> Event:
    return Event("Warning", "PrefectUnreachable", error)


def prefect_rate_limited(error: str) -> Event:
    return Event("Warning", "PrefectRateLimited", error)


def no_gpu_limit(node: str) -> Event:
    return Event(
        "Warning",
        "NoGPULimit",
        f"node {node} has no GPU concurrency limit: no GPULimitPolicy selects it with a GPU "
        f"resource it has, so GPU tasks in this pod (which acquire the limit for "
        f"WORKER_ID={node}) will fail. Schedule the pod on a GPU node a policy selects, or "
        f"widen a policy's nodeSelector/resources.",
    )


def worker_sees_fewer_gpus(detail: str) -> Event:
    return Event(
        "Warning",
        "WorkerSeesFewerGPUs",
        f"{detail}: flow runs in this pod can hold more slots than it has GPUs. Give the pod "
        "every GPU its node's limit counts (one worker per GPU node), or set the policy's "
        "capacityFrom: WorkerPods.",
    )
