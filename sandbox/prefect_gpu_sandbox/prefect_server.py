"""A real Prefect server on 127.0.0.1 with its own PREFECT_HOME, on SQLite or a given database;
and Prefect's background services in a process of their own, as a highly available server runs
them beside API replicas started without them."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prefect_gpu_sandbox.processes import ServerProcess, Service, free_port

__all__ = ["PrefectServer", "PrefectServices", "server_environment"]

_READY_TIMEOUT = 120.0


def server_environment(home: Path, database_url: str | None = None) -> dict[str, str]:
    """Settings for a private, quiet server whose concurrency leases survive restarts."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": (
            database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}"
        ),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        # The default in-memory lease storage forgets held slots on restart and leaks them.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
            "prefect.server.concurrency.lease_storage.filesystem"
        ),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def _environment(home: Path, database_url: str | None, settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without its Prefect settings (a caller's profile must not leak
    into the server), then the server's, then ``settings``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(server_environment(home, database_url))
    env.update(settings)
    return env


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


@dataclass
class PrefectServer(Service):
    """``prefect server start`` in a process group; ``start()`` returns once /api/health is ok.

    ``host`` is the address it listens on; ``launcher`` prefixes its command (a node's network
    namespace runs it under ``nsenter``, listening on all of the namespace's addresses). Either
    way this process reaches it at ``api_url``, on 127.0.0.1. ``services=False`` starts the API
    only (``--no-services``), as each replica of a highly available server runs.
    """

    home: Path
    database_url: str | None = None  # None: SQLite in ``home``
    port: int = field(default_factory=free_port)
    # More server settings, e.g. PREFECT_SERVER_API_AUTH_STRING or CSRF protection.
    settings: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    launcher: Sequence[str] = ()
    services: bool = True
    process: ServerProcess | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the server without waiting for it (``wait_ready`` does)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.process = ServerProcess(
            "prefect-server",
            [
                *self.launcher,
                *(_prefect(), "server", "start"),
                *("--host", self.host, "--port", str(self.port)),
                *(() if self.services else ("--no-services",)),
            ],
            log_path=self.home / "server.log",
            env=_environment(self.home, self.database_url, self.settings),
        )
        self.process.start()

    def wait_ready(self) -> None:
        if self.process is None:
            raise RuntimeError("the Prefect server was not launched")
        self.process.wait_ready(self.healthy, timeout=_READY_TIMEOUT)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class PrefectServices(Service):
    """``prefect server services start``: Prefect's background services (the lease repossessor
    among them) in one process, beside API replicas started with ``services=False``.

    It serves no HTTP, so ``start()`` waits for its log to say that the repossessor is scheduled.
    """

    home: Path
    database_url: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    process: ServerProcess | None = None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        # INFO from the server's loggers: the line start() waits for.
        settings = {"PREFECT_SERVER_LOGGING_LEVEL": "INFO", **self.settings}
        self.process = ServerProcess(
            "prefect-services",
            [_prefect(), "server", "services", "start"],
            log_path=self.home / "services.log",
            env=_environment(self.home, self.database_url, settings),
        )
        self.process.start()
        self.process.wait_ready(self.scheduled, timeout=_READY_TIMEOUT)

    def scheduled(self) -> bool:
        """Whether the services scheduled the lease repossessor (``monitor_expired_leases``)."""
        if self.process is None:
            return False
        try:
            log = self.process.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return False
        return "Scheduling perpetual service: monitor_expired_leases" in log

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
