"""Claiming slots on the node: the queue on ``gate.lock``, the head's search for free slot files,
and adopting or acquiring the Prefect lease each slot needs.

Claimers on a node queue on ``gate.lock``; only the head of the queue looks for free slots, and a
leaving holder wakes it through the node's doorbell, so it takes a released slot in about a
millisecond instead of sleeping a server-suggested ``Retry-After`` (and, on SQLite servers, a 503
backoff of seconds). A slot file records the Prefect lease (one GCL slot) that accounts for
it: a holder that leaves while others queue leaves that lease on the file and the next claimant
adopts it with no server request, so the server's ``active_slots`` counts exactly the slots held
or being handed over, never more than the limit.

Admissions are decided on a reading of the limit under a second old (``_LIMIT_REFRESH``). A
claimant that finds nobody ahead of it reads the limit after it asked, so a lowered limit keeps
it out at once: when a free slot has no lease to adopt, the lease request itself is that read
(the grant reports the limit), one request instead of two. One that queues uses the reading the
head keeps in ``gate.lock`` (its reads, and the limit each grant reports), as a waiting head
always did. So queueing and handing a slot over cost no request, and a crowd arriving at once (a
worker starting its flow runs) takes its first slots on one lease request each.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient

from prefect_gpu_flows import _gcl
from prefect_gpu_flows._config import (
    GpuLimitNotFoundError,
    GpuSlotTimeout,
    SlotConfig,
    logger,
)
from prefect_gpu_flows._keeper import PARK_RETRY, Publication, keeper
from prefect_gpu_flows._locks import (
    Cancelled,
    Doorbell,
    LeaseRecord,
    LimitReading,
    SlotFile,
    lock_wait,
    read_reading,
    try_lock,
    unlock,
    write_reading,
)

__all__ = ["Holding", "acquire"]

_POLL = 0.001
"""Seconds between the queue head's looks at the slot files where there is no doorbell."""
_POLL_RUNG = 0.01
"""The same with a doorbell: only for holders that die without ringing it."""
_LIMIT_REFRESH = 1.0
"""Age (s) at which a reading of the limit is read again, so raising or lowering it takes effect."""
_MAX_SERVER_WAIT = 0.5
"""Cap on a server-suggested Retry-After: local slots may free up sooner than it predicts."""
_ADOPT_MARGIN = 5.0
"""An adopted lease must have this many seconds left; otherwise it is renewed first."""


@dataclass
class Holding:
    """The slots one block holds, with their leases; ``release()`` hands them back."""

    config: SlotConfig
    slots: list[SlotFile]
    records: list[LeaseRecord] = field(default_factory=list)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.config.device_of(slot.index) for slot in self.slots)

    def release(self) -> None:
        for slot, record in zip(self.slots, self.records, strict=True):
            keeper.leave(slot, record.lease_id)


class _Claim:
    """The queue head's search for ``gpus`` free slots whose leases it can adopt or acquire."""

    def __init__(
        self,
        config: SlotConfig,
        prefect: SyncPrefectClient,
        gpus: int,
        gate: int,
        reading: LimitReading | None,
    ) -> None:
        self.config = config
        self.prefect = prefect
        self.gpus = gpus
        self.gate = gate
        self._next: concurrent.futures.Future[LimitReading] | None = None
        if reading is None:
            self.refresh()
        else:
            self._learn(reading.limit_id, reading.limit, reading.read_at)

    def refresh(self) -> None:
        read_at = time.time()
        limit_id, limit = _read_limit(self.config, self.prefect)
        self._learn(limit_id, limit, read_at)

    def stale(self) -> bool:
        return not _fresh(self.read_at)

    def refresh_ahead(self) -> None:
        """Read the limit again in a helper thread once the reading is half-way to stale, and take
        the answer when it is there: the head goes on watching the slots meanwhile, so no hand-over
        waits for the server."""
        if self._next is not None:
            if self._next.done():
                reading = self._next.result()  # a missing limit raises here
                self._next = None
                if reading.read_at > self.read_at:
                    self._learn(reading.limit_id, reading.limit, reading.read_at)
            return
        if time.time() - self.read_at < _LIMIT_REFRESH / 2:
            return
        future: concurrent.futures.Future[LimitReading] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        self._next = future
        context = contextvars.copy_context()  # the run logger follows into the thread

        def read() -> None:
            try:
                read_at = time.time()
                limit_id, limit = context.run(_read_limit, self.config, self.prefect)
                future.set_result(LimitReading(self.config.limit_name, limit_id, limit, read_at))
            except BaseException as error:
                future.set_exception(error)

        threading.Thread(target=read, name="gpu-slot-limit", daemon=True).start()

    def _learn(self, limit_id: UUID, limit: int, read_at: float) -> None:
        """Take a new reading of the limit and keep it for the next head."""
        reading = LimitReading(self.config.limit_name, limit_id, limit, read_at)
        self._take(reading)
        write_reading(self.gate, reading)

    def _take(self, reading: LimitReading) -> None:
        self.config.check_limit(reading.limit)  # slots without a device are an error
        self.limit_id, self.limit, self.read_at = reading.limit_id, reading.limit, reading.read_at
        self.releasable = self.limit > 0  # see _gcl.release: nothing is released at limit 0
        self.span = self._span()

    def _span(self) -> int:
        """Slot files to look at: those below the limit and any older ones above it (held?)."""
        existing = [
            int(path.stem.removeprefix("slot-"))
            for path in self.config.lock_dir.glob("slot-*.lock")
            if path.stem.removeprefix("slot-").isdigit()
        ]
        return max([self.limit, *(index + 1 for index in existing)])

    def try_enter(self) -> Holding | None:
        """One look at the slot files; a holding if ``gpus`` slots were free within the limit."""
        free = [slot for slot in map(self._slot, range(self.span)) if slot.try_lock()]
        chosen: list[SlotFile] = []
        busy = self.span - len(free)
        try:
            records = {slot.index: slot.read() for slot in free}
            if busy + self.gpus <= self.limit:
                # Prefer slots whose lease can be adopted: that needs no server request.
                below = [slot for slot in free if slot.index < self.limit]
                below.sort(key=lambda slot: (not self._adoptable(records[slot.index]), slot.index))
                chosen = self._on_distinct_devices(below)
            self._drop_surplus(free, chosen, records, room=self.limit - busy - len(chosen))
        except BaseException:
            chosen = []
            raise
        finally:
            for slot in free:
                if slot not in chosen:
                    slot.unlock()
        if not chosen:
            return None
        holding = self._attach(chosen, records)
        # Server calls in _attach (a 503 backoff, a restarting server) may have taken long enough
        # for the limit to change meanwhile, or the lease answer brought a new one: a slot index
        # may now be above it, and the server's count may not cover every local holder (a
        # re-created limit). Check the choice on a fresh reading.
        try:
            if self.stale():
                self.refresh()
        except BaseException:
            holding.release()
            raise
        if busy + self.gpus <= self.limit and all(slot.index < self.limit for slot in chosen):
            return holding
        holding.release()  # the leases stay on their files: adopted or released later
        return None

    def _on_distinct_devices(self, candidates: list[SlotFile]) -> list[SlotFile]:
        """The first ``gpus`` candidates on different devices (slots may share one), or none."""
        chosen: dict[str, SlotFile] = {}
        for slot in candidates:
            chosen.setdefault(self.config.device_of(slot.index), slot)
            if len(chosen) == self.gpus:
                return list(chosen.values())
        return []

    def _slot(self, index: int) -> SlotFile:
        return SlotFile(self.config.lock_dir, index)

    def _adoptable(self, record: LeaseRecord | None) -> bool:
        return record is not None and record.limit_id == self.limit_id

    def _drop_surplus(
        self,
        free: list[SlotFile],
        chosen: list[SlotFile],
        records: dict[int, LeaseRecord | None],
        room: int,
    ) -> None:
        """Release leases left on free slots beyond what the limit still has room for.

        They would otherwise keep counting on the server after the limit was lowered, or while
        this claimant waits for more slots than are free.
        """
        for slot in sorted(free, key=lambda slot: slot.index):
            record = records[slot.index]
            if slot in chosen or record is None:
                continue
            if self._adoptable(record) and slot.index < self.limit and room > 0:
                room -= 1
                continue
            if not self.releasable:
                continue  # the server refuses releases while the limit is 0: keep it on file
            if not _gcl.release(self.prefect, record.lease_id):
                self.releasable = False  # until the next read of the limit
                continue
            slot.write(None)
            records[slot.index] = None

    def _attach(self, chosen: list[SlotFile], records: dict[int, LeaseRecord | None]) -> Holding:
        holding = Holding(self.config, chosen)
        try:
            for slot in chosen:
                record = self._lease_for(slot, records[slot.index])
                holding.records.append(record)
        except BaseException:
            # Leases attached so far stay on their files for the next claimant, and this
            # process's keeper releases them if nobody takes them.
            for slot in chosen:
                slot.unlock()
            for slot, record in zip(chosen, holding.records, strict=False):
                keeper.park(slot, record.lease_id, self.prefect, delay=PARK_RETRY)
            raise
        for slot, record in zip(chosen, holding.records, strict=True):
            publication = _publication(self.config, record)
            keeper.hold(slot, record, self.config.lease_seconds, self.prefect, publication)
        return holding

    def _lease_for(self, slot: SlotFile, record: LeaseRecord | None) -> LeaseRecord:
        """Adopt the lease left on ``slot`` when it is still good, else acquire a new one."""
        lease_seconds = self.config.lease_seconds
        if record is not None and self._adoptable(record):
            left = record.expires - time.time()
            if left > _ADOPT_MARGIN:
                return record
            expires = _gcl.renew(self.prefect, record.lease_id, lease_seconds) if left > 0 else None
            if expires is not None:
                record = replace(record, expires=expires)
                slot.write(record)
                return record
        elif record is not None:
            _gcl.release(self.prefect, record.lease_id)  # on an older incarnation of the limit
        slot.write(None)
        asked_at = time.time()
        try:
            record, limit = _gcl.acquire(self.prefect, self.config.limit_name, lease_seconds)
        except _gcl.LimitMissing:
            raise _missing_limit(self.config) from None
        slot.write(record)
        try:
            self._learn(record.limit_id, limit, asked_at)  # the server's answer is a reading too
        except BaseException:
            # A limit now too large for the devices: hand this lease over like the others.
            keeper.park(slot, record.lease_id, self.prefect, delay=PARK_RETRY)
            raise
        return record


def _publication(config: SlotConfig, record: LeaseRecord) -> Publication | None:
    """Where the keeper is to publish the slot's lease for the operator, unless it is already (or
    no pod is known). A lease adopted from another pod (one lock directory shared by pods of a
    node) moves to this pod's name, so that the other pod's death cannot revoke it."""
    if config.pod_uid is None or record.pod == config.pod_uid:
        return None
    return Publication(config.pod_uid, config.limit_name, record.pod)


def _missing_limit(config: SlotConfig) -> GpuLimitNotFoundError:
    return GpuLimitNotFoundError(
        f"The Prefect server has no global concurrency limit {config.limit_name!r}. The "
        f"prefect-gpu-operator creates one per GPU node: check that it is running and that a "
        f"GPULimitPolicy selects node {config.worker_id!r} (`kubectl get glp`). gpu_slot() never "
        f"creates limits itself (outside Kubernetes: `prefect gcl create {config.limit_name} "
        f"--limit <gpus>`)."
    )


def _fresh(read_at: float) -> bool:
    return 0 <= time.time() - read_at < _LIMIT_REFRESH  # a clock stepped back: read again


def _read_limit(config: SlotConfig, prefect: SyncPrefectClient) -> tuple[UUID, int]:
    try:
        return _gcl.read_limit(prefect, config.limit_name)
    except _gcl.LimitMissing:
        raise _missing_limit(config) from None


def acquire(
    config: SlotConfig,
    gpus: int,
    timeout_seconds: float | None,
    cancelled: threading.Event | None,
) -> Holding:
    """Wait in the node's queue, then for ``gpus`` slots; raises GpuSlotTimeout at the deadline."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, not {gpus}")
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    prefect = _gcl.client()
    config.lock_dir.mkdir(parents=True, exist_ok=True)
    waiting = "other claimants on this node are ahead in the queue"
    path = config.lock_dir / "gate.lock"
    gate = try_lock(path)
    queued = gate is None
    try:
        gate = gate if gate is not None else lock_wait(path, deadline, cancelled)
    except TimeoutError:
        raise _timeout(config, timeout_seconds, waiting) from None
    # Opened before the first look, so that no release between a look and the wait is missed.
    bell = Doorbell.open(config.lock_dir)
    try:
        kept = read_reading(gate) if queued else None  # nobody ahead: read after asking
        if kept is None or kept.name != config.limit_name or not _fresh(kept.read_at):
            kept = _lease_unread(config, prefect) if gpus == 1 else None
        # That reading, or a new one: a missing limit fails here, at once.
        claim = _Claim(config, prefect, gpus, gate, kept)
        logged: str | None = None
        while True:
            if claim.stale():
                claim.refresh()  # the read ahead was late: wait for one
            else:
                claim.refresh_ahead()
            pause = _POLL if bell is None else _POLL_RUNG
            if claim.limit < gpus:
                waiting = (
                    f"limit {config.limit_name!r} is {claim.limit}, below the {gpus} GPU(s) "
                    f"requested (the node has no schedulable GPUs for it right now); waiting "
                    f"for the limit to be raised"
                )
                claim.try_enter()  # only to release leases left above the lowered limit
            else:
                try:
                    holding = claim.try_enter()
                except _gcl.SlotRefused as refused:
                    waiting = (
                        f"the server refused a slot of {config.limit_name!r} although one is "
                        f"free on this node ({refused.reason}: slots held outside gpu_slot(), "
                        f"or by a crashed holder until its lease expires)"
                    )
                    pause = min(refused.retry_after, _MAX_SERVER_WAIT)
                else:
                    if holding is not None:
                        return holding
                    waiting = f"all {claim.limit} GPU slot(s) of {config.limit_name!r} are busy"
            if waiting != logged:
                level = logging.DEBUG if waiting.startswith("all ") else logging.INFO
                logger().log(level, "gpu_slot waits: %s", waiting)  # the plain queue: DEBUG
                logged = waiting
            now = time.monotonic()
            if cancelled is not None and cancelled.is_set():
                raise Cancelled
            if deadline is not None and now >= deadline:
                raise _timeout(config, timeout_seconds, waiting)
            if deadline is not None:
                pause = min(pause, deadline - now)
            if bell is None:
                time.sleep(pause)
            else:
                bell.wait(pause)  # a leaving holder wakes it at once
    finally:
        if bell is not None:
            bell.close()
        unlock(gate)


def _lease_unread(config: SlotConfig, prefect: SyncPrefectClient) -> LimitReading | None:
    """Ask for a lease on the lowest free slot without one; the grant reports the limit. The
    lease stays on the slot file for the claim to adopt once it has checked the limit (or to
    release, should the slot be above it). None, and no lease, where this cannot be done: a free
    slot has a lease to adopt (deciding needs a read), or the server has no slot now."""
    slot = _first_free_slot(config)
    if slot is None:
        return None
    asked_at = time.time()
    try:
        record, limit = _gcl.acquire(prefect, config.limit_name, config.lease_seconds)
    except _gcl.SlotRefused:
        return None  # the claim reads the limit and says why it waits
    except _gcl.LimitMissing:
        raise _missing_limit(config) from None
    else:
        try:
            config.check_limit(limit)  # slots without a device: give the lease straight back
        except BaseException:
            _gcl.release(prefect, record.lease_id)
            raise
        slot.write(record)
        keeper.park(slot, record.lease_id, prefect, delay=PARK_RETRY)  # unless adopted
        return LimitReading(config.limit_name, record.limit_id, limit, asked_at)
    finally:
        slot.unlock()


def _first_free_slot(config: SlotConfig) -> SlotFile | None:
    """The lowest free slot, locked, if it has no lease on file; else None."""
    indices = [
        int(path.stem.removeprefix("slot-"))
        for path in config.lock_dir.glob("slot-*.lock")
        if path.stem.removeprefix("slot-").isdigit()
    ]
    for index in range(max(indices, default=-1) + 2):
        slot = SlotFile(config.lock_dir, index)
        if not slot.try_lock():
            continue
        if slot.read() is None:
            return slot
        slot.unlock()
        return None
    return None


def _timeout(config: SlotConfig, timeout_seconds: float | None, waiting: str) -> GpuSlotTimeout:
    return GpuSlotTimeout(
        f"no GPU slot of {config.limit_name!r} within {timeout_seconds} s: {waiting}"
    )
