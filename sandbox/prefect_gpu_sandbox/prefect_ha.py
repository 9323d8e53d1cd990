"""A highly available Prefect server on loopback: API replicas sharing PostgreSQL and Redis.

What a platform team runs for several Prefect API pods, on one machine: Debian's PostgreSQL and
redis-server, ``replicas`` processes of ``prefect server start --no-services`` on ports of their
own, and one ``prefect server services start`` (the background services, the lease repossessor
among them). ``ha_settings`` is the configuration they all share: concurrency leases, messaging,
event ordering and the docket on Redis (``prefect-redis``). ``lease_storage`` can be set back to
Prefect's default, in-memory storage, to see what the Redis setting is for.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from prefect_gpu_sandbox.postgres import PostgresServer
from prefect_gpu_sandbox.prefect_server import PrefectServer, PrefectServices
from prefect_gpu_sandbox.processes import Service
from prefect_gpu_sandbox.redis import RedisServer

__all__ = ["MEMORY_LEASE_STORAGE", "REDIS_LEASE_STORAGE", "HAPrefect", "ha_settings"]

REDIS_LEASE_STORAGE = "prefect_redis.lease_storage"
MEMORY_LEASE_STORAGE = "prefect.server.concurrency.lease_storage.memory"
"""Prefect's default: each process keeps its own leases, and loses them when it stops."""


def ha_settings(
    database_url: str,
    redis_host: str,
    redis_port: int,
    redis_db: int = 0,
    *,
    lease_storage: str = REDIS_LEASE_STORAGE,
) -> dict[str, str]:
    """The server settings every API replica and the services process share."""
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        # Reported by /api/admin/settings, where the URL is masked: the operator's
        # PrefectLeasesDurable condition reads the database's dialect from it.
        "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": lease_storage,
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_DOCKET_URL": f"redis://{redis_host}:{redis_port}/{redis_db}",
        "PREFECT_REDIS_MESSAGING_HOST": redis_host,
        "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
        "PREFECT_REDIS_MESSAGING_DB": str(redis_db),
    }


class HAPrefect(Service):
    """PostgreSQL, Redis, ``replicas`` API replicas and one services process, started in that
    order and stopped in reverse. ``api_urls[i]`` is replica i's API, on 127.0.0.1."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        replicas: int = 2,
        lease_storage: str = REDIS_LEASE_STORAGE,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="prefect-gpu-operator-ha-"))
        self.lease_storage = lease_storage
        self.postgres = PostgresServer()
        self.redis = RedisServer()
        self.settings = ha_settings(
            self.postgres.database_url,
            self.redis.host,
            self.redis.port,
            lease_storage=lease_storage,
        )
        self.replicas = [
            PrefectServer(
                self.directory / f"api-{i}",
                database_url=self.postgres.database_url,
                settings=self.settings,
                services=False,
            )
            for i in range(replicas)
        ]
        self.services = PrefectServices(
            self.directory / "services",
            database_url=self.postgres.database_url,
            settings=self.settings,
        )

    @property
    def api_urls(self) -> list[str]:
        return [replica.api_url for replica in self.replicas]

    def start(self) -> None:
        self.postgres.start()
        self.redis.start()
        # One after the other: each replica migrates the database as it starts, and concurrent
        # migrations of a fresh database fail.
        for replica in self.replicas:
            replica.start()
        self.services.start()

    def restart_replica(self, index: int) -> None:
        """Stop replica ``index`` (SIGTERM) and start it again on the same port."""
        self.stop_replica(index)
        self.replicas[index].start()

    def stop_replica(self, index: int) -> None:
        self.replicas[index].stop()

    def stop(self) -> None:
        # Everything is stopped even if one stop fails; the first failure is raised after.
        with contextlib.ExitStack() as stack:
            if self._own_directory:
                stack.callback(shutil.rmtree, self.directory, ignore_errors=True)
            stack.callback(self.postgres.stop)
            stack.callback(self.redis.stop)
            for replica in self.replicas:
                stack.callback(replica.stop)
            stack.callback(self.services.stop)
