"""The operator's one door to Prefect: global concurrency limits over Prefect's REST API.

Four endpoints are all it needs, so it speaks them with one long-lived httpx client rather than
Prefect's full client (which costs ~40 MB of imports and extra requests per call). Every request
is counted (``prefect_api_calls_total``) so that tests and benchmarks can prove the operator makes
no call it does not need.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import httpx

from prefect_gpu_operator.domain.plan import ObservedLimit
from prefect_gpu_operator.metrics import PREFECT_CALLS, PREFECT_ERRORS

__all__ = ["ObservedLimit", "PrefectLimits", "PrefectUnreachable"]

# The server rejects pages larger than 200.
PAGE_SIZE = 200
# A SQLite-backed server answers 503 "database is locked" under concurrent writes: worth a retry.
_RETRIED_STATUS = frozenset({429, 502, 503, 504})
_RETRIES = 3


class PrefectUnreachable(RuntimeError):
    """The Prefect API could not be reached or answered with an error."""


def _path(name: str) -> str:
    # Quote everything but ':' so that a name such as gpu:node-1.example.com travels intact.
    return f"/v2/concurrency_limits/{quote(name, safe=':')}"


def _observed(item: dict[str, Any]) -> ObservedLimit:
    return ObservedLimit(
        item["name"],
        int(item["limit"]),
        bool(item.get("active", True)),
        float(item.get("slot_decay_per_second") or 0.0),
        int(item.get("active_slots") or 0),
    )


class PrefectLimits:
    """Create, read, update and delete global concurrency limits on one Prefect API (the runtime's
    ``LimitsApi``)."""

    def __init__(self, api_url: str, api_key: str | None = None, *, timeout: float = 10.0) -> None:
        self.api_url = api_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.api_url + "/", headers=headers, timeout=timeout
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def list_all(self) -> dict[str, ObservedLimit]:
        """Every limit on the server, paged."""
        found: dict[str, ObservedLimit] = {}
        offset = 0
        while True:
            body = {"limit": PAGE_SIZE, "offset": offset}
            page: list[dict[str, Any]] = (
                await self._request("list", "POST", "/v2/concurrency_limits/filter", body)
            ).json()
            found.update((item["name"], _observed(item)) for item in page)
            if len(page) < PAGE_SIZE:
                return found
            offset += PAGE_SIZE

    async def read(self, name: str) -> ObservedLimit | None:
        """One limit as it is now (its held slots included); None if it does not exist."""
        response = await self._request("read", "GET", _path(name), None, ok={404})
        return None if response.status_code == 404 else _observed(response.json())

    async def create(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        """Create the limit; if it appeared meanwhile, set it instead (the caller owns the name)."""
        body = {"name": name, "limit": limit, "slot_decay_per_second": slot_decay_per_second}
        response = await self._request("create", "POST", "/v2/concurrency_limits/", body, ok={409})
        if response.status_code == 409:
            await self.update(name, limit, slot_decay_per_second)

    async def update(self, name: str, limit: int, slot_decay_per_second: float) -> None:
        """Change the limit's size. Never touches ``active``: toggling it corrupts slot counts."""
        body = {"limit": limit, "slot_decay_per_second": slot_decay_per_second}
        response = await self._request("update", "PATCH", _path(name), body, ok={404})
        if response.status_code == 404:
            await self.create(name, limit, slot_decay_per_second)

    async def delete(self, name: str) -> None:
        # Already gone is fine: the goal is reached.
        await self._request("delete", "DELETE", _path(name), None, ok={404})

    async def _request(
        self,
        operation: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        ok: frozenset[int] | set[int] = frozenset(),
    ) -> httpx.Response:
        for attempt in range(_RETRIES + 1):
            PREFECT_CALLS.labels(operation).inc()
            try:
                response = await self._http.request(method, path.lstrip("/"), json=body)
            except httpx.HTTPError as error:
                failure = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            else:
                if response.is_success or response.status_code in ok:
                    return response
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in _RETRIED_STATUS:
                    PREFECT_ERRORS.labels(operation).inc()
                    break
            PREFECT_ERRORS.labels(operation).inc()
            if attempt < _RETRIES:
                await asyncio.sleep(0.1 * 2**attempt)
        raise PrefectUnreachable(f"{operation} on {self.api_url}: {failure}")
