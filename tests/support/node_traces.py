"""What a stopped node may have left on this machine, found without asking the node's code."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from prefect_gpu_sandbox.processes import process_alive

__all__ = ["lasting_traces", "node_traces"]


def _proc_text(pid: str, name: str) -> str:
    with contextlib.suppress(OSError):
        return (Path("/proc") / pid / name).read_bytes().replace(b"\0", b" ").decode()
    return ""


def node_traces(directory: Path, netns: str, pids: Iterable[int]) -> list[str]:
    """Processes (the recorded ones, any naming ``directory``, any in the node's cgroups),
    mounts under ``directory``, the network namespace and its cgroups, if any is left."""
    traces = [f"process {pid}" for pid in pids if process_alive(pid)]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_alive(int(entry.name)):
            command = _proc_text(entry.name, "cmdline")
            if str(directory) in command or f"/{netns}/" in _proc_text(entry.name, "cgroup"):
                state = _proc_text(entry.name, "stat").rsplit(")", 1)[-1].split()[:1]
                traces.append(f"process {entry.name} ({' '.join(state)}): {command}")
    mounts = Path("/proc/mounts").read_text().splitlines()
    traces += [f"mount {line}" for line in mounts if str(directory) in line]
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    traces += [f"netns {line}" for line in listing.stdout.splitlines() if netns in line]
    traces += [f"cgroup {group}" for group in Path("/sys/fs/cgroup").glob(f"*/{netns}")]
    return traces


def lasting_traces(
    directory: Path, netns: str, pids: Iterable[int], *, grace: float = 10.0
) -> list[str]:
    """The node's traces still there after up to ``grace`` seconds: a process killed with the
    node may take a moment to finish exiting (the init of a pod's shared process namespace waits
    for all the others)."""
    pids = list(pids)
    deadline = time.monotonic() + grace
    while (traces := node_traces(directory, netns, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return traces
