"""Who holds and who waits for a node's GPU slots, as only the node knows it.

Each block inside ``gpu_slot()`` writes a small record beside each slot file it holds
(``slot-<i>.holder``: its process, run, task, device and since when), and each claimer that is
still waiting writes one into ``waiting/``; both go when the block ends or the claimer stops
waiting. A record whose process is gone (killed, its file left behind) is not shown: a record
names its process by pid and start time, so a reused pid does not revive it. Reading them costs
the server nothing (``prefect-gpu-slots``, ``_slots_cli``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect_gpu_flows._locks import read_reading

__all__ = ["NodeSlots", "Presence", "holders", "holding", "node_slots", "waiters", "waiting"]

_WAITING = "waiting"


@dataclass(frozen=True)
class Presence:
    """A process holding (``slot`` and ``device`` set) or waiting for slots of the node."""

    pid: int
    started: str  # the process's start time (/proc/<pid>/stat), against pid reuse
    since: float  # epoch seconds: when it entered, or began to wait
    flow_run: str | None
    task_run: str | None
    task: str | None
    gpus: int
    slot: int | None = None
    device: str | None = None


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def _current_run() -> tuple[str | None, str | None, str | None]:
    """The flow run, task run and task name this code runs in, if any."""
    from prefect.context import FlowRunContext, TaskRunContext

    task = TaskRunContext.get()
    flow = FlowRunContext.get()
    flow_run = flow.flow_run if flow is not None else None
    return (
        str(flow_run.id) if flow_run is not None else None,
        str(task.task_run.id) if task is not None else None,
        task.task.name if task is not None else None,
    )


def _me(gpus: int, slot: int | None = None, device: str | None = None) -> Presence:
    flow_run, task_run, task = _current_run()
    pid = os.getpid()
    started = _process_start(pid) or ""
    return Presence(pid, started, time.time(), flow_run, task_run, task, gpus, slot, device)


def _write(path: Path, presence: Presence) -> None:
    # Replaced whole, so a reader never sees half a record.
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    partial.write_text(json.dumps(asdict(presence)), encoding="utf-8")
    partial.replace(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def waiting(directory: Path, gpus: int) -> Iterator[None]:
    """Record this process as waiting for ``gpus`` slots of the node for the block."""
    folder = directory / _WAITING
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    _write(path, _me(gpus))
    try:
        yield
    finally:
        _remove(path)


@contextlib.contextmanager
def holding(directory: Path, slots: Sequence[int], devices: Sequence[str]) -> Iterator[None]:
    """Record this process as the holder of ``slots`` (on ``devices``) for the block."""
    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    try:
        me = _me(len(slots))
        for slot, device in zip(slots, devices, strict=True):
            path = directory / f"slot-{slot}.holder"
            _write(path, Presence(**{**asdict(me), "slot": slot, "device": device}))
            paths.append(path)
        yield
    finally:
        for path in paths:
            _remove(path)


def _read(paths: Iterator[Path]) -> list[Presence]:
    found = []
    for path in paths:
        try:
            presence = Presence(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue  # gone meanwhile, or not one of ours
        if _process_start(presence.pid) == presence.started:  # alive, and the same process
            found.append(presence)
    return found


def holders(directory: Path) -> list[Presence]:
    """The live holders of the node's slots, by slot."""
    return sorted(_read(directory.glob("slot-*.holder")), key=lambda p: p.slot or 0)


def waiters(directory: Path) -> list[Presence]:
    """The live waiters for the node's slots, longest waiting first."""
    return sorted(_read((directory / _WAITING).glob("*.json")), key=lambda p: p.since)


@dataclass(frozen=True)
class NodeSlots:
    """One node's holders and waiters, as its lock directory shows them."""

    node: str
    limit: int | None  # as the node's claimers last read it from the server; None: never read
    holders: list[Presence]
    waiters: list[Presence]


def node_slots(directory: Path) -> NodeSlots:
    """The node whose lock directory this is; a directory not made yet shows an idle node."""
    limit = None
    with contextlib.suppress(OSError):
        fd = os.open(directory / "gate.lock", os.O_RDONLY)
        try:
            reading = read_reading(fd)
        finally:
            os.close(fd)
        limit = reading.limit if reading is not None else None
    return NodeSlots(directory.name, limit, holders(directory), waiters(directory))
