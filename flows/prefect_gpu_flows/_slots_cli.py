"""``prefect-gpu-slots [NODE]``: who holds a node's GPU slots and who waits, read from the node's
lock directory (``PREFECT_GPU_LOCK_DIR``, one folder per node) where ``gpu_slot()`` runs, e.g.
``kubectl exec <worker pod> -- prefect-gpu-slots``. ``--json`` prints the same as data and
``--metrics`` as Prometheus text (for a textfile collector). It asks the Prefect server nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect_gpu_flows._config import SlotConfig
from prefect_gpu_flows._locks import read_reading
from prefect_gpu_flows._presence import Presence, holders, waiters

__all__ = ["NodeSlots", "main", "node_slots"]


@dataclass(frozen=True)
class NodeSlots:
    node: str
    limit: int | None  # as the node's claimers last read it from the server; None: never read
    holders: list[Presence]
    waiters: list[Presence]


def node_slots(directory: Path) -> NodeSlots:
    limit = None
    with contextlib.suppress(OSError):
        fd = os.open(directory / "gate.lock", os.O_RDONLY)
        try:
            reading = read_reading(fd)
        finally:
            os.close(fd)
        limit = reading.limit if reading is not None else None
    return NodeSlots(directory.name, limit, holders(directory), waiters(directory))


def _age(since: float, now: float) -> str:
    return f"{max(0.0, now - since):.1f} s"


def _text(nodes: Sequence[NodeSlots], now: float) -> str:
    lines = []
    for node in nodes:
        limit = "unknown" if node.limit is None else str(node.limit)
        lines.append(
            f"node {node.node}: limit {limit}, {len(node.holders)} held, "
            f"{len(node.waiters)} waiting"
        )
        lines.append(f"  {'SLOT':<5}{'DEVICE':<42}{'PID':<8}{'TASK':<20}{'FLOW RUN':<38}SINCE")
        for held in node.holders:
            lines.append(
                f"  {held.slot!s:<5}{held.device or '':<42}{held.pid:<8}{held.task or '-':<20}"
                f"{held.flow_run or '-':<38}{_age(held.since, now)}"
            )
        if node.waiters:
            lines.append(f"  {'WAITING':<5}{'GPUS':<42}{'PID':<8}{'TASK':<20}{'FLOW RUN':<38}FOR")
            for waiter in node.waiters:
                lines.append(
                    f"  {'':<7}{waiter.gpus:<40}{waiter.pid:<8}{waiter.task or '-':<20}"
                    f"{waiter.flow_run or '-':<38}{_age(waiter.since, now)}"
                )
    return "\n".join(lines)


def _metrics(nodes: Sequence[NodeSlots], now: float) -> str:
    """Gauges per node: the limit as last read, slots held, processes waiting, the longest
    wait, and how long each slot has been held."""
    lines = [
        "# HELP prefect_gpu_slots_limit The node's GPU limit as its claimers last read it.",
        "# TYPE prefect_gpu_slots_limit gauge",
        "# HELP prefect_gpu_slots_held Slots of the node held by gpu_slot() blocks.",
        "# TYPE prefect_gpu_slots_held gauge",
        "# HELP prefect_gpu_slots_waiting Processes waiting for slots of the node.",
        "# TYPE prefect_gpu_slots_waiting gauge",
        "# HELP prefect_gpu_slots_longest_wait_seconds How long the longest waiter has waited.",
        "# TYPE prefect_gpu_slots_longest_wait_seconds gauge",
        "# HELP prefect_gpu_slot_held_seconds How long each held slot has been held.",
        "# TYPE prefect_gpu_slot_held_seconds gauge",
    ]
    for node in nodes:
        label = f'node="{node.node}"'
        if node.limit is not None:
            lines.append(f"prefect_gpu_slots_limit{{{label}}} {node.limit}")
        lines.append(f"prefect_gpu_slots_held{{{label}}} {len(node.holders)}")
        lines.append(f"prefect_gpu_slots_waiting{{{label}}} {len(node.waiters)}")
        longest = max((now - waiter.since for waiter in node.waiters), default=0.0)
        lines.append(f"prefect_gpu_slots_longest_wait_seconds{{{label}}} {longest:.3f}")
        for held in node.holders:
            slot = f'{label},slot="{held.slot}",device="{held.device}"'
            lines.append(f"prefect_gpu_slot_held_seconds{{{slot}}} {now - held.since:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefect-gpu-slots", description=__doc__)
    parser.add_argument("node", nargs="?", help="one node (default: every node in the directory)")
    default = os.environ.get("PREFECT_GPU_LOCK_DIR", str(SlotConfig.lock_root))
    parser.add_argument("--lock-dir", type=Path, default=Path(default), help=f"default {default}")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the view as JSON")
    shown.add_argument("--metrics", action="store_true", help="print Prometheus text")
    args = parser.parse_args(argv)
    root: Path = args.lock_dir
    names = [args.node] if args.node else sorted(p.name for p in root.glob("*") if p.is_dir())
    missing = [name for name in names if not (root / name).is_dir()]
    if missing or not names:
        print(
            f"no gpu_slot() lock directory for {', '.join(missing) or 'any node'} under {root}: "
            "run this where the flow runs run (PREFECT_GPU_LOCK_DIR, WORKER_ID)",
            file=sys.stderr,
        )
        return 1
    nodes = [node_slots(root / name) for name in names]
    now = time.time()
    if args.json:
        print(json.dumps([asdict(node) for node in nodes], indent=2))
    else:
        print(_metrics(nodes, now) if args.metrics else _text(nodes, now))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
