"""A named network namespace (``ip netns``) for the node, and the ways into it.

Processes enter it through ``nsenter --net=PATH``, never ``ip netns exec``: the latter also
remounts /sys for the command, which hides the cgroup mounts the kubelet needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NETNS_DIR", "NetworkNamespace", "enter"]

NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000


def enter(path: Path) -> None:
    """Move the calling thread into the network namespace at ``path``; threads it starts later
    follow it. (Python 3.11 has no os.setns.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(descriptor, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({path}): {os.strerror(error)}")
    finally:
        os.close(descriptor)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class NetworkNamespace:
    """``/var/run/netns/NAME``: a network namespace that lives until ``delete()``."""

    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def exists(self) -> bool:
        return self.path.exists()

    def create(self, address: str) -> None:
        """Make it with loopback up, ``address`` (a /32) on loopback and IP forwarding on, so
        traffic between the pods' bridge and the node's address is routed."""
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("-n", self.name, "addr", "add", f"{address}/32", "dev", "lo")
        self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (nsenter execs it: the pid stays the command's)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(self, argv: Sequence[str], *, timeout: float = 60) -> str:
        """Run ``argv`` inside the namespace; return its output, raise if it fails."""
        done = subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name}: {done.stderr.strip()}")
        return done.stdout

    def members(self) -> list[int]:
        """Processes whose network namespace this is (what ``ip netns pids`` lists)."""
        try:
            target = self.path.stat()
        except FileNotFoundError:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):  # gone, or a kernel thread
                inode = (entry / "ns" / "net").stat()
                if (inode.st_dev, inode.st_ino) == (target.st_dev, target.st_ino):
                    found.append(int(entry.name))
        return found

    def delete(self) -> None:
        if self.exists():
            _ip("netns", "delete", self.name)
