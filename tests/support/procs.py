"""Which processes this test process started and that still run."""

from __future__ import annotations

import os
from pathlib import Path

from prefect_gpu_sandbox.processes import descendants

__all__ = ["surviving_children"]


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def surviving_children() -> list[tuple[int, str]]:
    """This process's live descendants, with their command lines."""
    return [(pid, _command_line(pid) or name) for pid, name in descendants(os.getpid())]
