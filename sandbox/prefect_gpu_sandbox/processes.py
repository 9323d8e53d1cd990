"""Start server processes in their own process group, wait for them with deadlines, stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from prefect_gpu_sandbox.waiting import WaitTimeout, eventually

__all__ = [
    "ServerProcess",
    "Service",
    "descendants",
    "free_port",
    "group_members",
    "interrupt_safe",
    "process_alive",
    "stop_process_group",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class _Stat:
    pid: int
    name: str
    state: str
    ppid: int
    pgid: int


def _stat(entry: Path) -> _Stat | None:
    try:
        text = (entry / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    # The command name sits in parentheses and may itself contain spaces or parentheses.
    name = text[text.index("(") + 1 : text.rindex(")")]
    state, ppid, pgid = text.rsplit(")", 1)[1].split()[:3]
    return _Stat(int(entry.name), name, state, int(ppid), int(pgid))


def _processes() -> Iterator[_Stat]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(entry)) is not None:
            yield stat


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    stat = _stat(Path(f"/proc/{pid}"))
    return stat is not None and stat.state != "Z"


def group_members(pgid: int) -> list[int]:
    """Live members of process group ``pgid``."""
    return [p.pid for p in _processes() if p.pgid == pgid and p.state != "Z"]


def descendants(pid: int) -> list[tuple[int, str]]:
    """Live descendants of ``pid`` as (pid, command name). A process worker starts each flow run
    in a session of its own, out of the worker's process group, so only this finds them all."""
    table = list(_processes())
    found: list[tuple[int, str]] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child in table:
            if child.ppid == parent:
                frontier.append(child.pid)
                if child.state != "Z":
                    found.append((child.pid, child.name))
    return found


def interrupt_safe(function: Callable[[], None]) -> None:
    """Run a clean-up step with Ctrl-C held back, so a second Ctrl-C cannot cut it short."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function()
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_process_group(pgid: int, *, timeout: float = 10.0) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        eventually(lambda: not group_members(pgid), timeout=5, what=f"process group {pgid}")


class Service:
    """Servers started and stopped as one. As a context manager it is stopped on the way out,
    also when starting failed half-way (``stop`` must cope with a partial start)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServerProcess:
    """One server binary, started as the leader of a new process group, output to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._popen.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # own process group: stop() reaches its children too
            )

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_ready(self, condition: Callable[[], bool], *, timeout: float) -> None:
        try:
            eventually(condition, timeout=timeout, what=self.name, alive=self.running)
        except (WaitTimeout, RuntimeError) as error:
            tail = self.log_tail()
            raise RuntimeError(f"{error}; last lines of {self.log_path}:\n{tail}") from None

    def stop(self, timeout: float = 10.0) -> None:
        if self._popen is None:
            return
        stop_process_group(self._popen.pid, timeout=timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a node failure or the OOM killer would.

        No handler runs, so nothing is cleaned up on the way out (``stop`` sends SIGTERM first).
        """
        if self._popen is None:
            return
        pgid = self._popen.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        eventually(lambda: not group_members(pgid), timeout=5, what=f"process group {pgid}")
        self._popen.wait(timeout=5)
