"""A throwaway PostgreSQL server on 127.0.0.1 for Prefect, from Debian's ``postgresql`` package.

For the tests and benchmarks that run Prefect on both of its database backends; the package is
installed with apt-get when it is missing (as root). PostgreSQL refuses to run as root,
so under root the server runs as the package's ``postgres`` user, in a data directory it owns.
Authentication is ``trust``: it listens on loopback only and lives as long as the benchmark.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from prefect_gpu_sandbox.debian import ensure_packages
from prefect_gpu_sandbox.processes import ServerProcess, Service, free_port

__all__ = ["PostgresServer", "postgres_bin"]

_READY_TIMEOUT = 60.0


def _installed() -> list[Path]:
    return sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )


def postgres_bin(*, install: bool = True) -> Path:
    """The newest installed PostgreSQL's bin directory (Debian keeps them side by side),
    installing Debian's ``postgresql`` first when there is none."""
    candidates = _installed()
    if not candidates and install:
        ensure_packages("postgresql")
        candidates = _installed()
    if not candidates:
        raise FileNotFoundError(
            "PostgreSQL is not installed: run `apt-get install -y postgresql` (Debian) first"
        )
    return candidates[-1].parent


class PostgresServer(Service):
    """``initdb`` + ``postgres`` in a fresh directory; ``database_url`` is for Prefect."""

    def __init__(self) -> None:
        self._bin = postgres_bin()  # installs it, or fails before anything is made
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="prefect-gpu-operator-pg-"))
        self.data = self.directory / "data"
        self.process: ServerProcess | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        bin_dir = self._bin
        subprocess.run(
            [
                *self._as_user,
                str(bin_dir / "initdb"),
                "--pgdata",
                str(self.data),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self.process = ServerProcess(
            "postgres",
            [
                *self._as_user,
                str(bin_dir / "postgres"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.directory),  # its Unix socket stays in its own directory
                "-c",
                "max_connections=200",
            ],
            log_path=self.directory / "postgres.log",
        )
        self.process.start()
        self.process.wait_ready(self._accepting, timeout=_READY_TIMEOUT)

    def _accepting(self) -> bool:
        result = subprocess.run(
            [str(self._bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)
