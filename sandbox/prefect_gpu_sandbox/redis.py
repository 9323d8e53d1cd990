"""A throwaway Redis on 127.0.0.1 for highly available Prefect, from Debian's ``redis-server``.

Prefect's API replicas share concurrency leases, messaging and the docket through it
(``prefect-redis``). The package is installed with apt-get when it is missing (as root). No
persistence and no password: it listens on loopback only, in a directory of its own, and lives
as long as the test.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from prefect_gpu_sandbox.debian import ensure_packages
from prefect_gpu_sandbox.processes import ServerProcess, Service, free_port

__all__ = ["RedisServer", "redis_server_bin"]

_READY_TIMEOUT = 30.0
_BINARY = Path("/usr/bin/redis-server")


def redis_server_bin(*, install: bool = True) -> Path:
    """Debian's redis-server, installed first when it is missing."""
    if not _BINARY.exists() and install:
        ensure_packages("redis-server")
    if not _BINARY.exists():
        raise FileNotFoundError(
            "Redis is not installed: run `apt-get install -y redis-server` (Debian) first"
        )
    return _BINARY


class RedisServer(Service):
    """``redis-server`` in a fresh directory; ``url`` is for Prefect's docket."""

    def __init__(self) -> None:
        self._bin = redis_server_bin()  # installs it, or fails before anything is made
        self.host = "127.0.0.1"
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="prefect-gpu-operator-redis-"))
        self.process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        self.process = ServerProcess(
            "redis-server",
            [
                str(self._bin),
                *("--bind", self.host, "--port", str(self.port)),
                *("--dir", str(self.directory)),
                *("--save", "", "--appendonly", "no"),  # nothing outlives the test
                *("--daemonize", "no", "--protected-mode", "yes"),
                *("--logfile", ""),  # to stdout, which is the process's log file
            ],
            log_path=self.directory / "redis.log",
        )
        self.process.start()
        self.process.wait_ready(self.ping, timeout=_READY_TIMEOUT)

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)
