"""Where a benchmarked process's memory goes: with ``MEMTRACE_OUT`` set, trace allocations and
write the top allocation sites at the highest traced memory seen (sampled every 0.2 s) there.

Loaded by putting this directory on the process's PYTHONPATH; it does nothing otherwise.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path


def _watch(out: Path) -> None:
    best = 0
    while True:
        time.sleep(0.2)
        current, _ = tracemalloc.get_traced_memory()
        if current <= best * 1.05:
            continue
        best = current
        snapshot = tracemalloc.take_snapshot()
        lines = [f"traced {current / 2**20:.1f} MiB at {time.strftime('%H:%M:%S')}"]
        for key in ("filename", "lineno"):
            lines.append(f"-- top by {key}")
            lines += [str(stat) for stat in snapshot.statistics(key)[:25]]
        out.write_text("\n".join(lines) + "\n")


if os.environ.get("MEMTRACE_OUT"):
    tracemalloc.start()
    threading.Thread(target=_watch, args=(Path(os.environ["MEMTRACE_OUT"]),), daemon=True).start()
