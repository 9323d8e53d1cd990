"""Prefect flow-side helpers: gate GPU work on the node's global concurrency limit."""

from prefect_gpu_flows.slots import (
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
