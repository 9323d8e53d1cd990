"""Which processes this test process started and that still run."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["descendants", "surviving_children"]


def _parents() -> dict[int, tuple[int, str, str]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        table[int(entry.name)] = (int(ppid), state, name)
    return table


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def descendants(pid: int) -> list[tuple[int, str]]:
    """Live (non-zombie) descendants of ``pid`` as (pid, command name)."""
    table = _parents()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, state, name) in table.items():
            if ppid == parent:
                frontier.append(child)
                if state != "Z":
                    found.append((child, _command_line(child) or name))
    return found


def surviving_children() -> list[tuple[int, str]]:
    return descendants(os.getpid())
