"""What the operator keeps of one policy between reconciles."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prefect_gpu_operator.api.policy import GPULimitPolicyStatus, LimitEntry
from prefect_gpu_operator.domain.desired import Policy

__all__ = ["PolicyRecord"]


@dataclass
class PolicyRecord:
    """A policy as last observed, its ledger, and the state of its status writes."""

    policy: Policy | None  # None when the spec does not parse
    spec_error: str | None
    ledger: tuple[LimitEntry, ...]
    status: GPULimitPolicyStatus = field(default_factory=GPULimitPolicyStatus)  # as last written
    pending: GPULimitPolicyStatus | None = None  # the status to write next, if it differs
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reconcile at a time
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # writes land in order
    flusher: asyncio.Task[None] | None = None
    exported_nodes: set[str] = field(default_factory=set)  # node labels of the slots metric
