"""What a node leaves on the machine outside its processes: mounts and cgroups."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "cgroup_hierarchies",
    "cgroup_processes",
    "make_cgroup",
    "mount_points",
    "mounts_under",
    "remove_cgroup",
    "unmount",
]

_MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def mount_points(mountinfo: str) -> list[tuple[Path, str]]:
    """(mount point, filesystem type) of each line of a /proc/PID/mountinfo text."""
    found = []
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        if tail:
            found.append((Path(_unescape(fields.split()[4])), tail.split()[0]))
    return found


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory``, deepest first (the order to unmount them)."""
    found = {
        point
        for point, _ in mount_points(_MOUNTINFO.read_text())
        if point == directory or directory in point.parents
    }
    return sorted(found, key=lambda point: len(point.parts), reverse=True)


def unmount(points: Iterable[Path]) -> None:
    """Lazily unmount ``points``: a busy one is detached now and released when last used."""
    targets = [str(point) for point in points]
    if targets:
        # Unmounting a parent first detaches its children too: "not mounted" then is fine.
        subprocess.run(["umount", "--lazy", *targets], capture_output=True, check=False)


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: each v1 controller's, and the v2 one."""
    return [
        point
        for point, kind in mount_points(_MOUNTINFO.read_text())
        if kind in ("cgroup", "cgroup2")
    ]


def make_cgroup(name: str) -> None:
    """Create the cgroup ``/name`` in every hierarchy. A v1 cpuset starts with no CPUs and no
    memory nodes, so it gets its parent's."""
    for hierarchy in cgroup_hierarchies():
        group = hierarchy / name
        group.mkdir(exist_ok=True)
        for setting in ("cpuset.cpus", "cpuset.mems"):
            if (hierarchy / setting).exists() and not (group / setting).read_text().strip():
                (group / setting).write_text((hierarchy / setting).read_text())


def _tree(group: Path) -> list[Path]:
    """``group`` and every cgroup below it, deepest first."""
    if not group.is_dir():
        return []
    below = [path for path in group.rglob("*") if path.is_dir()]
    return sorted([group, *below], key=lambda path: len(path.parts), reverse=True)


def cgroup_processes(name: str) -> set[int]:
    """Processes in the cgroup ``/name`` or below it, in any hierarchy."""
    found: set[int] = set()
    for hierarchy in cgroup_hierarchies():
        for group in _tree(hierarchy / name):
            with contextlib.suppress(OSError):  # removed meanwhile
                found.update(int(pid) for pid in (group / "cgroup.procs").read_text().split())
    return found


def remove_cgroup(name: str) -> list[Path]:
    """Remove ``/name`` and the cgroups below it; return those that could not be (still used)."""
    left = []
    for hierarchy in cgroup_hierarchies():
        for group in _tree(hierarchy / name):
            try:
                group.rmdir()
            except OSError:
                left.append(group)
    return left
