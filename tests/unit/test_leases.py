"""What a Prefect server's own settings say about its leases, read purely."""

from __future__ import annotations

from typing import Any

import pytest

from prefect_gpu_operator.domain.leases import lease_durability


def reported(storage: str | None, driver: str | None = None) -> dict[str, Any]:
    """The shape of Prefect 3.9's /api/admin/settings, trimmed to what is read."""
    database = {"connection_url": "**********", "driver": driver}
    return {"server": {"concurrency": {"lease_storage": storage}, "database": database}}


MEMORY = "prefect.server.concurrency.lease_storage.memory"
FILESYSTEM = "prefect.server.concurrency.lease_storage.filesystem"
REDIS = "prefect_redis.lease_storage"


@pytest.mark.parametrize(
    ("settings", "status", "reason"),
    [
        (reported(MEMORY), "False", "LeasesNotShared"),
        (reported(MEMORY, "postgresql+asyncpg"), "False", "LeasesNotShared"),
        (reported(FILESYSTEM), "False", "LeasesNotShared"),
        (reported(REDIS, "sqlite+aiosqlite"), "False", "SQLiteDatabase"),
        (reported(REDIS), "Unknown", "DatabaseNotReported"),
        (reported(REDIS, "postgresql+asyncpg"), "True", "LeasesShared"),
        (reported(None), "Unknown", "LeaseStorageNotReported"),
        ({"server": "unexpected"}, "Unknown", "LeaseStorageNotReported"),
        (None, "Unknown", "SettingsNotReported"),
    ],
)
def test_the_verdict_follows_the_reported_settings(
    settings: dict[str, Any] | None, status: str, reason: str
) -> None:
    verdict = lease_durability(settings)
    assert (verdict.status, verdict.reason) == (status, reason)


def test_a_failing_verdict_says_what_to_set() -> None:
    message = lease_durability(reported(MEMORY)).message
    assert "in memory storage" in message
    assert f"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE={REDIS}" in message
    assert "docs/prefect-server.md" in message


def test_the_masked_database_url_is_never_repeated() -> None:
    for settings in (reported(MEMORY), reported(REDIS), reported(REDIS, "postgresql+asyncpg")):
        assert "*****" not in lease_durability(settings).message
