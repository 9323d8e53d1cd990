"""The per-process lease keeper: publishes the leases this process holds under its pod, renews
them, and releases the ones it left on a slot file when no queued claimant adopts them. One daemon
thread per process; its server calls stay off the holders' enter and exit paths."""

from __future__ import annotations

import atexit
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient

from prefect_gpu_flows import _gcl
from prefect_gpu_flows._config import logger
from prefect_gpu_flows._locks import LeaseRecord, SlotFile, lock_wait, ring, try_lock, unlock

__all__ = ["PARK_RETRY", "PARK_SETTLE", "PUBLISH_DELAY", "PUBLISH_WAIT", "Publication", "keeper"]

PARK_SETTLE = 0.05
"""Delay before a left lease is released on the server: lets the next queued claimant adopt it."""
PARK_RETRY = 1.0
"""Delay between further attempts to release a left lease while claimants queue."""
PUBLISH_DELAY = 0.05
"""A held lease is published this long after the block starts: not competing with its first
moments for the interpreter, and not at all for blocks shorter than that."""
PUBLISH_WAIT = 2.0
"""How long a leaving holder waits for its lease's publication in flight (a block shorter than a
request), so that a later lease of the slot is never overwritten by it; beyond, it goes on."""


@dataclass
class Publication:
    """Where a held lease is to be published for the operator (see ``_gcl.register``)."""

    pod: str
    limit_name: str
    previous: str | None  # the pod it was published under, if another one
    state: str = "pending"  # then "running", and "done" (or "dropped" if the holder left first)
    due: float = 0.0  # monotonic; set when held


@dataclass
class _Held:
    slot: SlotFile
    record: LeaseRecord | None  # None once the server lost it
    lease_seconds: float
    prefect: SyncPrefectClient  # the server that granted it
    publication: Publication | None = None


@dataclass
class _Left:
    directory: Path
    index: int
    due: float  # monotonic
    prefect: SyncPrefectClient


class _Keeper:
    """Renews the leases this process holds and releases the ones it left when nobody adopts them.

    One daemon thread per process; its server calls stay off the holders' enter/exit paths.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start empty (also in a forked child: the parent's thread and leases are not ours)."""
        self._lock = threading.Lock()
        self._published = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._held: dict[UUID, _Held] = {}
        self._left: dict[UUID, _Left] = {}
        self._thread: threading.Thread | None = None

    def hold(
        self,
        slot: SlotFile,
        record: LeaseRecord,
        lease_seconds: float,
        prefect: SyncPrefectClient,
        publication: Publication | None = None,
    ) -> None:
        if publication is not None:
            publication.due = time.monotonic() + PUBLISH_DELAY
        with self._lock:
            held = _Held(slot, record, lease_seconds, prefect, publication)
            self._held[record.lease_id] = held
            self._left.pop(record.lease_id, None)
            self._start()
        self._wake.set()

    def leave(self, slot: SlotFile, lease_id: UUID) -> None:
        """Unlock a held slot, leaving its lease on file for the next claimant if still valid."""
        with self._lock:
            publication = self._held[lease_id].publication
            if publication is not None:
                if publication.state == "pending":
                    publication.state = "dropped"  # the next holder publishes it, if any
                deadline = time.monotonic() + PUBLISH_WAIT
                while publication.state == "running" and time.monotonic() < deadline:
                    self._published.wait(timeout=deadline - time.monotonic())
            held = self._held.pop(lease_id)
            if held.record is None:
                slot.write(None)  # the server dropped it: nobody may adopt it
            slot.unlock()
        ring(slot.directory)
        if held.record is not None:
            self.park(slot, lease_id, held.prefect, delay=PARK_SETTLE)

    def park(
        self, slot: SlotFile, lease_id: UUID, prefect: SyncPrefectClient, *, delay: float
    ) -> None:
        """Release a lease left on an unlocked slot after ``delay`` s, unless someone adopts it."""
        with self._lock:
            due = time.monotonic() + delay
            self._left[lease_id] = _Left(slot.directory, slot.index, due, prefect)
            self._start()
        self._wake.set()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="gpu-slot-keeper", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=self._next_due())
            self._wake.clear()
            try:
                self._publish_due()
                self._renew_due()
                self._release_left(force=False)
            except Exception as error:  # keep the thread alive through server outages
                logger().warning("gpu_slot lease upkeep failed (retrying in 1 s): %s", error)
                time.sleep(1.0)  # what failed is still due: do not spin

    def _next_due(self) -> float:
        now_wall, now = time.time(), time.monotonic()
        with self._lock:
            dues = [5.0]
            dues += [
                h.record.expires - h.lease_seconds / 2 - now_wall
                for h in self._held.values()
                if h.record is not None
            ]
            dues += [left.due - now for left in self._left.values()]
            dues += [publication.due - now for _, _, publication in self._unpublished()]
        return max(0.0, min(dues))

    def _unpublished(self, by: float | None = None) -> list[tuple[UUID, _Held, Publication]]:
        """Publications still to make (due by monotonic time ``by``, if given)."""
        return [
            (lease_id, held, held.publication)
            for lease_id, held in self._held.items()
            if held.publication is not None
            and held.publication.state == "pending"
            and (by is None or held.publication.due <= by)
        ]

    def _publish_due(self) -> None:
        """Publish the leases taken since the last look; a holder leaving meanwhile waits."""
        with self._lock:
            due = self._unpublished(by=time.monotonic())
            for _, _, publication in due:
                publication.state = "running"
        for lease_id, held, publication in due:
            published = False
            try:
                name = _gcl.lease_variable(publication.pod, held.slot.index)
                published = _gcl.register(held.prefect, name, lease_id, publication.limit_name)
                if published and publication.previous is not None:
                    previous = _gcl.lease_variable(publication.previous, held.slot.index)
                    _gcl.forget(held.prefect, previous)
            except Exception as error:  # one failure must not leave the others running
                logger().warning("gpu_slot could not publish lease %s: %s", lease_id, error)
            finally:
                with self._lock:
                    publication.state = "done"
                    # Still held (the holder waits while it runs): the file says where it is.
                    if published and held.record is not None and held.slot.fd is not None:
                        held.record = replace(held.record, pod=publication.pod)
                        held.slot.write(held.record)
                    self._published.notify_all()

    def _renew_due(self) -> None:
        with self._lock:
            due = [
                (lease_id, h.lease_seconds, h.prefect)
                for lease_id, h in self._held.items()
                if h.record is not None and h.record.expires - time.time() < h.lease_seconds / 2
            ]
        for lease_id, lease_seconds, prefect in due:
            expires = _gcl.renew(prefect, lease_id, lease_seconds)
            with self._lock:
                held = self._held.get(lease_id)
                if held is None or held.record is None:
                    continue  # left meanwhile; the file keeps the older (earlier) expiry
                if expires is None:
                    logger().warning(
                        "The Prefect server lost lease %s of a running gpu_slot() block: this "
                        "GPU is no longer counted in the limit until the block ends.",
                        lease_id,
                    )
                    held.record = None
                    held.slot.write(None)
                else:
                    held.record = replace(held.record, expires=expires)
                    held.slot.write(held.record)

    def _release_left(self, *, force: bool) -> None:
        """Release left leases that are due (all if ``force``) unless a queued claimant adopts."""
        now = time.monotonic()
        with self._lock:
            due = [(i, left) for i, left in self._left.items() if force or left.due <= now]
        for lease_id, left in due:
            gate = _lock_gate(left.directory, wait=2.0 if force else 0.0)
            if gate is None and not force:  # claimants queue: the head adopts it; look later
                with self._lock:
                    left.due = time.monotonic() + PARK_RETRY
                continue
            # At exit, a head still busy after the wait (a slow server) may never adopt it: the
            # slot's own lock is what guards the lease, so release it without the gate.
            refused = False
            try:
                slot = SlotFile(left.directory, left.index)
                if slot.try_lock():
                    try:
                        record = slot.read()
                        if record is not None and record.lease_id == lease_id:
                            released = _gcl.release(left.prefect, lease_id)
                            # Refused (limit 0): stays on file, adoptable; retried until it
                            # expires, after which the server's repossessor owns it.
                            refused = not released and record.expires > time.time()
                            if not refused:
                                slot.write(None)
                    finally:
                        slot.unlock()
                        ring(left.directory)
                # else: adopted and held by someone else, who now owns the lease
                with self._lock:
                    if refused:
                        left.due = time.monotonic() + PARK_RETRY
                    else:
                        self._left.pop(lease_id, None)
            finally:
                if gate is not None:
                    unlock(gate)

    def flush(self) -> None:
        """At exit: release every lease this process left, waiting briefly for each gate."""
        try:
            self._release_left(force=True)
        except Exception as error:
            logger().debug("could not release left gpu_slot leases at exit: %s", error)


def _lock_gate(directory: Path, *, wait: float) -> int | None:
    """The node's gate, waiting up to ``wait`` seconds for it; None if it stayed busy."""
    if wait <= 0:
        return try_lock(directory / "gate.lock")
    try:
        return lock_wait(directory / "gate.lock", time.monotonic() + wait, None)
    except TimeoutError:
        return None


keeper = _Keeper()
atexit.register(keeper.flush)
os.register_at_fork(after_in_child=keeper.reset)
