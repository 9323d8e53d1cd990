"""The operator's one door to Prefect: global concurrency limits on one API, one long-lived client.

Every request is counted (``prefect_api_calls_total``) so that tests and benchmarks can prove the
operator makes no call it does not need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from prefect_gpu_operator.metrics import PREFECT_CALLS, PREFECT_ERRORS
from prefect_gpu_operator.plan import ObservedLimit

__all__ = ["ObservedLimit", "PrefectLimits", "PrefectUnreachable"]

_T = TypeVar("_T")

# The server rejects pages larger than 200.
PAGE_SIZE = 200


class PrefectUnreachable(RuntimeError):
    """The Prefect API could not be reached or answered with an error."""


class PrefectLimits:
    """Create, read, update and delete global concurrency limits on one Prefect API."""

    def __init__(self, api_url: str, api_key: str | None = None, timeout: float = 10.0) -> None:
        self.api_url = api_url
        self._client = PrefectClient(api_url, api_key=api_key, httpx_settings={"timeout": timeout})
        self._open = False

    async def _ready(self) -> PrefectClient:
        if not self._open:
            await self._client.__aenter__()
            self._open = True
        return self._client

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self._client.__aexit__(None, None, None)

    async def list_all(self) -> dict[str, ObservedLimit]:
        """Every limit on the server, paged."""
        client = await self._ready()
        found: dict[str, ObservedLimit] = {}
        offset = 0
        while True:
            page = await self._call(
                "list", client.read_global_concurrency_limits(limit=PAGE_SIZE, offset=offset)
            )
            for item in page:
                found[item.name] = ObservedLimit(
                    item.name, item.limit, item.active, item.slot_decay_per_second or 0.0
                )
            if len(page) < PAGE_SIZE:
                return found
            offset += PAGE_SIZE

    async def create(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        """Create the limit; if it appeared meanwhile, set it instead (the caller owns the name)."""
        client = await self._ready()
        body = GlobalConcurrencyLimitCreate(
            name=name, limit=limit, slot_decay_per_second=slot_decay_per_second
        )
        try:
            await self._call("create", client.create_global_concurrency_limit(body))
        except ObjectAlreadyExists:
            await self.update(name, limit, slot_decay_per_second)

    async def update(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        """Change the limit's size. Never touches ``active``: toggling it corrupts slot counts."""
        client = await self._ready()
        body = GlobalConcurrencyLimitUpdate(
            limit=limit, slot_decay_per_second=slot_decay_per_second
        )
        try:
            await self._call("update", client.update_global_concurrency_limit(name, body))
        except ObjectNotFound:
            await self.create(name, limit, slot_decay_per_second)

    async def delete(self, name: str) -> None:
        client = await self._ready()
        with contextlib.suppress(ObjectNotFound):  # already gone: the goal is reached
            await self._call("delete", client.delete_global_concurrency_limit_by_name(name))

    async def _call(self, operation: str, request: Awaitable[_T]) -> _T:
        PREFECT_CALLS.labels(operation).inc()
        try:
            return await request
        except (ObjectAlreadyExists, ObjectNotFound):
            raise
        except Exception as error:
            PREFECT_ERRORS.labels(operation).inc()
            raise PrefectUnreachable(
                f"{operation} on {self.api_url}: {_describe(error)}"
            ) from error


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:300]
