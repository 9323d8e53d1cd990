"""The namespaces a node lives in: a named network namespace (``ip netns``) and a private mount
namespace, and the ways into them.

Processes enter with ``nsenter``, never ``ip netns exec``: the latter also remounts /sys for the
command, which hides the cgroup mounts the kubelet needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NETNS_DIR", "MountNamespace", "NetworkNamespace", "enter_network", "run"]

NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000


def enter_network(path: Path) -> None:
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


def run(argv: Sequence[str], *, timeout: float = 60) -> str:
    """Run ``argv``; return its output, raise with its error output if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


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
        run(["ip", "netns", "add", self.name])
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        run(["ip", "-n", self.name, "addr", "add", f"{address}/32", "dev", "lo"])
        run(self.command(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (nsenter execs it: the pid stays the command's)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

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
            run(["ip", "netns", "delete", self.name])


@dataclass(frozen=True)
class MountNamespace:
    """A mount namespace pinned at ``directory/mnt``: what its processes mount stays in it (this
    machine's mounts still reach it), and directories of its own stand in for machine-wide ones
    (a kubelet's /var/lib/kubelet). Unmounting the pin and the directory ends it once its last
    process is gone, and every mount in it with it."""

    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / "mnt"

    def create(self, binds: Mapping[Path, Path]) -> None:
        """Make it, with each ``binds`` source mounted over its target inside it."""
        # A namespace can only be pinned on a file whose mount is private.
        self.directory.mkdir(parents=True, exist_ok=True)
        run(["mount", "--bind", str(self.directory), str(self.directory)])
        run(["mount", "--make-private", str(self.directory)])
        self.path.touch()
        run(["unshare", f"--mount={self.path}", "--propagation=slave", "true"])
        for source, target in binds.items():
            source.mkdir(parents=True, exist_ok=True)
            target.mkdir(parents=True, exist_ok=True)  # a mount point, empty on this machine
            run(self.command(["mount", "--bind", str(source), str(target)]))

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--mount={self.path}", "--", *argv]
