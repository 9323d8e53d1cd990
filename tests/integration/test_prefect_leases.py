"""The operator asks the Prefect server it writes to where its leases live, from what the server
reports itself (/api/admin/settings), and says so in PrefectLeasesDurable: real servers
configured each way — SQLite with per-server leases, and PostgreSQL with leases in Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from prefect_gpu_sandbox.postgres import PostgresServer
from prefect_gpu_sandbox.prefect_server import PrefectServer
from prefect_gpu_sandbox.redis import RedisServer
from prefect_gpu_sandbox.waiting import eventually
from tests.support.nodes import NodeFactory
from tests.support.operator import OperatorProcess
from tests.support.policies import Policies

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def durable_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A server as an HA deployment runs one: PostgreSQL, leases in Redis (prefect-redis), the
    database driver set so that the server can report it (its URL is always masked)."""
    with PostgresServer() as postgres, RedisServer() as redis:
        settings = {
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_HOST": redis.host,
            "PREFECT_REDIS_MESSAGING_PORT": str(redis.port),
            "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
        }
        home = tmp_path_factory.mktemp("prefect-durable")
        with PrefectServer(home, database_url=postgres.database_url, settings=settings) as server:
            yield server


def _durable(policies: Policies, name: str, status: str) -> dict[str, Any]:
    found = policies.condition(name, "PrefectLeasesDurable")
    assert found["status"] == status, found
    return found


def test_a_server_with_leases_of_its_own_is_reported_with_the_fix(
    operator: OperatorProcess,
    policies: Policies,
    gpu_nodes: NodeFactory,
    prefect_api_url: str,
) -> None:
    """The suite's server keeps leases on its filesystem: one server's, not shared."""
    gpu_nodes.create("pl1-a", 1, labels={"pool": "pl1"})
    server = {"remoteApiUrl": prefect_api_url}
    policies.create("pl1", {"server": server, "nodeSelector": {"matchLabels": {"pool": "pl1"}}})
    found = eventually(lambda: _durable(policies, "pl1", "False"), timeout=20)
    assert found["reason"] == "LeasesNotShared"
    assert "lease_storage.filesystem" in found["message"]
    assert (
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage" in found["message"]
    )
    assert policies.condition("pl1", "Ready")["status"] == "True"  # a warning, not a failure


def test_a_server_on_postgresql_with_leases_in_redis_is_durable(
    operator: OperatorProcess,
    durable_prefect: PrefectServer,
    policies: Policies,
    gpu_nodes: NodeFactory,
) -> None:
    gpu_nodes.create("pl2-a", 2, labels={"pool": "pl2"})
    server = {"remoteApiUrl": durable_prefect.api_url}
    policies.create("pl2", {"server": server, "nodeSelector": {"matchLabels": {"pool": "pl2"}}})
    found = eventually(lambda: _durable(policies, "pl2", "True"), timeout=30)
    assert found["reason"] == "LeasesShared"
    assert "postgresql+asyncpg" in found["message"]
    assert "*****" not in found["message"]
    assert "*****" not in operator.log()
