"""Writing policy status: the write-ahead that must land before Prefect calls, and everything
else coalesced, so a burst of node changes costs one status write, not one per change."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import Callable, Iterable, Mapping

from prefect_gpu_operator.adapters.kube import StatusNotWritten
from prefect_gpu_operator.api.policy import GPULimitPolicyStatus, LimitEntry
from prefect_gpu_operator.domain.plan import ObservedLimit
from prefect_gpu_operator.domain.status import Outcome, build_status, with_ledger
from prefect_gpu_operator.metrics import MANAGED_LIMITS, NODE_HELD_SLOTS, NODE_SLOTS
from prefect_gpu_operator.runtime.ports import KubeApi
from prefect_gpu_operator.runtime.records import PolicyRecord

__all__ = ["StatusWriter", "export_metrics", "remove_metrics", "status_body"]

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(status: GPULimitPolicyStatus) -> dict[str, object]:
    """The status as the API stores it: camelCase, unset fields left out."""
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def export_metrics(
    name: str,
    record: PolicyRecord,
    ledger: Iterable[LimitEntry],
    observed: Mapping[str, ObservedLimit] | None = None,
) -> None:
    """The policy's managed limits and each node's slots and, as last read in ``observed``, the
    slots held; nodes that left are removed."""
    entries = tuple(ledger)
    MANAGED_LIMITS.labels(name).set(len(entries))
    nodes = {entry.node for entry in entries}
    for gone in record.exported_nodes - nodes:
        for gauge in (NODE_SLOTS, NODE_HELD_SLOTS):
            with contextlib.suppress(KeyError):
                gauge.remove(name, gone)
    for entry in entries:
        NODE_SLOTS.labels(name, entry.node).set(entry.limit)
        seen = (observed or {}).get(entry.name)
        NODE_HELD_SLOTS.labels(name, entry.node).set(seen.active_slots if seen else 0)
    record.exported_nodes = nodes


def remove_metrics(name: str, record: PolicyRecord) -> None:
    """A policy that went away exports nothing."""
    export_metrics(name, record, ())
    with contextlib.suppress(KeyError):
        MANAGED_LIMITS.remove(name)


class StatusWriter:
    """Status writes of every policy; ``interval`` is the coalescing window in seconds."""

    def __init__(
        self, kube: KubeApi, interval: float, workers: Callable[[], frozenset[str]]
    ) -> None:
        self._kube = kube
        self._interval = interval
        self._workers = workers  # nodes running Prefect pods, for status.workers

    async def write_ahead(self, name: str, record: PolicyRecord) -> bool:
        """Record the ledger now (before the Prefect calls it names); False if that failed."""
        if not self._stage(record, with_ledger(self._base(record), record.ledger)):
            return True
        return await self.flush(name, record)

    def write(self, name: str, record: PolicyRecord, outcome: Outcome) -> None:
        """Stage the status for ``outcome``; it goes out within the coalescing window."""
        outcome = dataclasses.replace(outcome, workers=self._workers())
        self._stage(record, build_status(outcome, self._base(record), _now()))
        # Also when nothing new was staged: a write refused earlier is still pending, and each
        # reconcile is its retry.
        if record.pending is not None and (record.flusher is None or record.flusher.done()):
            record.flusher = asyncio.create_task(self._flush_soon(name, record))

    async def flush(self, name: str, record: PolicyRecord) -> bool:
        """Write the staged status now, if any; False if the API refused it (kept for later)."""
        async with record.status_lock:  # one write at a time, so they land in order
            intended, record.pending = record.pending, None
            if intended is None or intended == record.status:
                return True
            try:
                await self._kube.patch_policy_status(name, status_body(intended))
            except StatusNotWritten as error:
                log.warning("status of %s not written (%s); will retry", name, error)
                if record.pending is None:
                    record.pending = intended
                return False
            record.status = intended
            return True

    async def flush_all(self, records: dict[str, PolicyRecord]) -> None:
        """Write every staged status now (on shutdown)."""
        for name, record in list(records.items()):
            await self.flush(name, record)

    @staticmethod
    def _base(record: PolicyRecord) -> GPULimitPolicyStatus:
        return record.pending if record.pending is not None else record.status

    @staticmethod
    def _stage(record: PolicyRecord, status: GPULimitPolicyStatus) -> bool:
        """Make ``status`` the next write; False when it says nothing new (no write, no watch
        event, no loop)."""
        if status == StatusWriter._base(record):
            return False
        record.pending = status
        return True

    async def _flush_soon(self, name: str, record: PolicyRecord) -> None:
        # A status staged while a write was in flight found this task running and left it to
        # this loop; a refused write stays staged for the next change instead of spinning.
        while True:
            await asyncio.sleep(self._interval)
            if not await self.flush(name, record) or record.pending is None:
                return
