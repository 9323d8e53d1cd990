"""Whether a Prefect server keeps concurrency leases where GPU slots survive it: a pure reading
of what the server reports about itself (``GET /api/admin/settings``).

Slots are counted in the database, but a slot can be renewed, released or expired only through
its lease. Leases in memory are lost on a restart (their slots stay counted: nobody can release
them) and are per replica (a release that reaches another replica frees nothing); leases on the
filesystem are per pod. Only a shared store (Redis, ``prefect_redis.lease_storage``) on a shared
database (PostgreSQL) keeps every slot releasable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LeaseDurability", "lease_durability"]

SHARED_LEASE_STORAGE = "prefect_redis.lease_storage"
_FIX = (
    "run Prefect on PostgreSQL with PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="
    f"{SHARED_LEASE_STORAGE} (see docs/prefect-server.md)"
)


@dataclass(frozen=True)
class LeaseDurability:
    """The ``PrefectLeasesDurable`` condition's status, reason and message."""

    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


def _setting(settings: Mapping[str, Any], *path: str) -> Any:
    value: Any = settings
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def lease_durability(settings: Mapping[str, Any] | None) -> LeaseDurability:
    """The verdict on a server's reported settings; None: it reports none (Prefect Cloud, or a
    server that refuses the endpoint)."""
    if settings is None:
        return LeaseDurability(
            "Unknown",
            "SettingsNotReported",
            "the server does not report its settings (Prefect Cloud keeps leases durably; a "
            "self-hosted server may refuse /api/admin/settings): not checked",
        )
    storage = _setting(settings, "server", "concurrency", "lease_storage")
    driver = _setting(settings, "server", "database", "driver")
    if not isinstance(storage, str) or not storage:
        return LeaseDurability(
            "Unknown", "LeaseStorageNotReported", "the server does not report its lease storage"
        )
    if storage != SHARED_LEASE_STORAGE:
        where = storage.rsplit(".", 1)[-1]
        return LeaseDurability(
            "False",
            "LeasesNotShared",
            f"the server keeps concurrency leases in {where} storage ({storage}): a restart or "
            f"another API replica strands the slots they hold; {_FIX}",
        )
    if isinstance(driver, str) and driver.startswith("sqlite"):
        return LeaseDurability(
            "False",
            "SQLiteDatabase",
            f"the server's database is SQLite ({driver}), which API replicas cannot share; {_FIX}",
        )
    if not isinstance(driver, str) or not driver:
        return LeaseDurability(
            "Unknown",
            "DatabaseNotReported",
            f"leases are shared ({storage}), but the server masks its database URL: set "
            "PREFECT_SERVER_DATABASE_DRIVER (e.g. postgresql+asyncpg) on it to report the database",
        )
    return LeaseDurability(
        "True",
        "LeasesShared",
        f"leases in {storage}, database {driver}: every slot stays releasable",
    )
