"""A flow-run stand-in for the chaos test: loops gpu_slot() and records every attempt as JSON lines.

``python -m tests.integration.chaos.worker --records FILE --stop PATH [--timeout S]
[--hold-min S] [--hold-max S] [--attempts N]``; WORKER_ID, PREFECT_GPU_LOCK_DIR and
PREFECT_API_URL come from the environment. Until PATH exists (or N attempts were made), each
attempt is one ``with gpu_slot(timeout_seconds=S)`` block held for a random time in
[hold-min, hold-max]; the attempt in progress always finishes.

One line per event, ``t`` from ``time.monotonic()`` (one clock for every process on the machine):
``{"pid", "node", "attempt", "event", "t", "devices", "error"}`` where event is ``ready`` (once),
``attempt`` (about to call gpu_slot), then ``enter`` + ``exit`` (taken just inside the block and
just before leaving it, so a logged interval lies within the real one), or ``timeout``
(GpuSlotTimeout), ``missing`` (GpuLimitNotFoundError: the node's limit does not exist) or
``error`` (anything else: a lost task).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
import traceback
from pathlib import Path
from typing import IO, Any

from prefect_gpu_flows import GpuLimitNotFoundError, GpuSlotTimeout, gpu_slot

_MISSING_PAUSE = 0.25
"""Pause after a missing limit (the node is gone), so a worker does not spin on the server."""


def _record(stream: IO[str], **fields: Any) -> None:
    stream.write(json.dumps(fields) + "\n")
    stream.flush()  # the test reads the files after the processes exit; flush so nothing is lost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--stop", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--hold-min", type=float, default=0.05)
    parser.add_argument("--hold-max", type=float, default=0.3)
    parser.add_argument("--attempts", type=int, default=0, help="stop after this many (0: no)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    node = os.environ["WORKER_ID"]
    pid = os.getpid()
    rng = random.Random(pid)
    with args.records.open("a") as stream:

        def record(event: str, attempt: int, t: float, **extra: Any) -> None:
            _record(stream, pid=pid, node=node, attempt=attempt, event=event, t=t, **extra)

        record("ready", 0, time.monotonic())
        attempt = 0
        while not args.stop.exists() and not (args.attempts and attempt >= args.attempts):
            attempt += 1
            hold = rng.uniform(args.hold_min, args.hold_max)
            record("attempt", attempt, time.monotonic())
            try:
                with gpu_slot(timeout_seconds=args.timeout) as lease:
                    record("enter", attempt, time.monotonic(), devices=list(lease.devices))
                    time.sleep(hold)
                    record("exit", attempt, time.monotonic(), devices=list(lease.devices))
            except GpuSlotTimeout:
                record("timeout", attempt, time.monotonic())
            except GpuLimitNotFoundError:
                record("missing", attempt, time.monotonic())
                time.sleep(_MISSING_PAUSE)
            except Exception as error:
                traceback.print_exc()  # into the worker's log, to see where it was lost
                record("error", attempt, time.monotonic(), error=repr(error))
                time.sleep(_MISSING_PAUSE)


if __name__ == "__main__":
    main()
