"""What both demos print: timestamped steps and the Prefect limits as ``prefect gcl ls`` shows
them, and waiting until the limits are what the operator should have made."""

from __future__ import annotations

import time
from typing import Any

import httpx

from prefect_gpu_sandbox.waiting import eventually

__all__ = ["limits", "print_limits", "step", "wait_for_limits"]


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def limits(http: httpx.Client) -> dict[str, dict[str, Any]]:
    response = http.post("/v2/concurrency_limits/filter", json={"limit": 200, "offset": 0})
    response.raise_for_status()
    return {item["name"]: item for item in response.json()}


def print_limits(http: httpx.Client) -> None:
    rows = sorted(limits(http).values(), key=lambda item: item["name"])
    print(f"    {'NAME':<20}{'LIMIT':>6}{'ACTIVE SLOTS':>14}{'ACTIVE':>8}   (prefect gcl ls)")
    for item in rows:
        print(
            f"    {item['name']:<20}{item['limit']:>6}{item['active_slots']:>14}"
            f"{item['active']!s:>8}"
        )


def wait_for_limits(http: httpx.Client, expected: dict[str, int], timeout: float) -> float:
    """Wait until the ``gpu:`` limits are exactly ``expected``; how long that took (seconds)."""
    started = time.perf_counter()

    def matches() -> bool:
        return {n: i["limit"] for n, i in limits(http).items() if n.startswith("gpu:")} == expected

    eventually(matches, timeout=timeout, what=f"limits {expected}", interval=0.01)
    return time.perf_counter() - started
