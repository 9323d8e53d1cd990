"""A flow-run stand-in for the gpu_slot tests: holds gpu_slot() and logs what it did as JSON lines.

``python -m tests.integration._gpu_slot_holder --events FILE [--units N] [--hold S | --until PATH]``
Each line: ``{"pid", "event": "enter"|"exit"|"timeout", "t": epoch s, "devices": [...]}``; an
"enter" line adds ``"visible"``, the ``CUDA_VISIBLE_DEVICES`` the block saw, and ``"pinned"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from prefect_gpu_flows import GpuSlotTimeout, gpu_slot


def _log(events: Path, event: str, devices: tuple[str, ...] = (), **more: object) -> None:
    record = {"pid": os.getpid(), "event": event, "t": time.time(), "devices": devices, **more}
    line = json.dumps(record)
    with events.open("a") as stream:  # one short append per line: lines never interleave
        stream.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--units", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--until", type=Path, help="hold until this file exists")
    parser.add_argument("--timeout", type=float)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    _log(args.events, "start")
    for _ in range(args.units):
        try:
            with gpu_slot(args.gpus, timeout_seconds=args.timeout) as lease:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                _log(args.events, "enter", lease.devices, visible=visible, pinned=lease.pinned)
                if args.until is not None:
                    while not args.until.exists():
                        time.sleep(0.01)
                time.sleep(args.hold)
                _log(args.events, "exit", lease.devices)
        except GpuSlotTimeout:
            _log(args.events, "timeout")
            raise SystemExit(3) from None


if __name__ == "__main__":
    main()
