"""Node-local ``flock`` files: the gate that queues claimers and one file per GPU slot; and the
doorbell (a FIFO) that a leaving holder rings to wake the head of the queue.

A slot file is locked by the process using that slot and records the Prefect lease that accounts
for it on the server (``{"lease_id", "limit_id", "expires"}``), or nothing. The kernel drops a
``flock`` the moment its holder closes the file or dies, so a free file whose record names a lease
holds either a lease left by a holder that exited or one left behind by a crashed holder: either
way the next claimant may adopt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

__all__ = [
    "Cancelled",
    "Doorbell",
    "LeaseRecord",
    "LimitReading",
    "SlotFile",
    "lock_wait",
    "read_reading",
    "ring",
    "try_lock",
    "unlock",
    "write_reading",
]

_WAIT_TICK = 0.05
"""How often (s) a waiter with a deadline or a cancel event looks at them while blocked."""


class Cancelled(Exception):
    """The waiter's cancel event was set (its async caller was cancelled)."""


@dataclass(frozen=True)
class LeaseRecord:
    """The Prefect lease (one GCL slot) attached to a slot file, and when it expires (epoch s).

    ``limit_id`` guards adoption: a lease on a limit that was deleted and re-created (a new id) no
    longer counts against the limit in force. ``pod`` is the uid of the pod under which the lease
    is published for the operator (``_gcl.register``), None while it is not.
    """

    lease_id: UUID
    limit_id: UUID
    expires: float
    pod: str | None = None


@dataclass(frozen=True)
class LimitReading:
    """The node's limit as last read from the server (``read_at``: epoch s, taken before the
    request), kept in ``gate.lock`` so that the next head of the queue need not read it again."""

    name: str
    limit_id: UUID
    limit: int
    read_at: float


def _read_json(fd: int) -> dict[str, object] | None:
    raw = os.pread(fd, 4096, 0)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None  # torn or foreign
    return data if isinstance(data, dict) else None


def _write_json(fd: int, data: dict[str, object] | None) -> None:
    os.ftruncate(fd, 0)
    if data is not None:
        os.pwrite(fd, json.dumps(data).encode(), 0)


def read_reading(gate: int) -> LimitReading | None:
    """The reading kept in the gate file; only meaningful while holding the gate."""
    data = _read_json(gate)
    if data is None:
        return None
    try:
        return LimitReading(
            str(data["name"]),
            UUID(str(data["limit_id"])),
            int(str(data["limit"])),
            float(str(data["read_at"])),
        )
    except (KeyError, ValueError):
        return None


def write_reading(gate: int, reading: LimitReading) -> None:
    data: dict[str, object] = {
        "name": reading.name,
        "limit_id": str(reading.limit_id),
        "limit": reading.limit,
        "read_at": reading.read_at,
    }
    _write_json(gate, data)


def _open(path: Path) -> int:
    # O_CLOEXEC: a GPU program exec'd by the holder must not inherit (and so prolong) the lock.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def try_lock(path: Path) -> int | None:
    """A new descriptor of ``path`` holding an exclusive flock, or None if someone holds it."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    """Drop the lock by closing the descriptor (the only way that also covers crashes)."""
    os.close(fd)


def lock_wait(path: Path, deadline: float | None, cancelled: threading.Event | None) -> int:
    """Block until ``path`` is locked; TimeoutError at ``deadline``, Cancelled on ``cancelled``.

    The kernel wakes a blocked ``flock`` the instant the holder lets go, so the blocking call runs
    in a helper thread while the caller watches its deadline; an abandoned helper unlocks as soon
    as it gets the lock.
    """
    fd = try_lock(path)
    if fd is not None:
        return fd
    fd = _open(path)
    if deadline is None and cancelled is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    got = threading.Event()
    guard = threading.Lock()
    abandoned = False

    def wait() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with guard:
            if abandoned:
                os.close(fd)
            else:
                got.set()

    threading.Thread(target=wait, name=f"flock-wait-{path.name}", daemon=True).start()
    while not got.wait(_WAIT_TICK):
        timed_out = deadline is not None and time.monotonic() >= deadline
        if timed_out or (cancelled is not None and cancelled.is_set()):
            with guard:
                if got.is_set():
                    break
                abandoned = True
            if timed_out:
                raise TimeoutError(path)
            raise Cancelled
    return fd


class SlotFile:
    """One GPU slot's lock file, held through ``fd`` while claimed."""

    def __init__(self, directory: Path, index: int) -> None:
        self.directory = directory
        self.index = index
        self.path = directory / f"slot-{index}.lock"
        self.fd: int | None = None

    def try_lock(self) -> bool:
        self.fd = try_lock(self.path)
        return self.fd is not None

    def unlock(self) -> None:
        if self.fd is not None:
            unlock(self.fd)
            self.fd = None

    def read(self) -> LeaseRecord | None:
        """The record; only meaningful while this process holds the lock."""
        assert self.fd is not None
        data = _read_json(self.fd)
        if data is None:
            return None
        try:
            pod = data.get("pod")
            return LeaseRecord(
                UUID(str(data["lease_id"])),
                UUID(str(data["limit_id"])),
                float(str(data["expires"])),
                pod if isinstance(pod, str) else None,
            )
        except (ValueError, KeyError):
            return None  # a torn or foreign record: treat as no lease (the server expires it)

    def write(self, record: LeaseRecord | None) -> None:
        assert self.fd is not None
        data: dict[str, object] | None = None
        if record is not None:
            data = {
                "lease_id": str(record.lease_id),
                "limit_id": str(record.limit_id),
                "expires": record.expires,
            }
            if record.pod is not None:
                data["pod"] = record.pod
        _write_json(self.fd, data)


_DOORBELL = "wake.fifo"


class Doorbell:
    """The head of the queue's end of the node's doorbell: ``wait()`` returns when a holder
    leaves a slot (``ring``) or after ``timeout``, the fallback for holders that die."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, directory: Path) -> Doorbell | None:
        """None where the lock directory cannot hold a FIFO: the head then only polls."""
        path = directory / _DOORBELL
        try:
            os.mkfifo(path, 0o666)
        except FileExistsError:
            pass
        except OSError:
            return None
        try:
            # Read and write: with a writer of its own the FIFO never reads as closed (EOF)
            # between rings, so select() sleeps until a byte arrives.
            return cls(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            return None

    def wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.fd, 4096)  # all rings so far: one look covers them

    def close(self) -> None:
        os.close(self.fd)


def ring(directory: Path) -> None:
    """Wake the node's head of the queue, if one waits; without one there is nothing to do."""
    try:
        fd = os.open(directory / _DOORBELL, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # no head has it open (ENXIO), or there never was one (ENOENT)
    try:
        os.write(fd, b"\0")
    except OSError:
        pass  # full: the head has rings waiting already
    finally:
        os.close(fd)
