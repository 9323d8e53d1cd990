"""``gpu_slot()``: gate GPU work on the node's Prefect limit and pin concrete devices.

This automates Prefect's ``examples/per_worker_task_concurrency.py``: the node's limit is
``gpu:<WORKER_ID>`` (created by the operator, never here), and a block holds ``gpus`` of its slots.
On top of the Prefect accounting, each slot is a lock file in a node-local directory, which both
pins a device index and forms the local queue:

1. Claimers on a node queue on ``gate.lock``; only the head of the queue looks for free slots, and
   it sees a released slot within a couple of milliseconds instead of sleeping a server-suggested
   ``Retry-After`` (and, on SQLite servers, a 503 backoff of seconds).
2. A slot file records the Prefect lease (one GCL slot) that accounts for it. A holder that leaves
   while others queue leaves that lease on the file and the next claimant adopts it with no server
   request; when nobody queues the lease is released on the server at once. So the server's
   ``active_slots`` counts exactly the slots held or being handed over, never more than the limit.
3. A holder killed with SIGKILL drops its file lock at once; its lease is adopted by the next
   claimant, or expires on the server after the lease (60 s by default) plus up to the server's
   repossessor loop (15 s).

Configuration (environment): ``WORKER_ID`` (the node; the operator's webhook injects it),
``PREFECT_GPU_LIMIT_PREFIX`` (default ``gpu:``), ``PREFECT_GPU_LOCK_DIR`` (default
``/tmp/prefect-gpu-locks``; every process of a node must see the same directory),
``PREFECT_GPU_DEVICE_COUNT`` (physical GPUs, for time-sliced nodes whose limit is GPUs x slots per
GPU; default: the limit) and ``PREFECT_GPU_LEASE_SECONDS`` (default 60, the server's minimum).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import functools
import importlib.util
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient

from prefect_gpu_flows import _gcl
from prefect_gpu_flows._locks import Cancelled, LeaseRecord, SlotFile, lock_wait, try_lock, unlock

__all__ = [
    "GpuLease",
    "GpuLimitNotFoundError",
    "GpuSlotError",
    "GpuSlotTimeout",
    "MissingWorkerIdError",
    "SlotConfig",
    "async_gpu_slot",
    "get_worker_id",
    "gpu_slot",
]

_POLL = 0.001
"""Seconds between the queue head's looks at the slot files (cheap local syscalls)."""
_LIMIT_REFRESH = 1.0
"""Seconds between re-reads of the limit while waiting, so raising or lowering it takes effect."""
_MAX_SERVER_WAIT = 0.5
"""Cap on a server-suggested Retry-After: local slots may free up sooner than it predicts."""
_ADOPT_MARGIN = 5.0
"""An adopted lease must have this many seconds left; otherwise it is renewed first."""
_PARK_SETTLE = 0.05
"""Delay before a left lease is released on the server: lets the next queued claimant adopt it."""
_PARK_RETRY = 1.0
"""Delay between further attempts to release a left lease while claimants queue."""


class GpuSlotError(RuntimeError):
    """gpu_slot() cannot work on this node as configured."""


class MissingWorkerIdError(GpuSlotError):
    """WORKER_ID is not set, so the node's limit is unknown."""


class GpuLimitNotFoundError(GpuSlotError):
    """The node's limit does not exist on the Prefect server."""


class GpuSlotTimeout(TimeoutError):
    """No GPU slot was free within ``timeout_seconds``."""


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()  # shows in the flow/task run's logs when there is one
    except Exception:
        return logging.getLogger("prefect_gpu_flows")


def get_worker_id() -> str:
    """The node this process runs on, from ``WORKER_ID`` (as in Prefect's per-worker example)."""
    worker_id = os.environ.get("WORKER_ID", "").strip()
    if not worker_id:
        raise MissingWorkerIdError(
            "WORKER_ID is not set, so gpu_slot() cannot tell which node's GPU limit to use. "
            "On Kubernetes the prefect-gpu-operator's webhook injects it into Prefect worker and "
            "flow-run pods (label the pod prefectgpu.io/inject-worker-id=true if it was excluded); "
            "elsewhere run `export WORKER_ID=<node-name>` before starting the worker."
        )
    return worker_id


@dataclass(frozen=True)
class SlotConfig:
    """Where and how gpu_slot() works on this node; ``from_env()`` reads the environment."""

    worker_id: str
    limit_prefix: str = "gpu:"
    lock_root: Path = Path("/tmp/prefect-gpu-locks")
    device_count: int | None = None
    lease_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> SlotConfig:
        count = os.environ.get("PREFECT_GPU_DEVICE_COUNT")
        return cls(
            worker_id=get_worker_id(),
            limit_prefix=os.environ.get("PREFECT_GPU_LIMIT_PREFIX", "gpu:"),
            lock_root=Path(os.environ.get("PREFECT_GPU_LOCK_DIR", "/tmp/prefect-gpu-locks")),
            device_count=int(count) if count else None,
            lease_seconds=float(os.environ.get("PREFECT_GPU_LEASE_SECONDS", "60")),
        )

    @property
    def limit_name(self) -> str:
        return f"{self.limit_prefix}{self.worker_id}"

    @property
    def lock_dir(self) -> Path:
        return self.lock_root / self.worker_id

    def device_of(self, slot: int) -> int:
        """Slot i is device i, or i mod the device count when several slots share a GPU."""
        return slot % self.device_count if self.device_count else slot


@functools.cache
def _cuda_available() -> bool:
    # torch is optional and untyped here: imported by name, and only when a device is asked for.
    if importlib.util.find_spec("torch") is None:
        return False
    torch = importlib.import_module("torch")
    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class GpuLease:
    """What a gpu_slot() block holds: its limit and the device indices no other holder has."""

    limit_name: str
    devices: tuple[int, ...]

    @property
    def torch_device(self) -> str:
        """``cuda:<first device>`` when torch sees CUDA, else ``cpu``."""
        return f"cuda:{self.devices[0]}" if _cuda_available() else "cpu"

    @property
    def cuda_visible_devices(self) -> str:
        """For a GPU subprocess's environment: ``CUDA_VISIBLE_DEVICES=<this>``."""
        return ",".join(str(device) for device in self.devices)


# --- per-process lease keeper ------------------------------------------------------------------


@dataclass
class _Held:
    slot: SlotFile
    record: LeaseRecord | None  # None once the server lost it
    lease_seconds: float
    prefect: SyncPrefectClient  # the server that granted it


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
        self._wake = threading.Event()
        self._held: dict[UUID, _Held] = {}
        self._left: dict[UUID, _Left] = {}
        self._thread: threading.Thread | None = None

    def hold(
        self, slot: SlotFile, record: LeaseRecord, lease_seconds: float, prefect: SyncPrefectClient
    ) -> None:
        with self._lock:
            self._held[record.lease_id] = _Held(slot, record, lease_seconds, prefect)
            self._left.pop(record.lease_id, None)
            self._start()
        self._wake.set()

    def leave(self, slot: SlotFile, lease_id: UUID) -> None:
        """Unlock a held slot, leaving its lease on file for the next claimant if still valid."""
        with self._lock:
            held = self._held.pop(lease_id)
            if held.record is None:
                slot.write(None)  # the server dropped it: nobody may adopt it
            slot.unlock()
        if held.record is not None:
            self.park(slot, lease_id, held.prefect, delay=_PARK_SETTLE)

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
                self._renew_due()
                self._release_left(force=False)
            except Exception as error:  # keep the thread alive through server outages
                _logger().warning("gpu_slot lease upkeep failed (retrying in 1 s): %s", error)
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
        return max(0.0, min(dues))

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
                    _logger().warning(
                        "The Prefect server lost lease %s of a running gpu_slot() block: this "
                        "GPU is no longer counted in the limit until the block ends.",
                        lease_id,
                    )
                    held.record = None
                    held.slot.write(None)
                else:
                    held.record = LeaseRecord(lease_id, held.record.limit_id, expires)
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
                    left.due = time.monotonic() + _PARK_RETRY
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
                # else: adopted and held by someone else, who now owns the lease
                with self._lock:
                    if refused:
                        left.due = time.monotonic() + _PARK_RETRY
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
            _logger().debug("could not release left gpu_slot leases at exit: %s", error)


def _lock_gate(directory: Path, *, wait: float) -> int | None:
    """The node's gate, waiting up to ``wait`` seconds for it; None if it stayed busy."""
    if wait <= 0:
        return try_lock(directory / "gate.lock")
    try:
        return lock_wait(directory / "gate.lock", time.monotonic() + wait, None)
    except TimeoutError:
        return None


_keeper = _Keeper()
atexit.register(_keeper.flush)
os.register_at_fork(after_in_child=_keeper.reset)


# --- claiming ---------------------------------------------------------------------------------


@dataclass
class _Holding:
    """The slots one block holds, with their leases; ``release()`` hands them back."""

    config: SlotConfig
    slots: list[SlotFile]
    records: list[LeaseRecord] = field(default_factory=list)

    @property
    def lease(self) -> GpuLease:
        devices = tuple(self.config.device_of(slot.index) for slot in self.slots)
        return GpuLease(self.config.limit_name, devices)

    def release(self) -> None:
        for slot, record in zip(self.slots, self.records, strict=True):
            _keeper.leave(slot, record.lease_id)


class _Claim:
    """The queue head's search for ``gpus`` free slots whose leases it can adopt or acquire."""

    def __init__(
        self,
        config: SlotConfig,
        prefect: SyncPrefectClient,
        gpus: int,
        limit_id: UUID,
        limit: int,
        read_at: float,
    ) -> None:
        self.config = config
        self.prefect = prefect
        self.gpus = gpus
        self.limit_id = limit_id
        self.limit = limit
        self.read_at = read_at  # monotonic time the limit was read
        self.releasable = limit > 0  # see _gcl.release: nothing is released at limit 0
        self.span = self._span()

    def refresh(self) -> None:
        read_at = time.monotonic()
        self.limit_id, self.limit = _read_limit(self.config, self.prefect)
        self.read_at = read_at
        self.releasable = self.limit > 0
        self.span = self._span()

    def _span(self) -> int:
        """Slot files to look at: those below the limit and any older ones above it (held?)."""
        existing = [
            int(path.stem.removeprefix("slot-"))
            for path in self.config.lock_dir.glob("slot-*.lock")
            if path.stem.removeprefix("slot-").isdigit()
        ]
        return max([self.limit, *(index + 1 for index in existing)])

    def try_enter(self) -> _Holding | None:
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
                chosen = below[: self.gpus]
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
        if time.monotonic() - self.read_at < _LIMIT_REFRESH:
            return holding
        # Server calls in _attach (a 503 backoff, a restarting server) took long enough for the
        # limit to change meanwhile: a slot index may now be above it, and the server's count may
        # not cover every local holder (a re-created limit). Check the choice on a fresh read.
        try:
            self.refresh()
        except BaseException:
            holding.release()
            raise
        if busy + self.gpus <= self.limit and all(slot.index < self.limit for slot in chosen):
            return holding
        holding.release()  # the leases stay on their files: adopted or released later
        return None

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

    def _attach(self, chosen: list[SlotFile], records: dict[int, LeaseRecord | None]) -> _Holding:
        holding = _Holding(self.config, chosen)
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
                _keeper.park(slot, record.lease_id, self.prefect, delay=_PARK_RETRY)
            raise
        for slot, record in zip(chosen, holding.records, strict=True):
            _keeper.hold(slot, record, self.config.lease_seconds, self.prefect)
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
                record = LeaseRecord(record.lease_id, record.limit_id, expires)
                slot.write(record)
                return record
        elif record is not None:
            _gcl.release(self.prefect, record.lease_id)  # on an older incarnation of the limit
        slot.write(None)
        try:
            record = _gcl.acquire(self.prefect, self.config.limit_name, lease_seconds)
        except _gcl.LimitMissing:
            raise _missing_limit(self.config) from None
        slot.write(record)
        return record


def _missing_limit(config: SlotConfig) -> GpuLimitNotFoundError:
    return GpuLimitNotFoundError(
        f"The Prefect server has no global concurrency limit {config.limit_name!r}. The "
        f"prefect-gpu-operator creates one per GPU node: check that it is running and that a "
        f"GPULimitPolicy selects node {config.worker_id!r} (`kubectl get glp`). gpu_slot() never "
        f"creates limits itself (outside Kubernetes: `prefect gcl create {config.limit_name} "
        f"--limit <gpus>`)."
    )


def _read_limit(config: SlotConfig, prefect: SyncPrefectClient) -> tuple[UUID, int]:
    try:
        return _gcl.read_limit(prefect, config.limit_name)
    except _gcl.LimitMissing:
        raise _missing_limit(config) from None


def _acquire(
    config: SlotConfig,
    gpus: int,
    timeout_seconds: float | None,
    cancelled: threading.Event | None,
) -> _Holding:
    """Wait in the node's queue, then for ``gpus`` slots; raises GpuSlotTimeout at the deadline."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, not {gpus}")
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    prefect = _gcl.client()
    limit_id, limit = _read_limit(config, prefect)  # fail fast on a missing limit, before queueing
    read_at = time.monotonic()
    config.lock_dir.mkdir(parents=True, exist_ok=True)
    waiting = "other claimants on this node are ahead in the queue"
    try:
        gate = lock_wait(config.lock_dir / "gate.lock", deadline, cancelled)
    except TimeoutError:
        raise _timeout(config, timeout_seconds, waiting) from None
    try:
        claim = _Claim(config, prefect, gpus, limit_id, limit, read_at)
        logged: str | None = None
        while True:
            # Also on reaching the head of the queue: the read before it may be old by now.
            if time.monotonic() - claim.read_at >= _LIMIT_REFRESH:
                claim.refresh()
            pause = _POLL
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
                _logger().log(level, "gpu_slot waits: %s", waiting)  # the plain queue: DEBUG
                logged = waiting
            now = time.monotonic()
            if cancelled is not None and cancelled.is_set():
                raise Cancelled
            if deadline is not None and now >= deadline:
                raise _timeout(config, timeout_seconds, waiting)
            if deadline is not None:
                pause = min(pause, deadline - now)
            time.sleep(pause)
    finally:
        unlock(gate)


def _timeout(config: SlotConfig, timeout_seconds: float | None, waiting: str) -> GpuSlotTimeout:
    return GpuSlotTimeout(
        f"no GPU slot of {config.limit_name!r} within {timeout_seconds} s: {waiting}"
    )


# --- public API -------------------------------------------------------------------------------


@contextmanager
def gpu_slot(gpus: int = 1, timeout_seconds: float | None = None) -> Iterator[GpuLease]:
    """Hold ``gpus`` slots of this node's GPU limit and as many exclusive devices for the block.

    Waits (indefinitely, or up to ``timeout_seconds`` then raises GpuSlotTimeout) while the slots
    are busy or the node's limit is below ``gpus``. Raises MissingWorkerIdError without WORKER_ID
    and GpuLimitNotFoundError when the node has no limit. Sets no environment or CUDA state: use
    ``lease.torch_device`` or ``lease.cuda_visible_devices``.
    """
    holding = _acquire(SlotConfig.from_env(), gpus, timeout_seconds, None)
    try:
        yield holding.lease
    finally:
        holding.release()


@asynccontextmanager
async def async_gpu_slot(
    gpus: int = 1, timeout_seconds: float | None = None
) -> AsyncIterator[GpuLease]:
    """The async twin of gpu_slot(); cancelling the waiting task gives up its place at once."""
    config = SlotConfig.from_env()
    cancelled = threading.Event()
    granted: concurrent.futures.Future[_Holding] = concurrent.futures.Future()
    granted.set_running_or_notify_cancel()  # so asyncio's cancel cannot cancel it under the thread
    context = contextvars.copy_context()  # the run logger follows into the thread

    def wait() -> None:
        try:
            granted.set_result(context.run(_acquire, config, gpus, timeout_seconds, cancelled))
        except BaseException as error:
            granted.set_exception(error)

    # A thread of its own rather than the loop's executor: many blocks may wait at once.
    threading.Thread(target=wait, name="gpu-slot-acquire", daemon=True).start()
    try:
        holding = await asyncio.wrap_future(granted)
    except asyncio.CancelledError:
        cancelled.set()
        granted.add_done_callback(_release_if_granted)  # it may be granted before it notices
        raise
    try:
        yield holding.lease
    finally:
        holding.release()  # local unlocks only: safe and instant even when cancelled


def _release_if_granted(granted: concurrent.futures.Future[_Holding]) -> None:
    if granted.exception() is None:
        granted.result().release()
