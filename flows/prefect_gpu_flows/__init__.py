"""Prefect flow-side helpers: gate GPU work on the node's global concurrency limit.

Prefect is imported when one of these names is first used, not with the package, so that the
stdlib-only device modules (``_devices``, ``_cuda``) also work where Prefect is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_gpu_flows.slots import (
        GpuDeviceError,
        GpuLease,
        GpuLimitNotFoundError,
        GpuSlotError,
        GpuSlotTimeout,
        MissingWorkerIdError,
        SlotConfig,
        async_gpu_slot,
        get_worker_id,
        gpu_slot,
    )

__all__ = [
    "GpuDeviceError",
    "GpuLease",
    "GpuLimitNotFoundError",
    "GpuSlotError",
    "GpuSlotTimeout",
    "MissingWorkerIdError",
    "SlotConfig",
    "async_gpu_slot",
    "get_worker_id",
    "gpu_slot",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("prefect_gpu_flows.slots"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
