"""``prefect-gpu-slots [NODE]``: who holds a node's GPU slots and who waits, read from the node's
lock directory (``PREFECT_GPU_LOCK_DIR``, one folder per node) where ``gpu_slot()`` runs, e.g.
``kubectl exec <worker pod> -- prefect-gpu-slots``. ``--json`` prints the same as data,
``--metrics`` as Prometheus text (for a textfile collector), and ``--serve [HOST:]PORT`` serves
that on ``/metrics``, read afresh at each scrape (``_slots_metrics``). It asks the Prefect server
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from prefect_gpu_flows._config import SlotConfig
from prefect_gpu_flows._presence import NodeSlots, node_slots
from prefect_gpu_flows._slots_metrics import exposition, node_names, parse_address, serve

__all__ = ["NodeSlots", "main", "node_slots"]


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


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefect-gpu-slots", description=__doc__)
    parser.add_argument("node", nargs="?", help="one node (default: every node in the directory)")
    default = os.environ.get("PREFECT_GPU_LOCK_DIR", str(SlotConfig.lock_root))
    parser.add_argument("--lock-dir", type=Path, default=Path(default), help=f"default {default}")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the view as JSON")
    shown.add_argument("--metrics", action="store_true", help="print Prometheus text")
    shown.add_argument(
        "--serve",
        metavar="[HOST:]PORT",
        type=_address,
        help="serve the metrics on /metrics, read afresh at each scrape, until SIGTERM",
    )
    args = parser.parse_args(argv)
    root: Path = args.lock_dir
    if args.serve is not None:
        # A node may have no directory yet (no gpu_slot() block so far): it is served as idle.
        serve(root, args.node, args.serve)
        return 0
    names = node_names(root, args.node)
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
        sys.stdout.write(exposition(nodes, now) if args.metrics else _text(nodes, now) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
